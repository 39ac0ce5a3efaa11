"""`KVCache`: keys, values, positions and SRA critical flags of every layer, for prefill + token-by-token decoding."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import struct

from sra_jax.config import LlamaConfig


@struct.dataclass
class KVCache:
    """Fixed-size cache (static `max_len`, so decoding compiles once); a call writes its tokens at slot `index`.

    k, v       [layers, batch, max_len, kv_heads, head_dim]
    positions  [batch, max_len] int32, -1 marks an empty slot (never visible)
    critical   [layers, batch, max_len] bool, the SRA critical flag of each cached key
    threshold  [layers, batch] float32, router-score cut-off fixed at prefill (first call, index == 0): the k-th
               largest score of the prompt; a later token is critical iff its score >= threshold
    index      [] int32, the next free slot (shared by the batch: pad prompts on the left)
    """

    # Leaves are typed loosely so that pytree utilities may rebuild the cache with non-array leaves.
    k: Any
    v: Any
    positions: Any
    critical: Any
    threshold: Any
    index: Any

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        layers = config.num_hidden_layers
        shape = (layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            positions=jnp.full((batch, max_len), -1, jnp.int32),
            critical=jnp.zeros((layers, batch, max_len), bool),
            threshold=jnp.full((layers, batch), jnp.inf, jnp.float32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]
