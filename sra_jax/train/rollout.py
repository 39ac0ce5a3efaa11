"""LM RL (GRPO) on sampled completions: rollout -> reward -> group advantage -> clipped policy loss.

Shares `rl.reward`, `rl.group_advantages` and `rl.grpo_loss` with router RL. Sampling uses `sra_jax.generate`
(KV cache, stop tokens); the completions are then scored teacher-forced in one fixed-shape batch, which gives the
token log-probs for the loss and the router's selected fraction for the token penalty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from sra_jax.generate import generate
from sra_jax.train import losses, rl


@dataclasses.dataclass(frozen=True)
class Rollout:
    """`group_size` samples per prompt (consecutive rows), as a right-padded batch of prompt + completion."""

    tokens: Int[np.ndarray, "n s"]
    positions: Int[np.ndarray, "n s"]  # -1 on padding
    completion_mask: Bool[np.ndarray, "n s"]  # True on generated tokens (the stop token included)
    completions: list[list[int]]


def sample_group(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    seq_len: int,
    temperature: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
) -> Rollout:
    """Sample `group_size` completions of every prompt and lay them out for teacher-forced scoring."""
    repeated = [list(p) for p in prompts for _ in range(group_size)]
    completions = generate(model, repeated, max_new_tokens=max_new_tokens, temperature=temperature,
                           stop_tokens=stop_tokens, seed=seed, pad_id=pad_id)
    n = len(repeated)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    positions = np.full((n, seq_len), -1, np.int32)
    completion_mask = np.zeros((n, seq_len), bool)
    for row, (prompt, completion) in enumerate(zip(repeated, completions)):
        length = len(prompt) + len(completion)
        if length > seq_len:
            raise ValueError(f"prompt + completion of row {row} is {length} tokens, longer than seq_len={seq_len}")
        tokens[row, :length] = prompt + completion
        positions[row, :length] = np.arange(length)
        completion_mask[row, len(prompt):length] = True
    return Rollout(tokens, positions, completion_mask, completions)


def score(
    model: nnx.Module, tokens: Int[Array, "n s"], positions: Int[Array, "n s"]
) -> tuple[Float[Array, "n s1"], Float[Array, " n"]]:
    """Token log-probs [n, s-1] (of tokens[:, 1:]) and the router's selected fraction per row (1 for dense)."""
    logits, aux = model(tokens, positions)
    if aux.sra_layers:
        selected = aux.selected_fraction[jnp.asarray(aux.sra_layers)].mean(0)
    else:
        selected = jnp.ones((tokens.shape[0],), jnp.float32)
    return losses.shifted_token_log_probs(logits, tokens), selected


def advantages_for(
    rollout: Rollout,
    correct: Sequence[bool],
    selected_fraction: Float[Array, " n"],
    *,
    group_size: int,
    token_penalty: float,
    length_penalty: float,
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    """(rewards, GRPO advantages) of a rollout whose completions were graded `correct`."""
    generated = jnp.asarray(rollout.completion_mask.sum(-1))
    rewards = rl.reward(jnp.asarray(correct), selected_fraction, generated, token_penalty=token_penalty,
                        length_penalty=length_penalty)
    return rewards, rl.group_advantages(rewards, group_size)


def grpo_objective(
    model: nnx.Module,
    rollout: Rollout,
    advantages: Float[Array, " n"],
    old_log_probs: Float[Array, "n s1"],
    *,
    clip_eps: float = 0.2,
    kl_weight: float = 0.0,
    ref_log_probs: Float[Array, "n s1"] | None = None,
) -> Float[Array, ""]:
    """GRPO loss of `model` on a rollout sampled from the policy that gave `old_log_probs`."""
    log_probs, _ = score(model, jnp.asarray(rollout.tokens), jnp.asarray(rollout.positions))
    mask = jnp.asarray(rollout.completion_mask[:, 1:])
    return rl.grpo_loss(log_probs, old_log_probs, advantages, mask, clip_eps=clip_eps, kl_weight=kl_weight,
                        ref_log_probs=ref_log_probs)


def grpo_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    prompts: Sequence[Sequence[int]],
    grade: Callable[[int, list[int]], bool],
    *,
    group_size: int,
    max_new_tokens: int,
    seq_len: int,
    temperature: float = 1.0,
    stop_tokens: Sequence[int] = (),
    token_penalty: float = 0.0,
    length_penalty: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """One on-policy GRPO update: sample, grade (`grade(prompt_index, completion)`), advantage, gradient step."""
    rollout = sample_group(model, prompts, group_size=group_size, max_new_tokens=max_new_tokens, seq_len=seq_len,
                           temperature=temperature, stop_tokens=stop_tokens, seed=seed)
    old_log_probs, selected = jax.lax.stop_gradient(
        score(model, jnp.asarray(rollout.tokens), jnp.asarray(rollout.positions)))
    correct = [grade(row // group_size, completion) for row, completion in enumerate(rollout.completions)]
    rewards, advantages = advantages_for(rollout, correct, selected, group_size=group_size,
                                         token_penalty=token_penalty, length_penalty=length_penalty)
    loss, grads = nnx.value_and_grad(lambda m: grpo_objective(m, rollout, advantages, old_log_probs))(model)
    optimizer.update(model, grads)
    return {"loss": float(loss), "reward": float(rewards.mean()), "accuracy": float(np.mean(correct)),
            "selected_fraction": float(selected.mean()),
            "completion_tokens": float(rollout.completion_mask.sum(-1).mean())}
