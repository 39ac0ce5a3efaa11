"""LM GRPO (`loss.kind: grpo`, sra_jax.train.lm_rl): the objective against hand-computed values, prompts and
grading, rollouts laid out in groups, and the train step moving the policy toward rewarded completions."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sra_jax.train import lm_rl, losses, objectives, rl
from sra_jax.train.config import TrainConfig

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
    trainer, state = _grpo_trainer("sra=null", "loss.grpo.kl_weight=0", "loss.token_penalty=0")
    batch = _rollout_batch(trainer.config, [1.0, 0.0, 0.0, 1.0])
    micro = jax.tree.map(lambda x: x[0], batch)
    objective = functools.partial(objectives.grpo_loss_fn, graphdef=trainer.graphdef, rest=trainer.rest,
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
    trainer, state = _grpo_trainer("loss.grpo.kl_weight=0", "loss.token_penalty=0.5", "loss.router_rl.weight=0.7")
    micro = jax.tree.map(lambda x: x[0], _rollout_batch(trainer.config, [1.0, 0.0, 0.0, 1.0]))
    key = jax.random.key(3)
    # both jitted (one compile each instead of op-by-op eager compiles); the same key draws the same selections
    objective = functools.partial(objectives.grpo_loss_fn, graphdef=trainer.graphdef, rest=trainer.rest,
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
        TrainConfig.load(TINY_GRPO, ["loss.grpo.max_new_tokens=40"])
    with pytest.raises(ValueError, match="sample_temperature"):
        TrainConfig.load(TINY_GRPO, ["loss.grpo.sample_temperature=0"])
    with pytest.raises(ValueError, match="group_size"):
        TrainConfig.load(TINY_GRPO, ["loss.group_size=1"])


def test_grpo_learns_an_easy_reward_through_the_train_step():
    """Honest learning check on CPU: reward 1 when the first sampled token is in the lower half of the vocabulary
    (about 1/2 at init, so every group has signal). The real GRPOStep (rollout via generate, jitted update with SRA
    on) must raise the mean reward and the policy's probability of a rewarded first token. Measured: 0.44 over the
    first 3 steps -> 0.81 over the last 3 of 12. Each rollout is laid out as `group_size` rows per prompt: the prompt,
    then its completion under the completion mask."""
    from sra_jax.train.data import SyntheticStream

    trainer, state = _grpo_trainer("loss.grpo.kl_weight=0", "loss.token_penalty=0", "optim.learning_rate=0.03",
                                   "batch_size=4", "loss.grpo.max_new_tokens=2", "steps=12")
    config = trainer.config
    group = config.loss.group_size
    step_fn = lm_rl.GRPOStep(trainer, grader=lambda completion, reference: float(completion[0] < 64))
    stream = SyntheticStream(config.data, config.batch_size, config.grad_accum)
    first = stream.batch(0)
    prompts, _ = lm_rl.split_prompts(*(x.reshape(-1, x.shape[-1]) for x in
                                       (first["tokens"], first["positions"], first["loss_mask"])))

    def rewarded_first_token_prob(params):
        logits, _ = trainer.model(params)(jnp.asarray([prompts[0]]))
        return float(jax.nn.softmax(logits[0, -1])[:64].sum())

    before = rewarded_first_token_prob(state.params)
    rewards = []
    for step in range(config.steps):
        state, metrics = step_fn(state, trainer.put_batch(stream.batch(step)))
        rewards.append(float(metrics["accuracy"]))
        if step == 0:
            sampled = step_fn.last_rollout
            assert sampled.tokens.shape == (len(prompts) * group, config.data.seq_len + 2)
            for row, completion in enumerate(sampled.completions):
                prompt = prompts[row // group]
                np.testing.assert_array_equal(sampled.tokens[row, : len(prompt)], prompt)
                np.testing.assert_array_equal(sampled.tokens[row, sampled.completion_mask[row]], completion)
                assert sampled.completion_mask[row, : len(prompt)].sum() == 0
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    assert rewarded_first_token_prob(state.params) > before + 0.1


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
