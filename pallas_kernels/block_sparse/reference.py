"""Plain-jnp references of the block-sparse kernels: dense masked softmax in float32 (O(N^2) memory; tests and the
"reference" backend)."""

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
