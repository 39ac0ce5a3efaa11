"""GRPO rollouts: `group_size` sampled completions of each prompt (`sra_jax.generate`: KV cache, stop tokens), laid
out as one fixed-shape right-padded batch for teacher-forced scoring (`sra_jax.train.lm_rl` grades and trains on
it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from flax import nnx
from jaxtyping import Bool, Int

from sra_jax.generate import generate


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
