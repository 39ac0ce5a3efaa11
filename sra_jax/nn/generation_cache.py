"""The KV cache of one generation (`sra_jax.generate`, `sra_jax.evals.generation`): a `LeftPaddedKVCache` built
from the prompt lengths, wrapped for a model whose layers select per query (`SRAConfig.attention` "dsa": a
`DSACache`, which also caches the lightning indexer's keys; "nsa": an `NSACache`, which also caches the compressed
keys and values)."""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Array, Int

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn.cache import LeftPaddedKVCache, generation_capacity
from sra_jax.nn.dsa_cache import DSACache
from sra_jax.nn.nsa_cache import NSACache
from sra_jax.nn.per_query import uses_per_query

# What `generation_cache` returns.
GenerationCache = LeftPaddedKVCache | DSACache | NSACache


def per_query_layers(config: LlamaConfig, sra: SRAConfig | None) -> tuple[int, ...]:
    """The layers that run an NSAAttention / DSAAttention (`SRAConfig.attention` "nsa" / "dsa")."""
    return tuple(i for i in range(config.num_hidden_layers) if uses_per_query(sra, i))


def generation_cache(
    config: LlamaConfig,
    sra: SRAConfig | None,
    prompt_lengths: Int[Array, " b"] | Sequence[int],
    *,
    prompt_len: int,
    max_len: int,
    dtype,
) -> GenerationCache:
    """An empty cache for prompts of `prompt_lengths` tokens left-padded to `prompt_len` slots, filled by one
    prefill from slot 0 and then one token per call up to `max_len`. Its critical capacity is
    `generation_capacity` (so an SRA prefill gathers the critical keys). A model with DSA layers gets it wrapped in a
    `DSACache`, one with NSA layers in an `NSACache`."""
    kv = LeftPaddedKVCache.create(
        config, prompt_lengths, prompt_len=prompt_len, max_len=max_len, dtype=dtype,
        critical_capacity=generation_capacity(sra, prompt_len, max_len),
    )  # fmt: skip
    if not per_query_layers(config, sra):
        return kv
    if sra.attention == "dsa":
        return DSACache.wrap(kv, config, sra)
    return NSACache.wrap(kv, config, sra)
