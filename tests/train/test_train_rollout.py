"""LM GRPO: sampled groups are laid out right, and one update moves the policy toward rewarded completions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.data import synthetic
from sra_jax.nn import Llama
from sra_jax.train import rollout


def test_grpo_step_samples_groups_and_raises_log_prob_of_rewarded_completions():
    config = LlamaConfig.tiny(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=96)
    model = Llama(config, SRAConfig(critical_fraction=0.5, window=4, num_global=1, router_hidden=8),
                  rngs=nnx.Rngs(0))
    tokenizer = synthetic.SyntheticTokenizer()
    problems = synthetic.generate(synthetic.SyntheticConfig(min_hops=1, max_hops=2, min_distractors=0, max_distractors=1), 2)
    prompts = [tokenizer.prompt_ids(p) for p in problems]
    group, seq_len, new_tokens = 4, 64, 3  # the grpo_step calls below reuse this generate compile (same shapes)

    sampled = rollout.sample_group(model, prompts, group_size=group, max_new_tokens=new_tokens, seq_len=seq_len,
                                   temperature=1.0, stop_tokens=[tokenizer.eos_id], seed=1)
    assert sampled.tokens.shape == (len(prompts) * group, seq_len)
    for row, completion in enumerate(sampled.completions):
        prompt = prompts[row // group]
        np.testing.assert_array_equal(sampled.tokens[row, : len(prompt)], prompt)
        assert sampled.completion_mask[row].sum() == len(completion)

    # Reward completions whose first token is even; GRPO should make such first tokens more likely.
    def grade(_, completion):
        return completion[0] % 2 == 0

    def even_first_token_prob():
        logits, _ = model(jnp.asarray([prompts[0]]))
        probs = jax.nn.softmax(logits[0, -1])
        return float(probs[::2].sum())

    before = even_first_token_prob()
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    for step in range(4):
        metrics = rollout.grpo_step(model, optimizer, prompts, grade, group_size=group, max_new_tokens=new_tokens,
                                    seq_len=seq_len, stop_tokens=[tokenizer.eos_id], seed=step)
        assert np.isfinite(metrics["loss"])
    assert even_first_token_prob() > before


# --- loss.kind = "grpo": the LM GRPO step of `sra-jax train` ------------------------------------------------------

import functools  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from sra_jax.train import lm_rl, losses, rl  # noqa: E402
from sra_jax.train.config import TrainConfig  # noqa: E402

TINY_GRPO = Path(__file__).resolve().parent / "configs" / "tiny_grpo.yaml"


def _grpo_trainer(*overrides: str):
    from sra_jax.train.sharding import make_mesh
    from sra_jax.train.step import create_trainer

    config = TrainConfig.load(TINY_GRPO, list(overrides))
    return create_trainer(config, make_mesh((1, 1, 1)))


def _rollout_batch(config: TrainConfig, correct: list[float]) -> lm_rl.RolloutBatch:
    rows, s = len(correct), 12
    tokens = np.random.default_rng(0).integers(4, config.model.vocab_size, (1, rows, s)).astype(np.int32)
    positions = np.tile(np.arange(s, dtype=np.int32), (1, rows, 1))
    positions[0, 1, 10:] = -1  # a shorter row
    completion = (np.arange(s) >= 5) & (positions >= 0)
    return lm_rl.RolloutBatch(tokens=jnp.asarray(tokens), positions=jnp.asarray(positions),
                              completion_mask=jnp.asarray(completion), correct=jnp.asarray([correct], jnp.float32))


def test_grpo_loss_of_a_dense_model_is_the_hand_computed_advantage_weighted_log_likelihood():
    """Dense model, one update per rollout: ratio = 1, so the loss is -mean_r(A_r) (= 0 within a group) and its
    gradient that of -mean_r(A_r * mean over completion tokens of log p). correct = [1, 0, 0, 1] in one group of 4
    gives A = [1, -1, -1, 1] (mean 0.5, std 0.5)."""
    trainer, state = _grpo_trainer("sra=null", "loss.kl_weight=0", "loss.token_penalty=0")
    batch = _rollout_batch(trainer.config, [1.0, 0.0, 0.0, 1.0])
    micro = jax.tree.map(lambda x: x[0], batch)
    objective = functools.partial(lm_rl.grpo_loss_fn, graphdef=trainer.graphdef, rest=trainer.rest,
                                  loss=trainer.config.loss, has_sra=False)
    # jitted as the train step runs it: one compile instead of op-by-op eager compiles (~4x faster on CPU)
    (value, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(state.params, micro,
                                                                                   jax.random.key(0), 0)
    advantages = jnp.array([1.0, -1.0, -1.0, 1.0])
    np.testing.assert_allclose(rl.group_advantages(jnp.array([1.0, 0, 0, 1]), 4), advantages, rtol=1e-5)

    def by_hand(params):
        logits, _ = trainer.model(params)(micro.tokens, micro.positions)
        log_probs = losses.shifted_token_log_probs(logits, micro.tokens)
        mask = micro.completion_mask[:, 1:].astype(jnp.float32)
        return -jnp.mean(advantages * (log_probs * mask).sum(-1) / mask.sum(-1))

    np.testing.assert_allclose(value, 0.0, atol=1e-6)
    want = jax.jit(jax.grad(by_hand))(state.params)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        # the same float32 sums in another order; rows of opposite advantage cancel, so small entries carry the
        # rounding of large ones: tolerance relative to each gradient's largest entry (measured worst: 2.7e-7 absolute)
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * float(np.abs(w).max()))
    assert float(metrics["reward"]) == 0.5 and float(metrics["clip_fraction"]) == 0.0


def test_grpo_loss_with_sra_adds_the_routers_policy_gradient_on_the_same_advantages():
    trainer, state = _grpo_trainer("loss.kl_weight=0", "loss.token_penalty=0.5", "loss.rl_weight=0.7")
    micro = jax.tree.map(lambda x: x[0], _rollout_batch(trainer.config, [1.0, 0.0, 0.0, 1.0]))
    key = jax.random.key(3)
    # both jitted (one compile each instead of op-by-op eager compiles); the same key draws the same selections
    objective = functools.partial(lm_rl.grpo_loss_fn, graphdef=trainer.graphdef, rest=trainer.rest,
                                  loss=trainer.config.loss, has_sra=True)
    _, metrics = jax.jit(objective)(state.params, micro, key, 0)
    # by hand: the selection drawn with the same key and tau (the schedule starts at 2.0)
    _, aux = jax.jit(lambda params: trainer.model(params)(micro.tokens, micro.positions, key=key,
                                                          tau=jnp.float32(2.0)))(state.params)
    fraction = aux.selected_fraction[0]
    rewards = np.array([1.0, 0, 0, 1]) - 0.5 * np.asarray(fraction)
    advantages = (rewards.reshape(1, 4) - rewards.mean()) / (rewards.std() + 1e-6)
    pg = -np.mean(advantages[0] * np.asarray(aux.selection_log_prob.sum(0)))
    np.testing.assert_allclose(metrics["reward"], rewards.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["policy_loss"], pg, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], metrics["lm_loss"] + 0.7 * pg, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["tau"], 2.0)


def test_split_prompts_takes_the_tokens_before_the_reference_answer():
    tokens = np.array([[1, 5, 6, 3, 9, 2, 0], [1, 7, 3, 8, 8, 2, 0]])
    positions = np.array([[0, 1, 2, 3, 4, 5, -1], [0, 1, 2, 3, 4, 5, -1]])
    mask = np.array([[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0]], bool)
    prompts, references = lm_rl.split_prompts(tokens, positions, mask)
    assert prompts == [[1, 5, 6, 3], [1, 7, 3]] and references == [[9, 2], [8, 8, 2]]
    with pytest.raises(ValueError, match="row 0 has no loss-masked"):
        lm_rl.split_prompts(tokens, positions, np.zeros_like(mask))


def test_synthetic_answer_grader_compares_the_final_answers():
    from sra_jax.data.synthetic import SyntheticTokenizer

    tok = SyntheticTokenizer()
    grade = lm_rl.answer_grader("synthetic", tok)
    assert grade(tok.encode("#7") + [tok.eos_id], tok.encode("#7") + [tok.eos_id]) == 1.0
    assert grade(tok.encode("x=3 #7") + [tok.eos_id, 9], tok.encode("#7")) == 1.0  # text after eos ignored
    assert grade(tok.encode("#8"), tok.encode("#7")) == 0.0 and grade(tok.encode("7"), tok.encode("#7")) == 0.0


def test_grpo_config_is_validated():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        TrainConfig.load(TINY_GRPO, ["loss.max_new_tokens=40"])
    with pytest.raises(ValueError, match="sample_temperature"):
        TrainConfig.load(TINY_GRPO, ["loss.sample_temperature=0"])
    with pytest.raises(ValueError, match="group_size"):
        TrainConfig.load(TINY_GRPO, ["loss.group_size=1"])


def test_grpo_learns_an_easy_reward_through_the_train_step():
    """Honest learning check on CPU: reward 1 when the first sampled token is in the lower half of the vocabulary
    (about 1/2 at init, so every group has signal). The real GRPOStep (rollout via generate, jitted update with SRA
    on) must raise the mean reward. Measured: 0.44 over the first 3 steps -> 0.81 over the last 3 of 12."""
    from sra_jax.train.data import SyntheticStream

    trainer, state = _grpo_trainer("loss.kl_weight=0", "loss.token_penalty=0", "optim.learning_rate=0.03",
                                   "batch_size=4", "loss.max_new_tokens=2", "steps=12")
    config = trainer.config
    step_fn = lm_rl.GRPOStep(trainer, grader=lambda completion, reference: float(completion[0] < 64))
    stream = SyntheticStream(config.data, config.batch_size, config.grad_accum)
    rewards = []
    for step in range(config.steps):
        state, metrics = step_fn(state, trainer.put_batch(stream.batch(step)))
        rewards.append(float(metrics["accuracy"]))
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards


def test_sra_jax_train_runs_grpo_from_a_yaml_and_resumes_exactly(tmp_path):
    """Run 3 steps (checkpoints kept: 2 and 3), drop checkpoint 3, run again: it resumes at step 2 and recomputes
    step 3 bit-identically (same rollout seed, same params, deterministic CPU update)."""
    import json
    import os
    import shutil

    from train_helpers import cached_env

    # the resumed run loads the first run's compiled programs from a persistent cache instead of compiling them again
    env = cached_env(tmp_path / "jax-cache", dict(os.environ, JAX_PLATFORMS="cpu"))
    command = [sys.executable, "-m", "sra_jax.cli", "train", "--config", str(TINY_GRPO), "--set", "steps=3",
               "--set", f"checkpoint.dir={tmp_path / 'ckpt'}", "--set", f"log.dir={tmp_path / 'log'}"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["2", "3"]
    shutil.rmtree(tmp_path / "ckpt" / "3")
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed" in second.stderr and "at step 2" in second.stderr
    records = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    for record in records:
        assert np.isfinite(record["loss"]) and 0 <= record["accuracy"] <= 1 and "tau" in record and "kl" in record
    for name in ("loss", "reward", "accuracy", "selected_fraction", "kl", "grad_norm"):
        assert records[2][name] == records[3][name], name
