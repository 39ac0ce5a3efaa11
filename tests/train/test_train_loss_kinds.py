"""Each `loss.kind` (and the teacher KL term) gives pinned loss, term and gradient-norm values for one step of a tiny
model on a fixed batch: the loss-term registry must compute exactly what the train step computed before it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sra_jax.train import lm_rl, objectives
from sra_jax.train.cli import main as cli
from sra_jax.train.config import LOSS_KINDS, MOVED_KEYS, TrainConfig
from sra_jax.train.sharding import make_mesh
from sra_jax.train.step import create_trainer

TINY = ["model.vocab_size=128", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.max_position_embeddings=32",
        "data.seq_len=16", "batch_size=4", "optim.warmup_steps=0", "log.progress=false"]
SRA = ["sra={critical_fraction: 0.5, window: 2, num_global: 1, router_hidden: 8, selection: gumbel_topk}"]
# Bernoulli selection: each sample of a group selects a different fraction, so the router's advantages are not 0.
RL_SRA = ["sra={critical_fraction: 0.5, window: 2, num_global: 1, router_hidden: 8, selection: bernoulli}"]
RL = ["loss.group_size=2", "loss.token_penalty=0.3", "loss.length_penalty=0.01", "loss.router_rl.weight=0.7",
      "loss.router_rl.entropy_weight=0.05", "loss.temperature_start=2.0", "loss.temperature_end=0.5",
      "loss.temperature_steps=4"]

# name -> (overrides, {metric: value}); values measured on CPU (float32) with the code this test was written against.
CASES = {
    "sl": (["loss.kind=sl"],
        {"loss": 5.340973854064941, "ce": 5.340973854064941, "selected_fraction": 1.0,
         "grad_norm": 28.496923446655273}),
    "sl_teacher_kl": (["loss.kind=sl", "loss.teacher_kl_weight=0.5", *SRA],
        {"loss": 5.4037652015686035, "ce": 5.207880973815918, "teacher_kl": 0.39176878333091736,
         "selected_fraction": 0.5348678827285767, "grad_norm": 23.043445587158203, "tau": 1.0}),
    "rl": (["loss.kind=rl", *RL_SRA, *RL],
        {"loss": -0.3304380178451538, "ce": 5.252184867858887, "policy_loss": -0.3528822958469391,
         "router_entropy": 2.3834400177001953, "reward": -0.16525350511074066,
         "selected_fraction": 0.4258449971675873, "grad_norm": 0.8828734755516052, "tau": 2.0}),
    "sl+rl": (["loss.kind=sl+rl", "loss.sl_weight=0.8", "loss.teacher_kl_weight=0.25", *RL_SRA, *RL],
        {"loss": 3.9630839824676514, "ce": 5.252184867858887, "teacher_kl": 0.3670956790447235,
         "policy_loss": -0.3528822958469391, "router_entropy": 2.3834400177001953, "reward": -0.16525350511074066,
         "selected_fraction": 0.4258449971675873, "grad_norm": 17.133333206176758, "tau": 2.0}),
}
GRPO = ["loss.kind=grpo", *RL_SRA, *RL, "loss.grpo.max_new_tokens=4", "loss.grpo.kl_weight=0.1",
        "loss.grpo.clip_eps=0.2"]
GRPO_PINNED = {"loss": -0.5727583169937134, "policy_loss": -0.849703848361969, "router_entropy": 2.383439779281616,
               "reward": 0.3254224956035614, "selected_fraction": 0.45692500472068787,
               "grad_norm": 28.682024002075195, "lm_loss": 0.10545472800731659, "kl": 0.052135173231363297,
               "clip_fraction": 0.4000000059604645, "tau": 2.0}


def _batch(config: TrainConfig) -> dict[str, np.ndarray]:
    """[1, 4, 16]: random tokens, a prompt of 6-9 tokens then a 3-5 token answer (loss-masked), padding after."""
    rng = np.random.default_rng(7)
    rows, s = config.batch_size, config.data.seq_len
    tokens = rng.integers(3, config.model.vocab_size, (1, rows, s)).astype(np.int32)
    positions = np.tile(np.arange(s, dtype=np.int32), (1, rows, 1))
    loss_mask = np.zeros((1, rows, s), bool)
    for row in range(rows):
        prompt, answer = 6 + row % 4, 3 + row % 3
        loss_mask[0, row, prompt:prompt + answer] = True
        positions[0, row, prompt + answer:] = -1
        tokens[0, row, prompt + answer:] = 0
    return {"tokens": tokens, "positions": positions, "loss_mask": loss_mask}


def _metrics(trainer, state, batch) -> dict[str, float]:
    state, metrics = trainer.step_fn(state, batch)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _check(got: dict[str, float], pinned: dict[str, float]) -> None:
    assert pinned, f"measured: {got}"
    for name, want in pinned.items():
        # the same float32 ops in the same order; 1e-6 relative leaves room for XLA fusing a reduction differently
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_each_supervised_or_router_rl_kind_gives_its_pinned_values(case):
    overrides, pinned = CASES[case]
    config = TrainConfig.load(None, [*TINY, *overrides])
    trainer, state = create_trainer(config, make_mesh((1, 1, 1)))
    _check(_metrics(trainer, state, trainer.put_batch(_batch(config))), pinned)


def test_grpo_gives_its_pinned_values_on_a_fixed_rollout():
    config = TrainConfig.load(None, [*TINY, *GRPO])
    trainer, state = create_trainer(config, make_mesh((1, 1, 1)))
    arrays = _batch(config)
    step = lm_rl.GRPOStep(trainer, grader=lambda completion, reference: 0.0)
    rows = jnp.asarray(np.asarray([[1.0, 0.0, 0.0, 1.0]], np.float32))
    rollout = lm_rl.RolloutBatch(tokens=jnp.asarray(arrays["tokens"]), positions=jnp.asarray(arrays["positions"]),
                                 completion_mask=jnp.asarray(arrays["loss_mask"]), correct=rows)
    _, metrics = step.update(state, rollout, step.reference_params())
    _check({k: float(v) for k, v in jax.device_get(metrics).items()}, GRPO_PINNED)


def test_every_loss_kind_names_registered_terms():
    assert set(objectives.KIND_TERMS) == set(LOSS_KINDS)
    for kind, names in objectives.KIND_TERMS.items():
        assert names and all(name in objectives.LOSS_TERMS for name in names), kind
    router_rl = TrainConfig.load(None, [*TINY, "loss.kind=rl", *RL_SRA, "loss.teacher_kl_weight=0.1"]).loss
    assert objectives.active_terms(router_rl, has_sra=True) == ("teacher_kl", "indexer_kl", "router_rl")
    assert objectives.active_terms(TrainConfig.load(None, GRPO[:1]).loss, has_sra=False) == ("grpo",)
    no_indexer = TrainConfig.load(None, [*TINY, "loss.kind=rl", *RL_SRA, "loss.indexer_kl_weight=0"]).loss
    assert objectives.active_terms(no_indexer, has_sra=True) == ("router_rl",)
    with pytest.raises(ValueError, match="registered twice"):
        objectives.register_loss_term("grpo")(lambda outputs, loss: (0.0, {}))


@pytest.mark.parametrize("old", sorted(MOVED_KEYS))
def test_an_old_flat_loss_key_is_refused_naming_its_new_place(old, capsys):
    new = MOVED_KEYS[old]
    with pytest.raises(ValueError, match=f"^config key '{old}' is now '{new}'$"):
        TrainConfig.load(None, [f"{old}=1"])
    assert cli(["--set", f"{old}=1", "--print-config"]) == 2
    assert f"'{old}' is now '{new}'" in capsys.readouterr().err


def test_a_run_config_saved_with_flat_loss_keys_still_loads():
    saved = TrainConfig.load(None, GRPO[:1]).to_dict()
    saved["loss"] = {k: v for k, v in saved["loss"].items() if k not in ("router_rl", "grpo")}
    saved["loss"].update(rl_weight=0.3, entropy_weight=0.02, max_new_tokens=5, kl_weight=0.1)
    config = TrainConfig.from_saved(saved)
    assert (config.loss.router_rl.weight, config.loss.router_rl.entropy_weight) == (0.3, 0.02)
    assert (config.loss.grpo.max_new_tokens, config.loss.grpo.kl_weight) == (5, 0.1)
