"""DeepSeek Sparse Attention (DeepSeek-V3.2) in pure jnp: the lightning indexer
`I[t, s] = sum_j w[t, j] * ReLU(q_idx[t, j] . k_idx[s])`, per-query top-k keys (causal, shared by all heads),
attention over each query's selected keys (a dense masked reference and a gather implementation with memory
O(s * k)), and the indexer's warm-up loss: KL from the dense attention distribution (summed over heads,
L1-normalised) to the indexer's softmax, with the main model's attention stopped from receiving its gradient.

Conventions as `sra_jax.ops.nsa`: q [b, s, hq, d], k/v [b, s, hkv, d], positions -1 for padding, segment_ids for
packed sequences, causality by position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sra_jax.ops.nsa import check_gqa, masked_attention, masked_softmax, token_mask


def indexer_scores(
    q_idx: Float[Array, "b s hi di"],
    k_idx: Float[Array, "b s di"],
    w_idx: Float[Array, "b s hi"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
) -> Float[Array, "b s s"]:
    """Lightning indexer scores, -inf where the key is not visible (future, padding, other segment)."""
    if q_idx.ndim != 4 or k_idx.ndim != 3 or w_idx.shape != q_idx.shape[:3] or k_idx.shape[-1] != q_idx.shape[-1]:
        raise ValueError(
            f"q_idx [b, s, hi, di], k_idx [b, s, di], w_idx [b, s, hi] expected, got "
            f"{q_idx.shape}, {k_idx.shape}, {w_idx.shape}"
        )
    dots = jax.nn.relu(jnp.einsum("bthd,bsd->bths", q_idx, k_idx, preferred_element_type=jnp.float32))
    scores = jnp.einsum("bths,bth->bts", dots, w_idx.astype(jnp.float32))
    return jnp.where(token_mask(positions, positions, segment_ids), scores, -jnp.inf)


def top_k_keys(scores: Float[Array, "b s s"], top_k: int) -> tuple[Int[Array, "b s k"], Bool[Array, "b s k"]]:
    """Indices of each query's top_k visible keys and whether each slot holds a visible key (fewer than top_k
    visible keys leave invalid slots). The selection carries no gradient."""
    if not 1 <= top_k:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    kk = min(top_k, scores.shape[-1])
    vals, idx = jax.lax.top_k(jax.lax.stop_gradient(scores), kk)
    return idx.astype(jnp.int32), vals > -jnp.inf


def selection_mask(idx: Int[Array, "b s k"], valid: Bool[Array, "b s k"], num_keys: int) -> Bool[Array, "b s sk"]:
    """Token mask of the selected keys."""
    return (jax.nn.one_hot(idx, num_keys, dtype=jnp.bool_) & valid[..., None]).any(-2)


def dsa_attention_reference(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    v: Float[Array, "b s hkv d"],
    idx: Int[Array, "b s k"],
    valid: Bool[Array, "b s k"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
) -> Float[Array, "b s hq d"]:
    """Attention over each query's selected keys: dense masked reference, O(s^2) memory."""
    m = selection_mask(idx, valid, k.shape[1]) & token_mask(positions, positions, segment_ids)
    return masked_attention(q, k, v, m)[0]


def dsa_attention_gather(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    v: Float[Array, "b s hkv d"],
    idx: Int[Array, "b s k"],
    valid: Bool[Array, "b s k"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
    *,
    block_q: int = 64,
    sm_scale: float | None = None,
) -> Float[Array, "b s hq d"]:
    """Attention over each query's selected keys by gathering them: query blocks of block_q run one after another
    (lax.map, rematerialised in the backward pass), each gathering its queries' k keys, so memory is
    O(block_q * k * hkv * d) per step and O(s * k) overall instead of O(s^2). Each slot is also masked per token
    (causal, padding, segment), so any index list is safe. Equals `dsa_attention_reference` (plain autodiff)."""
    check_gqa(q, k, v)
    b, s, hq, d = q.shape
    hkv, kk = k.shape[2], idx.shape[-1]
    if idx.shape != (b, s, kk) or valid.shape != idx.shape:
        raise ValueError(f"idx and valid must be [{b}, {s}, k], got {idx.shape}, {valid.shape}")
    if block_q < 1:
        raise ValueError(f"block_q must be >= 1, got {block_q}")
    scale = d**-0.5 if sm_scale is None else sm_scale
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    pad = -s % block_q
    nb = (s + pad) // block_q

    def blocks(x, fill):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(b, nb, block_q, *x.shape[2:]), 1, 0)

    xs = (blocks(q, 0), blocks(idx, 0), blocks(valid, False), blocks(positions, -1), blocks(seg, 0))
    take = jax.vmap(lambda a, i: a[i])  # per batch row: [s, ...] gathered at [bq, k]

    @jax.checkpoint
    def step(args):
        qb, ib, vb, pb, sb = args
        kg, vg = take(k, ib), take(v, ib)  # [b, bq, k, hkv, d]
        kp, ksg = take(positions, ib), take(seg, ib)
        ok = vb & (pb[..., None] >= 0) & (kp >= 0) & (kp <= pb[..., None]) & (ksg == sb[..., None])
        qg = qb.reshape(b, block_q, hkv, hq // hkv, d)
        logits = jnp.einsum("bqhgd,bqkhd->bqhgk", qg, kg, preferred_element_type=jnp.float32) * scale
        p = masked_softmax(logits, ok[:, :, None, None, :])
        return jnp.einsum("bqhgk,bqkhd->bqhgd", p.astype(v.dtype), vg).reshape(b, block_q, hq, d)

    out = jax.lax.map(step, xs)  # [nb, b, bq, hq, d]
    return jnp.moveaxis(out, 0, 1).reshape(b, nb * block_q, hq, d)[:, :s]


def indexer_kl_loss(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    scores: Float[Array, "b s s"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
) -> Float[Array, ""]:
    """Warm-up loss of the indexer: mean over valid queries of KL(p_target || softmax(scores)), p_target the dense
    attention distribution of q, k summed over heads and L1-normalised. q and k get no gradient from it."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    mask = token_mask(positions, positions, segment_ids)
    _, p = masked_attention(q, k, k, mask)  # values unused: only the probabilities
    t = p.sum(1)
    t = t / jnp.maximum(t.sum(-1, keepdims=True), 1e-30)
    logq = jax.nn.log_softmax(jnp.where(mask, scores, -1e30), axis=-1)  # finite fill: empty rows stay nan-free
    kl = jnp.where(mask & (t > 0), t * (jnp.log(jnp.where(t > 0, t, 1.0)) - jnp.where(mask, logq, 0.0)), 0.0).sum(-1)
    rows = mask.any(-1)
    return jnp.where(rows, kl, 0.0).sum() / jnp.maximum(rows.sum(), 1)
