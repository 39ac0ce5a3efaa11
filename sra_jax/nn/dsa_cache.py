"""`DSACache`: a `KVCache` plus the DSA lightning indexer's keys, for prefill + token-by-token decoding of a `Llama`
with DSA layers (`SRAConfig.attention == "dsa"`). It reads like a KVCache to `Llama` (batch, max_len, index,
positions, replace); dense layers use its `kv`, DSA layers write their keys, values and indexer keys and decode each
new token over its top_k cached keys (`ops.dsa.dsa_decode`). `DSACache.wrap` puts the indexer keys beside any empty
KVCache, e.g. the `LeftPaddedKVCache` of a generation (`sra_jax.nn.generation_cache`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn.cache import KVCache, forwarding_replace
from sra_jax.ops import dsa


@struct.dataclass
class DSACache:
    """kv       the KVCache of every layer's keys and values, slot positions and index
    index_k  [layers, batch, max_len, indexer_dim], the indexer key of each cached token (zero in non-DSA layers)"""

    kv: Any
    index_k: Any

    @classmethod
    def init(cls, config: LlamaConfig, sra: SRAConfig, batch: int, max_len: int, dtype=jnp.float32) -> DSACache:
        """An empty cache over a plain `KVCache.init` (positions from the caller)."""
        if sra.attention != "dsa":
            raise ValueError(f"DSACache is for SRAConfig.attention='dsa', got sra.attention={sra.attention!r}")
        return cls.wrap(KVCache.init(config, batch, max_len, dtype), config, sra)

    @classmethod
    def wrap(cls, kv: KVCache, config: LlamaConfig, sra: SRAConfig) -> DSACache:
        """`kv` (any empty `KVCache`, e.g. a `LeftPaddedKVCache` whose rows start at different slots) plus zero
        indexer keys of its dtype. The cache keeps `kv`'s rules: its positions (-1 in empty and padding slots,
        which are never keys) and, for a LeftPaddedKVCache, positions set from the slots."""
        if sra.attention != "dsa":
            raise ValueError(f"DSACache is for SRAConfig.attention='dsa', got sra.attention={sra.attention!r}")
        if not isinstance(kv, KVCache):
            raise ValueError(f"DSACache.wrap needs a KVCache, got kv of type {type(kv).__name__}")
        if kv.num_layers != config.num_hidden_layers:
            raise ValueError(f"DSACache.wrap: kv has {kv.num_layers} layers, the config {config.num_hidden_layers}")
        index_k = jnp.zeros((kv.num_layers, kv.batch, kv.max_len, sra.dsa.indexer_dim), kv.k.dtype)
        return cls(kv=kv, index_k=index_k)

    # What `Llama` reads of a cache, from `kv`.
    batch = property(lambda self: self.kv.batch)
    max_len = property(lambda self: self.kv.max_len)
    num_layers = property(lambda self: self.kv.num_layers)
    index = property(lambda self: self.kv.index)
    positions = property(lambda self: self.kv.positions)

    def next_positions(self, s: int):
        """Positions of the next `s` tokens when the caller gives none (the KVCache's rule)."""
        return self.kv.next_positions(s)


DSACache.replace = forwarding_replace(("index_k",))


def dsa_decode_layer(
    attn: Any,
    layer: int,
    x: Float[Array, "b s d"],
    positions: Int[Array, "b s"],
    cache: Any,
) -> tuple[Float[Array, "b s d"], DSACache]:
    """A DSAAttention layer's call with a cache: writes this call's keys, values and indexer keys at `cache.index`;
    a prefill (s > 1, from an empty cache) attends as the full forward does (a position < 0, e.g. left padding, is
    neither a query nor a key nor an indexer candidate), a decode step (s == 1) through `ops.dsa.dsa_decode` over
    the cached keys at the cache's slot positions (padding slots hold -1). Returns (output before o_proj's residual,
    updated cache)."""
    from sra_jax.nn.layers import project_qkv

    if not isinstance(cache, DSACache):
        raise ValueError(f"layer {layer} (DSAAttention) decodes with a DSACache (sra_jax.nn.dsa_cache.DSACache.init / "
                         f"DSACache.wrap, or sra_jax.nn.generation_cache.generation_cache), "
                         f"got {type(cache).__name__}")  # fmt: skip
    b, s, _ = x.shape
    if s > 1 and not isinstance(cache.index, jax.core.Tracer) and int(cache.index) != 0:
        raise ValueError(f"layer {layer} (DSAAttention): a call of {s} tokens must start at an empty cache (prefill), "
                         f"the cache holds {int(cache.index)}; decode later tokens one at a time")  # fmt: skip
    q, k, v = project_qkv(attn.config, attn.q_proj, attn.k_proj, attn.v_proj, x, positions)
    qi = attn.indexer_q(x).reshape(b, s, attn.indexer_heads, attn.indexer_dim)
    ki, wi = attn.indexer_k(x), attn.indexer_w(x)
    kv = cache.kv
    start = (jnp.int32(layer), jnp.int32(0), kv.index.astype(jnp.int32))
    kv = kv.replace(
        k=jax.lax.dynamic_update_slice(kv.k, k[None].astype(kv.k.dtype), (*start, 0, 0)),
        v=jax.lax.dynamic_update_slice(kv.v, v[None].astype(kv.v.dtype), (*start, 0, 0)),
    )
    index_k = jax.lax.dynamic_update_slice(cache.index_k, ki[None].astype(cache.index_k.dtype), (*start, 0))
    cache = cache.replace(kv=kv, index_k=index_k)
    if s > 1:
        idx, valid = attn.select(qi, ki, wi, positions)
        out = dsa.dsa_attention(q, k, v, idx, valid, positions, None, impl=attn.impl, block_q=attn.block_q)
    else:
        lengths = jnp.broadcast_to(kv.index.astype(jnp.int32) + 1, (b,))
        out, _, _ = dsa.dsa_decode(
            q, kv.k[layer].astype(q.dtype), kv.v[layer].astype(q.dtype), index_k[layer].astype(qi.dtype), qi, wi,
            lengths, top_k=attn.top_k, slot_positions=kv.positions, impl=attn.impl,
        )  # fmt: skip
    return attn.o_proj(out.reshape(b, s, -1)), cache
