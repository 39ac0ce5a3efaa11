"""Plain-jnp references for every kernel: dense masked softmax in float32 (O(N^2) memory; tests only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.block_sparse.layout import BlockLayout
from pallas_kernels.block_sparse.token_mask import MaskRule, TokenInfo, make_rule_and_tokens, token_mask


def masked_attention(q, k, v, mask, sm_scale: float) -> Array:
    """Dense attention with a [b, h|1, q, k] bool mask; rows with nothing visible give zeros (and zero grads).
    Masked keys are excluded with where(), never multiplied by 0: a non-finite key or value gives NaN in exactly
    the rows that can see it."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    bad = ~(jnp.isfinite(k) & jnp.isfinite(v)).all(-1)  # [b, sk, hkv]
    k = jnp.where(bad[..., None], 0, k)
    v = jnp.where(bad[..., None], 0, v)
    qg = q.astype(jnp.float32).reshape(b, sq, hkv, hq // hkv, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * sm_scale
    mask = (
        mask.reshape(b, -1, 1, sq, k.shape[1])
        if mask.shape[1] in (1, hkv)
        else mask.reshape(b, hkv, hq // hkv, sq, k.shape[1])
    )
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = p.sum(-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
    sees_bad = jnp.any(mask & bad.transpose(0, 2, 1)[:, :, None, None, :], axis=-1)  # [b, hkv, g|1, q]
    sees_bad = jnp.broadcast_to(sees_bad, (b, hkv, hq // hkv, sq)).transpose(0, 3, 1, 2)[..., None]
    out = jnp.where(sees_bad, jnp.nan, out)
    return out.reshape(b, sq, hq, d).astype(q.dtype)


def layout_token_mask(layout: BlockLayout, rule: MaskRule, tokens: TokenInfo):
    """[b, h, q, k] token mask the kernels compute: visited blocks of the layout AND the token rule."""
    visited, _ = layout.to_block_mask()
    block = jnp.repeat(jnp.repeat(visited, layout.block_q, axis=2), layout.block_k, axis=3)
    sq, sk = tokens.q_positions.shape[1], tokens.k_positions.shape[1]
    return block[:, :, :sq, :sk] & token_mask(rule, tokens)[:, None]


def block_sparse_attention(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    layout: BlockLayout,
    *,
    causal: bool = True,
    window: int | None = None,
    num_global: int = 0,
    q_positions: Int[Array, "b sq"] | None = None,
    k_positions: Int[Array, "b sk"] | None = None,
    segment_ids: Int[Array, "b sq"] | None = None,
    k_segment_ids: Int[Array, "b sk"] | None = None,
    q_critical: Array | None = None,
    k_critical: Array | None = None,
    sm_scale: float | None = None,
) -> Float[Array, "b sq hq d"]:
    """Reference of `pallas_kernels.block_sparse_attention` (same arguments)."""
    rule, tokens = make_rule_and_tokens(
        q,
        k,
        causal=causal,
        window=window,
        num_global=num_global,
        q_positions=q_positions,
        k_positions=k_positions,
        segment_ids=segment_ids,
        k_segment_ids=k_segment_ids,
        q_critical=q_critical,
        k_critical=k_critical,
    )
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    return masked_attention(q, k, v, layout_token_mask(layout, rule, tokens), scale)


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
