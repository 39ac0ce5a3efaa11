"""Retrofit end to end through the CLI: a tiny random Llama saved by transformers -> `sra-jax train` from it
(routers only: SL + teacher KL, then SL + router RL continuing from that run) -> `sra-jax export` -> transformers
and `load_hf` read the export back; plus `trainable: all` and a disagreeing `model:` value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sra_jax.cli import main as cli
from sra_jax.convert import load_hf
from sra_jax.convert.source import fingerprint, load_source, resolve_source
from sra_jax.train import sharding
from sra_jax.train.config import TrainConfig
from sra_jax.train.step import create_trainer, is_router_param

# The model section of the packaged synthetic_sra config, so its explicit `model:` values agree with the source.
HF_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, initializer_range=0.1,
                 tie_word_embeddings=False)
FAST = ["steps=2", "batch_size=2", "optim.warmup_steps=0", "log.dir=null", "log.progress=false",
        "checkpoint.async_save=false", "data.eval_size=8"]


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _train(ckpt: Path, *overrides: str) -> None:
    argv = ["-q", "train", "--config", "synthetic_sra", *_sets(*FAST, f"checkpoint.dir={ckpt}", *overrides)]
    assert cli(argv) == 0


def _flat(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrofit")
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    hf_model.save_pretrained(root / "src", safe_serialization=True)
    _train(root / "router", f"init.from={root / 'src'}", "init.trainable=router")
    # Continue from that run's checkpoint (a training-checkpoint source: its routers are kept) with router RL.
    _train(root / "router_rl", f"init.from={root / 'router'}", "init.trainable=router", "loss.kind=sl+rl",
           "loss.group_size=2")
    assert cli(["-q", "export", "--checkpoint", str(root / "router_rl"), "--out", str(root / "export")]) == 0
    return root, hf_model


def test_router_only_keeps_the_llama_bit_identical_and_trains_the_routers(runs):
    root, _ = runs
    _, _, source = load_source(root / "src")
    for run in ("router", "router_rl"):
        _, sra, trained = load_source(root / run)
        assert sra is not None
        before, after = _flat(source), _flat(trained)
        llama = [p for p in after if not is_router_param(p)]
        assert set(llama) == set(before)
        for p in llama:
            np.testing.assert_array_equal(after[p], before[p], err_msg=f"{run}: {p}")
    first, second = _flat(load_source(root / "router")[2]), _flat(load_source(root / "router_rl")[2])
    routers = [p for p in first if is_router_param(p)]
    assert routers and any(not np.array_equal(first[p], second[p]) for p in routers)
    assert resolve_source(root / "router_rl").step == 2
    assert resolve_source(root / "router", step=1).step == 1


def _stored_params(step_dir: Path) -> set:
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().metadata((step_dir / "state").absolute()).item_metadata.tree
    return {p for p, _ in nnx.to_flat_state(nnx.State(tree["params"]))}


def test_router_only_checkpoints_store_the_routers_and_reference_the_source(runs):
    root, _ = runs
    step = root / "router" / "2"
    meta = json.loads((step / "meta" / "metadata").read_text())
    assert meta["frozen"] == {"source": str((root / "src").absolute()), "fingerprint": fingerprint(root / "src"),
                              "stored": "router"}
    stored = _stored_params(step)
    assert stored and all(is_router_param(p) for p in stored)
    # A continued run references the step folder it started from (itself router-only), not the run folder.
    chained = json.loads((root / "router_rl" / "2" / "meta" / "metadata").read_text())["frozen"]
    assert chained["source"] == str(step.absolute())


def test_a_router_only_run_resumes_and_refuses_a_changed_source(runs, tmp_path, capsys):
    root, _ = runs
    src = tmp_path / "src"
    shutil.copytree(root / "src", src)
    overrides = (f"init.from={src}", "init.trainable=router", "checkpoint.every=1")
    _train(tmp_path / "ckpt", *overrides)
    shutil.rmtree(tmp_path / "ckpt" / "2")  # as if killed before its last save
    _train(tmp_path / "ckpt", *overrides)  # resumes step 1: routers from the checkpoint, the Llama from src
    assert resolve_source(tmp_path / "ckpt").step == 2
    trained = _flat(load_source(tmp_path / "ckpt")[2])
    for p, value in _flat(load_source(src)[2]).items():
        np.testing.assert_array_equal(trained[p], value, err_msg=str(p))
    # The same weights in another folder are the same source; other weights are refused, naming both.
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    assert fingerprint(moved) == fingerprint(src)
    weights = next(src.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="holds other weights than the run trained on"):
        load_source(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "2")
    argv = ["-q", "train", "--config", "synthetic_sra", *_sets(*FAST, f"checkpoint.dir={tmp_path / 'ckpt'}",
                                                               *overrides)]
    assert cli(argv) == 2
    assert "step 1 in" in (err := capsys.readouterr().err) and "not the same weights" in err


def test_router_only_optimizer_state_covers_the_routers_only(runs):
    root, _ = runs
    config = TrainConfig.load("synthetic_sra", [*FAST, f"init.from={root / 'src'}", "init.trainable=router"])
    trainer, state = create_trainer(config, sharding.make_mesh((1, 1, 1)))
    flat = dict(nnx.to_flat_state(state.params))
    router_size = sum(v.get_value().size for p, v in flat.items() if is_router_param(p))
    opt_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert opt_size == 2 * router_size  # AdamW mu and nu of the routers; nothing for the Llama


def test_export_loads_in_transformers_bit_for_bit_and_load_hf_restores_the_routers(runs):
    root, hf_model = runs
    exported = transformers.LlamaForCausalLM.from_pretrained(root / "export").eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 64, 2, 7]])
    with torch.no_grad():
        np.testing.assert_array_equal(exported(ids).logits.numpy(), hf_model(ids).logits.numpy())
    _, trained_sra, trained = load_source(root / "router_rl")
    config, reloaded = load_hf(root / "export")
    assert reloaded.sra == trained_sra
    assert (root / "export" / "sra_config.json").exists()
    tokens = jnp.asarray(ids.numpy(), jnp.int32)
    np.testing.assert_array_equal(np.asarray(reloaded(tokens)[0]), np.asarray(trained(tokens)[0]))


def test_trainable_all_changes_the_llama(runs, tmp_path):
    root, _ = runs
    _train(tmp_path / "all", f"init.from={root / 'src'}", "init.trainable=all", "steps=1", "remat=full")
    before, after = _flat(load_source(root / "src")[2]), _flat(load_source(tmp_path / "all")[2])
    changed = [p for p in before if not np.array_equal(before[p], after[p])]
    assert ("embed", "embedding") in changed and len(changed) > len(before) // 2


def test_a_disagreeing_model_value_is_refused_naming_both(runs):
    root, _ = runs
    with pytest.raises(ValueError, match=r"model.hidden_size=32 .*model.hidden_size=64"):
        TrainConfig.load("synthetic_sra", [f"init.from={root / 'src'}", "model.hidden_size=32"])
    assert cli(["-q", "train", "--config", "synthetic_sra",
                *_sets(f"init.from={root / 'src'}", "model.num_hidden_layers=3")]) == 2
    config = TrainConfig.load(None, [f"init.from={root / 'src'}", "sra.router_hidden=16"])
    assert config.model.hidden_size == 64 and config.model.rope_theta == 10000.0 and config.init.from_


def test_bad_init_values_are_clear(tmp_path):
    with pytest.raises(ValueError, match="init.trainable='some'"):
        TrainConfig.load(None, ["init.trainable=some"])
    with pytest.raises(ValueError, match="init.from=.*does not exist"):
        TrainConfig.load(None, [f"init.from={tmp_path / 'nothing'}"])
    with pytest.raises(ValueError, match="init.trainable='router' .*`sra` must be set"):
        TrainConfig.load(None, ["init.trainable=router"])


def test_generate_and_eval_take_a_training_checkpoint(runs, capsys):
    root, _ = runs
    assert cli(["-q", "generate", "--checkpoint", str(root / "router_rl" / "2"), "--prompt-ids", "1,2,3",
                "--max-new-tokens", "2"]) == 0
    assert cli(["-q", "eval", "--checkpoint", str(root / "router_rl"), "--size", "4"]) == 0
    out = capsys.readouterr().out
    assert "'step': 2" in out and "accuracy" in out


def test_an_orbax_model_folder_is_a_source_too(runs, tmp_path):
    from sra_jax.convert import hf_to_orbax

    root, _ = runs
    hf_to_orbax(root / "src", tmp_path / "orbax")
    source = resolve_source(tmp_path / "orbax")
    assert source.kind == "orbax" and source.sra is None
    config = TrainConfig.load("synthetic_sra", [f"init.from={tmp_path / 'orbax'}"])
    assert config.model == source.config and config.sra is not None  # synthetic_sra's sra: fresh routers
    _, sra, model = load_source(source, sra=config.sra)
    loaded, reference = _flat(model), _flat(load_source(root / "src")[2])
    assert sra == config.sra and any(is_router_param(p) for p in loaded)
    for p, value in reference.items():
        np.testing.assert_array_equal(loaded[p], value)


GRPO = ["loss.kind=grpo", "loss.group_size=2", "loss.grpo.max_new_tokens=2", "loss.grpo.kl_weight=0.1",
        "loss.token_penalty=0.1"]


def test_grpo_from_a_hugging_face_llama_trains_the_routers_only_or_everything(runs, tmp_path):
    """`loss.kind: grpo` starts from init.from like SL does: router-only keeps the Llama bit-identical and moves the
    routers; `all` moves the Llama. The KL reference is the loaded weights (the routers alone when they are all
    that trains, the frozen Llama being read from the state)."""
    from sra_jax.train.lm_rl import GRPOStep

    root, _ = runs
    for trainable in ("router", "all"):
        overrides = [f"init.from={root / 'src'}", f"init.trainable={trainable}", *GRPO]
        _train(tmp_path / trainable, *overrides)
        config = TrainConfig.load("synthetic_sra", [*FAST, *overrides])
        trainer, state = create_trainer(config, sharding.make_mesh((1, 1, 1)))
        initial = dict(nnx.to_flat_state(state.params))
        trained = _flat(load_source(tmp_path / trainable)[2])
        changed = {p for p in initial if not np.array_equal(initial[p].get_value(), trained[p])}
        assert any(is_router_param(p) for p in changed), trainable
        assert any(not is_router_param(p) for p in changed) == (trainable == "all"), trainable
        reference = dict(nnx.to_flat_state(GRPOStep(trainer).reference_params()))
        assert set(reference) == {p for p in initial if trainable == "all" or is_router_param(p)}
        for p, value in reference.items():
            np.testing.assert_array_equal(value.get_value(), initial[p].get_value())
