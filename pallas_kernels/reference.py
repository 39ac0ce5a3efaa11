"""Plain-jnp references for every kernel: dense masked softmax in float32 (O(N^2) memory; tests only). The
block-sparse and top-k references live beside their kernels (`pallas_kernels.block_sparse.reference`,
`pallas_kernels.topk.reference`) and are reached from here with the public arguments."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.block_sparse.reference import block_sparse_attention, layout_token_mask, masked_attention
from pallas_kernels.topk import api as topk_api

__all__ = [
    "block_sparse_attention",
    "decode_visible",
    "layout_token_mask",
    "masked_attention",
    "sparse_decode_attention",
    "topk_attention",
]


def decode_visible(
    lengths, num_new: int, cache_len: int, *, window: int, num_global: int, critical_indices, kv_start=None
):
    """[b, t, L] visibility of cache slots for the new tokens (slots lengths - num_new + t). Slots before kv_start
    (default 0) are left padding: never visible, and a new token there sees nothing. Sinks are slots kv_start ..
    kv_start + num_global - 1; critical_indices are slots (a set: repeats, -1 and out-of-range entries are inert)."""
    b = lengths.shape[0]
    start = jnp.zeros((b,), jnp.int32) if kv_start is None else jnp.maximum(kv_start, 0)
    start = start[:, None, None]
    slot = jnp.arange(cache_len)[None, None, :]
    q_slot = (lengths[:, None] - num_new + jnp.arange(num_new)[None, :])[:, :, None]
    critical = jnp.zeros((b, cache_len + 1), bool)
    if critical_indices is not None:
        idx = jnp.where((critical_indices >= 0) & (critical_indices < cache_len), critical_indices, cache_len)
        critical = critical.at[jnp.arange(b)[:, None], idx].set(True)
    critical = critical[:, None, :cache_len]
    keep = (q_slot - slot < window) | (slot < start + num_global) | critical
    return (slot <= q_slot) & (slot >= start) & keep


def sparse_decode_attention(
    q: Float[Array, "b t hq d"],
    k_cache: Float[Array, "b L hkv d"],
    v_cache: Float[Array, "b L hkv d"],
    lengths: Int[Array, " b"],
    *,
    window: int,
    num_global: int = 0,
    critical_indices: Int[Array, "b c"] | None = None,
    critical_counts: Int[Array, " b"] | None = None,
    kv_start: Int[Array, " b"] | None = None,
    sm_scale: float | None = None,
) -> Float[Array, "b t hq d"]:
    """Reference of `pallas_kernels.sparse_decode_attention` (same arguments)."""
    if critical_counts is not None:
        used = jnp.arange(critical_indices.shape[1])[None, :] < critical_counts[:, None]
        critical_indices = jnp.where(used, critical_indices, -1)
    mask = decode_visible(
        lengths,
        q.shape[1],
        k_cache.shape[1],
        window=window,
        num_global=num_global,
        critical_indices=critical_indices,
        kv_start=kv_start,
    )
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    return masked_attention(q, k_cache, v_cache, mask[:, None], scale)


def topk_attention(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    indices: Int[Array, "b sq k"] | Int[Array, "b sq hkv k"],
    **kwargs,
) -> Float[Array, "b sq hq d"]:
    """Reference of `pallas_kernels.topk_attention` (same arguments): its gathered-jnp backend."""
    return topk_api.topk_attention(q, k, v, indices, backend="reference", **kwargs)
