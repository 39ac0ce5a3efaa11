"""`NSACache`: a `KVCache` plus every NSA layer's compressed keys/values, for prefill + token-by-token decoding of
a `Llama` with NSA layers (`SRAConfig.attention == "nsa"`). It reads like a KVCache to `Llama` (batch, max_len,
index, positions, next_positions, replace); dense layers use its `kv`, NSA layers write their keys and values, keep
the compressed block each token completes (a token's block selection is its own, so no other selection state is
kept) and decode each new token through `ops.nsa.nsa_decode_step` (by position: a `LeftPaddedKVCache` whose rows
have different pad lengths decodes each row as it decodes alone)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn.cache import KVCache, forwarding_replace
from sra_jax.ops import nsa


@struct.dataclass
class NSACache:
    """kv       the KVCache (or LeftPaddedKVCache) of every layer's keys and values, slot positions and index
    cmp_k, cmp_v [layers, batch, max_blocks, kv_heads, head_dim]: compressed block c of a row pools its positions
             [c*stride, c*stride + block) (`ops.nsa.compress`); max_blocks = `ops.nsa.num_cache_blocks(max_len)`
    cmp_end  [layers, batch, max_blocks] int32, the last position of each stored block, -1 while incomplete
    Non-NSA layers leave their rows of the NSA fields at their initial values."""

    kv: Any
    cmp_k: Any
    cmp_v: Any
    cmp_end: Any

    @classmethod
    def init(cls, config: LlamaConfig, sra: SRAConfig, batch: int, max_len: int, dtype=jnp.float32) -> NSACache:
        """An empty cache over a fresh `KVCache.init(config, batch, max_len, dtype)`."""
        _check_nsa(sra)
        return cls.wrap(KVCache.init(config, batch, max_len, dtype), config, sra)

    @classmethod
    def wrap(cls, kv: KVCache, config: LlamaConfig, sra: SRAConfig) -> NSACache:
        """An NSACache around an empty `kv` (a KVCache or a LeftPaddedKVCache, whose layout it keeps); the NSA
        fields take kv's batch, max_len and dtype."""
        _check_nsa(sra)
        if not isinstance(kv, KVCache):
            raise ValueError(f"NSACache.wrap needs a KVCache or LeftPaddedKVCache, got kv={type(kv).__name__}")
        expected = (config.num_hidden_layers, kv.batch, kv.max_len, config.num_key_value_heads, config.head_dim)
        if tuple(kv.k.shape) != expected:
            raise ValueError(f"NSACache.wrap: kv.k has shape {tuple(kv.k.shape)}, the config needs {expected}")
        layers, b, _, hkv, hd = expected
        nc = nsa.num_cache_blocks(kv.max_len, block=sra.nsa.block, stride=sra.nsa.stride)
        return cls(
            kv=kv,
            cmp_k=jnp.zeros((layers, b, nc, hkv, hd), kv.k.dtype),
            cmp_v=jnp.zeros((layers, b, nc, hkv, hd), kv.v.dtype),
            cmp_end=jnp.full((layers, b, nc), -1, jnp.int32),
        )

    # What `Llama` reads of a cache, from `kv`.
    batch = property(lambda self: self.kv.batch)
    max_len = property(lambda self: self.kv.max_len)
    num_layers = property(lambda self: self.kv.num_layers)
    index = property(lambda self: self.kv.index)
    positions = property(lambda self: self.kv.positions)

    def next_positions(self, s: int):
        """Positions of the next `s` tokens when the caller gives none (the inner cache's rule)."""
        return self.kv.next_positions(s)


def _check_nsa(sra: SRAConfig) -> None:
    if sra is None or sra.attention != "nsa":
        raise ValueError(f"NSACache is for SRAConfig.attention='nsa', got sra.attention="
                         f"{None if sra is None else sra.attention!r}")  # fmt: skip


NSACache.replace = forwarding_replace(("cmp_k", "cmp_v", "cmp_end"))


def nsa_decode_layer(
    attn: Any,
    layer: int,
    x: Float[Array, "b s d"],
    positions: Int[Array, "b s"],
    cache: Any,
) -> tuple[Float[Array, "b s d"], NSACache]:
    """An NSAAttention layer's call with a cache: writes this call's keys and values at `cache.index`; a prefill
    (s > 1, from an empty cache) attends as the forward does on each row's positions (`ops.nsa.nsa_prefill`) and
    stores every complete compressed block, a decode step (s == 1) stores the block its token completes and attends
    through `ops.nsa.nsa_decode_step`. Returns (output after o_proj, updated cache)."""
    from sra_jax.nn.layers import project_qkv

    if not isinstance(cache, NSACache):
        raise ValueError(f"layer {layer} (NSAAttention) decodes with an NSACache (sra_jax.nn.nsa_cache.NSACache.init "
                         f"or .wrap), got {type(cache).__name__}")  # fmt: skip
    b, s, _ = x.shape
    if s > 1 and not isinstance(cache.index, jax.core.Tracer) and int(cache.index) != 0:
        raise ValueError(f"layer {layer} (NSAAttention): a call of {s} tokens must start at an empty cache (prefill), "
                         f"the cache holds {int(cache.index)}; decode later tokens one at a time")  # fmt: skip
    nc = nsa.num_cache_blocks(cache.max_len, block=attn.block, stride=attn.stride)
    if cache.cmp_k.shape[2] != nc:
        raise ValueError(f"layer {layer} (NSAAttention): the NSACache holds {cache.cmp_k.shape[2]} compressed "
                         f"blocks, this layer's settings need {nc}: build the cache with the model's SRAConfig")  # fmt: skip
    q, k, v = project_qkv(attn.config, attn.q_proj, attn.k_proj, attn.v_proj, x, positions)
    gates = attn.gates(x)
    kv = cache.kv
    start = (jnp.int32(layer), jnp.int32(0), kv.index.astype(jnp.int32))
    kv = kv.replace(
        k=jax.lax.dynamic_update_slice(kv.k, k[None].astype(kv.k.dtype), (*start, 0, 0)),
        v=jax.lax.dynamic_update_slice(kv.v, v[None].astype(kv.v.dtype), (*start, 0, 0)),
    )
    settings = dict(**attn.compression_params(), block=attn.block, stride=attn.stride, block_sel=attn.block_sel,
                    top_n=attn.top_n, window=attn.window)  # fmt: skip
    if s > 1:
        out, ck, cv, ce = nsa.nsa_prefill(
            q, k, v, gates, positions, max_len=cache.max_len, selected_fn=attn.selected_fn(None), **settings
        )
    else:
        out, (ck, cv, ce) = nsa.nsa_decode_step(
            q, kv.k[layer].astype(q.dtype), kv.v[layer].astype(q.dtype), gates, positions, kv.positions,
            kv.index.astype(jnp.int32), cache.cmp_k[layer], cache.cmp_v[layer], cache.cmp_end[layer], **settings,
        )  # fmt: skip
    cache = cache.replace(
        kv=kv,
        cmp_k=cache.cmp_k.at[layer].set(ck.astype(cache.cmp_k.dtype)),
        cmp_v=cache.cmp_v.at[layer].set(cv.astype(cache.cmp_v.dtype)),
        cmp_end=cache.cmp_end.at[layer].set(ce),
    )
    return attn.o_proj(out.reshape(b, s, -1)), cache
