"""Plain-jnp reference of `pallas_kernels.topk_attention`: each query's listed keys gathered, masked per slot by the
token rule, softmax in float32. Memory O(s * k * hkv * d); tests and the "reference" backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def slot_visible(
    indices: Int[Array, "b sq hi k"],
    q_positions: Int[Array, "b sq"],
    k_positions: Int[Array, "b sk"],
    q_segment_ids: Int[Array, "b sq"],
    k_segment_ids: Int[Array, "b sk"],
    *,
    causal: bool,
) -> Bool[Array, "b sq hi k"]:
    """Whether each slot holds a key its query may see: 0 <= index < sk, both positions >= 0 (negative: padding),
    equal segment ids, and (causal) key position <= query position."""
    sk = k_positions.shape[1]
    safe = jnp.clip(indices, 0, sk - 1)
    take = jax.vmap(lambda a, i: a[i])  # per batch row
    kp, ks = take(k_positions, safe), take(k_segment_ids, safe)
    qp, qs = q_positions[:, :, None, None], q_segment_ids[:, :, None, None]
    ok = (indices >= 0) & (indices < sk) & (kp >= 0) & (qp >= 0) & (ks == qs)
    return ok & (kp <= qp) if causal else ok


def topk_attention(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    indices: Int[Array, "b sq hi k"],
    q_positions: Int[Array, "b sq"],
    k_positions: Int[Array, "b sk"],
    q_segment_ids: Int[Array, "b sq"],
    k_segment_ids: Int[Array, "b sk"],
    *,
    causal: bool,
    sm_scale: float,
) -> Float[Array, "b sq hq d"]:
    """Reference of the kernel on normalised arguments (indices [b, sq, hi, k] with hi 1 or hkv; -1 = empty slot).
    Every slot counts: a key listed twice gets twice the weight. Rows with no visible slot give zeros."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    ok = slot_visible(indices, q_positions, k_positions, q_segment_ids, k_segment_ids, causal=causal)
    idx = jnp.broadcast_to(jnp.clip(indices, 0, k.shape[1] - 1), (b, sq, hkv, indices.shape[-1]))
    ok = jnp.broadcast_to(ok, idx.shape)
    heads = jnp.arange(hkv)[None, None, :, None]
    rows = jnp.arange(b)[:, None, None, None]
    kg = k.astype(jnp.float32)[rows, idx, heads]  # [b, sq, hkv, k, d]
    vg = v.astype(jnp.float32)[rows, idx, heads]
    qg = q.astype(jnp.float32).reshape(b, sq, hkv, hq // hkv, d)
    s = jnp.einsum("bqhgd,bqhkd->bqhgk", qg, kg) * sm_scale
    mask = ok[:, :, :, None, :]
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = p.sum(-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    out = jnp.einsum("bqhgk,bqhkd->bqhgd", p, vg)
    return out.reshape(b, sq, hq, d).astype(q.dtype)
