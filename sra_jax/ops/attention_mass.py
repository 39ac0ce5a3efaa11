"""Attention mass each key receives: column sums of the dense causal attention probabilities, weighted per query and
summed over heads, without an [s, s] array.

`mass[b, j] = sum_t w[b, t] * sum_h softmax_h(t)[j]`, the softmax over the keys query t may see (causal by position,
padding, segments). With `window` / `num_global` only the pairs outside the SRA rule's static part count (key not in
the query's window, not a global token): the mass a critical set must supply, since the rest every query sees anyway
(the softmax itself still runs over every visible key). It is the target of the router distillation (`sra_jax.train.objectives`, term
"router_distill"): the keys the dense model reads are the ones the router should make critical.
`attention_mass_reference` builds the probabilities; `attention_mass` walks query blocks of `block_q`, each block's
probabilities recomputed from q, k and the per-query logsumexp (`query_logsumexp`, also blockwise), so memory is
O(b * block_q * hq * s). Both are distillation targets and carry no gradient.

Conventions as `sra_jax.ops.nsa`: q [b, s, hq, d], k [b, s, hkv, d] (GQA: hq a multiple of hkv), positions -1 on
padding, segment_ids for packed rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sra_jax.ops.nsa import masked_attention, token_mask


def _check(q: Array, k: Array, positions: Array, segment_ids: Array | None, query_weights: Array | None) -> None:
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be [b, s, hq, d] and k [b, s, hkv, d], got {q.shape}, {k.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    for name, x in (("positions", positions), ("segment_ids", segment_ids), ("query_weights", query_weights)):
        if x is not None and x.shape != q.shape[:2]:
            raise ValueError(f"{name} must be [b, s] = {q.shape[:2]}, got {x.shape}")


def _check_rule(window: int | None, num_global: int) -> None:
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
    if not isinstance(num_global, int) or num_global < 0:
        raise ValueError(f"num_global must be an integer >= 0, got {num_global!r}")


def _counted(q_positions, k_positions, window: int | None, num_global: int):
    """[b, q, k]: pairs outside the query's window and the global tokens (all pairs without a rule)."""
    qp, kp = q_positions[:, :, None], k_positions[:, None, :]
    counted = kp >= num_global
    if window is not None:
        counted &= qp - kp >= window
    return counted


def _weights(positions: Int[Array, "b s"], query_weights: Float[Array, "b s"] | None) -> Float[Array, "b s"]:
    """Every valid query with weight 1 unless `query_weights` says otherwise (padding queries always 0)."""
    w = jnp.ones(positions.shape, jnp.float32) if query_weights is None else query_weights.astype(jnp.float32)
    return jnp.where(positions >= 0, w, 0.0)


def attention_mass_reference(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
    query_weights: Float[Array, "b s"] | None = None,
    *,
    window: int | None = None,
    num_global: int = 0,
    sm_scale: float | None = None,
) -> Float[Array, "b s"]:
    """The attention mass of every key from the dense [b, hq, s, s] probabilities (O(s^2) memory)."""
    _check(q, k, positions, segment_ids, query_weights)
    _check_rule(window, num_global)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    _, p = masked_attention(q, k, k, token_mask(positions, positions, segment_ids), sm_scale=sm_scale)
    p = jnp.where(_counted(positions, positions, window, num_global)[:, None], p, 0.0)
    return jnp.einsum("bhqk,bq->bk", p, _weights(positions, query_weights))


def _query_blocks(x: Array, block_q: int, fill) -> Array:
    """x [b, s, ...] padded with `fill` to a multiple of block_q, as [s / block_q, b, block_q, ...]."""
    b, s = x.shape[:2]
    pad = -s % block_q
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(b, (s + pad) // block_q, block_q, *x.shape[2:]), 1, 0)


def _block_logits(qb, k, pb, sb, positions, segment_ids, scale):
    """Scores [b, bq, hkv, g, s] of a query block and whether each (query, key) pair is visible [b, bq, 1, 1, s]."""
    b, bq, hq, d = qb.shape
    hkv = k.shape[2]
    qg = qb.reshape(b, bq, hkv, hq // hkv, d)
    logits = jnp.einsum("bqhgd,bkhd->bqhgk", qg, k, preferred_element_type=jnp.float32) * scale
    visible = token_mask(pb, positions, sb, segment_ids)[:, :, None, None, :]
    return logits, visible


def query_logsumexp(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
    *,
    block_q: int = 64,
    sm_scale: float | None = None,
) -> Float[Array, "b s hq"]:
    """Each query's logsumexp of its visible scores (the softmax normaliser), by query blocks; -inf for a query that
    sees no key (padding)."""
    _check(q, k, positions, segment_ids, None)
    if block_q < 1:
        raise ValueError(f"block_q must be >= 1, got {block_q}")
    b, s, hq, d = q.shape
    scale = d**-0.5 if sm_scale is None else sm_scale
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    q = jax.lax.stop_gradient(q)
    k = jax.lax.stop_gradient(k)

    def step(args):
        qb, pb, sb = args
        logits, visible = _block_logits(qb, k, pb, sb, positions, seg, scale)
        return jax.nn.logsumexp(jnp.where(visible, logits, -jnp.inf), axis=-1).reshape(b, -1, hq)

    xs = tuple(_query_blocks(x, block_q, f) for x, f in ((q, 0), (positions, -1), (seg, 0)))
    out = jax.lax.map(step, xs)  # [nb, b, bq, hq]
    return jnp.moveaxis(out, 0, 1).reshape(b, -1, hq)[:, :s]


def attention_mass(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    lse: Float[Array, "b s hq"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
    query_weights: Float[Array, "b s"] | None = None,
    *,
    window: int | None = None,
    num_global: int = 0,
    block_q: int = 64,
    sm_scale: float | None = None,
) -> Float[Array, "b s"]:
    """The attention mass of every key, accumulated over query blocks of `block_q` from q, k and each query's
    logsumexp `lse` (`query_logsumexp`): equals `attention_mass_reference` without the [s, s] array."""
    _check(q, k, positions, segment_ids, query_weights)
    _check_rule(window, num_global)
    if block_q < 1:
        raise ValueError(f"block_q must be >= 1, got {block_q}")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be [b, s, hq] = {q.shape[:3]}, got {lse.shape}")
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    q, k, lse = (jax.lax.stop_gradient(x) for x in (q, k, lse))
    w = _weights(positions, query_weights)
    # A query that sees nothing has lse -inf: give it 0 so exp() below stays finite (its pairs are all masked).
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0).reshape(b, s, hkv, hq // hkv)

    def step(total, args):
        qb, lb, wb, pb, sb = args
        logits, visible = _block_logits(qb, k, pb, sb, positions, seg, scale)
        counted = visible & _counted(pb, positions, window, num_global)[:, :, None, None, :]
        p = jnp.where(counted, jnp.exp(logits - lb[..., None]), 0.0)
        return total + jnp.einsum("bqhgk,bq->bk", p, wb), None

    xs = tuple(_query_blocks(x, block_q, f) for x, f in ((q, 0), (lse, 0.0), (w, 0.0), (positions, -1), (seg, 0)))
    total, _ = jax.lax.scan(step, jnp.zeros((b, s), jnp.float32), xs)
    return total


__all__ = ["attention_mass", "attention_mass_reference", "query_logsumexp"]
