"""DeepSeek Sparse Attention (DeepSeek-V3.2) in pure jnp: the lightning indexer
`I[t, s] = sum_j w[t, j] * ReLU(q_idx[t, j] . k_idx[s])`, per-query top-k keys (causal, shared by all heads),
attention over each query's selected keys (`dsa_attention`: a dense masked reference, a jnp gather with memory
O(s * k), and the Pallas top-k gather kernel `pallas_kernels.topk_attention`), the indexer's losses (the warm-up
KL from the dense attention distribution, summed over heads and L1-normalised, to the indexer's softmax, and the
sparse-stage KL over each query's selected keys; the main model's q and k get no gradient from either), the
indexer top-k that never builds the [s, s] score array (sort-free threshold select per query chunk, or a streaming
sort-merge over key blocks), and one-token decode over a cache.

Ties in every top-k here go to the lower key index (`jax.lax.top_k`'s rule), so every selection here picks the same
keys as the one-shot `top_k_keys`.

Conventions as `sra_jax.ops.nsa`: q [b, s, hq, d], k/v [b, s, hkv, d], positions -1 for padding, segment_ids for
packed sequences, causality by position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, UInt32

from pallas_kernels.topk import topk_attention
from sra_jax.ops.nsa import SELECTED_IMPLS, check_gqa, masked_attention, masked_softmax, resolve_impl, token_mask

DSA_IMPLS = SELECTED_IMPLS


def indexer_scores(
    q_idx: Float[Array, "b s hi di"],
    k_idx: Float[Array, "b s di"],
    w_idx: Float[Array, "b s hi"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
) -> Float[Array, "b s s"]:
    """Lightning indexer scores, -inf where the key is not visible (future, padding, other segment). O(s^2) memory:
    `indexer_top_k` gives the same selection without this array."""
    _check_indexer(q_idx, k_idx, w_idx)
    return jnp.where(token_mask(positions, positions, segment_ids), _indexer_logits(q_idx, k_idx, w_idx), -jnp.inf)


def _check_indexer(q_idx, k_idx, w_idx):
    if q_idx.ndim != 4 or k_idx.ndim != 3 or w_idx.shape != q_idx.shape[:3] or k_idx.shape[-1] != q_idx.shape[-1]:
        raise ValueError(
            f"q_idx [b, s, hi, di], k_idx [b, s, di], w_idx [b, s, hi] expected, got "
            f"{q_idx.shape}, {k_idx.shape}, {w_idx.shape}"
        )


def _indexer_logits(q_idx, k_idx, w_idx):
    """[b, t, s] = sum_j w[t, j] * ReLU(q_idx[t, j] . k_idx[s]) in float32 (k_idx may be any set of keys)."""
    dots = jax.nn.relu(jnp.einsum("bthd,bsd->bths", q_idx, k_idx, preferred_element_type=jnp.float32))
    return jnp.einsum("bths,bth->bts", dots, w_idx.astype(jnp.float32))


def top_k_keys(scores: Float[Array, "b t s"], top_k: int) -> tuple[Int[Array, "b t k"], Bool[Array, "b t k"]]:
    """Indices of each query's top_k visible keys and whether each slot holds a visible key (fewer than top_k
    visible keys leave invalid slots). The selection carries no gradient."""
    if not 1 <= top_k:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    kk = min(top_k, scores.shape[-1])
    vals, idx = jax.lax.top_k(jax.lax.stop_gradient(scores), kk)
    return idx.astype(jnp.int32), vals > -jnp.inf


INDEXER_TOPK_IMPLS = ("threshold", "sort")
RADIX_BITS = (1, 2, 4)  # bits per bisection pass: 2**bits - 1 compare-and-count sums each, 32 / bits passes
QUERY_CHUNK_ELEMENTS = 2**23  # default bound of b * query_chunk * s: the [b, chunk, s] scores of one step (32 MiB)


def default_query_chunk(batch: int, seq: int) -> int:
    """`indexer_top_k_threshold`'s query chunk when none is given: the largest with batch * chunk * seq <=
    QUERY_CHUNK_ELEMENTS (at least 1, at most seq), so one step's scores stay about the size of a GPU's L2 cache."""
    return max(1, min(seq, QUERY_CHUNK_ELEMENTS // (batch * seq)))


def indexer_top_k(
    q_idx: Float[Array, "b s hi di"],
    k_idx: Float[Array, "b s di"],
    w_idx: Float[Array, "b s hi"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
    *,
    top_k: int,
    block_k: int = 1024,
    impl: str = "threshold",
    query_chunk: int | None = None,
    radix_bits: int = 2,
) -> tuple[Int[Array, "b s k"], Bool[Array, "b s k"]]:
    """The keys of `top_k_keys(indexer_scores(...), top_k)` without the [s, s] array: the same set of keys per query
    (ties to the lower key index, invalid slots holding the lowest-index keys scored -inf) and the same valid mask.
    impl:
    - "threshold" (`indexer_top_k_threshold`): query chunks of query_chunk, each query's k-th largest score found
      exactly by radix bisection and the keys extracted by a cumulative-sum compaction (sort-free); the slots hold
      the keys in ascending key index (not by score).
    - "sort": the keys stream past in blocks of block_k and each query keeps its running best top_k, merged with
      each block by one sort on (score descending, key index ascending), so memory is O(s * (top_k + block_k)); the
      slots hold the keys by descending score, as `top_k_keys` does. Seeds of the running lists carry indices past
      every key, so they lose every tie with a real key.
    block_k applies to "sort" only, query_chunk and radix_bits to "threshold". Every consumer of a selection
    (`dsa_attention`, `indexer_kl_loss_selected`, `dsa_pair_counts`) is invariant to the order of the slots."""
    _check_indexer(q_idx, k_idx, w_idx)
    if impl not in INDEXER_TOPK_IMPLS:
        raise ValueError(f"impl {impl!r} not in {INDEXER_TOPK_IMPLS}")
    if impl == "threshold":
        return indexer_top_k_threshold(
            q_idx, k_idx, w_idx, positions, segment_ids, top_k=top_k, query_chunk=query_chunk, radix_bits=radix_bits
        )
    if top_k < 1 or block_k < 1:
        raise ValueError(f"top_k and block_k must be >= 1, got {top_k}, {block_k}")
    b, s = positions.shape
    kk, block_k = min(top_k, s), min(block_k, s)
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    pad = -s % block_k
    nb = (s + pad) // block_k
    k_blocks = jnp.pad(k_idx, [(0, 0), (0, pad), (0, 0)]).reshape(b, nb, block_k, -1).swapaxes(0, 1)
    pos_blocks = jnp.pad(positions, [(0, 0), (0, pad)], constant_values=-1).reshape(b, nb, block_k).swapaxes(0, 1)
    seg_blocks = jnp.pad(seg, [(0, 0), (0, pad)]).reshape(b, nb, block_k).swapaxes(0, 1)

    def merge(carry, blk):
        vals, idx = carry
        j, kb, pb, sb = blk
        scores = _indexer_logits(q_idx, kb, w_idx)
        scores = jnp.where(token_mask(positions, pb, seg, sb), scores, -jnp.inf)
        keys = jnp.broadcast_to(j * block_k + jnp.arange(block_k, dtype=jnp.int32), scores.shape)
        neg, ids = jax.lax.sort((jnp.concatenate([-vals, -scores], -1), jnp.concatenate([idx, keys], -1)), num_keys=2)
        return (-neg[..., :kk], ids[..., :kk]), None

    seed_ids = jnp.broadcast_to(s + pad + jnp.arange(kk, dtype=jnp.int32), (b, s, kk))
    init = (jnp.full((b, s, kk), -jnp.inf, jnp.float32), seed_ids)
    (vals, idx), _ = jax.lax.scan(merge, init, (jnp.arange(nb), k_blocks, pos_blocks, seg_blocks))
    return jax.lax.stop_gradient(idx), vals > -jnp.inf


def order_key(x: Float[Array, "*shape"]) -> UInt32[Array, "*shape"]:
    """The order-preserving uint32 image of float32 values: x < y iff order_key(x) < order_key(y) in the total order
    `jax.lax.top_k` uses (-inf lowest, -0.0 just below +0.0)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def kth_largest_key(u: UInt32[Array, "*rows n"], kk: int, radix_bits: int = 2) -> UInt32[Array, "*rows"]:
    """The kk-th largest value of u [..., n] (uint32, kk <= n) per row, exactly: 32 / radix_bits passes, each
    fixing the next radix_bits bits of the answer from 2**radix_bits - 1 compare-and-count sums over the row (no
    sort, no histogram scatter)."""
    if radix_bits not in RADIX_BITS:
        raise ValueError(f"radix_bits must be one of {RADIX_BITS}, got {radix_bits}")
    if not 1 <= kk <= u.shape[-1]:
        raise ValueError(f"kk must be in [1, {u.shape[-1]}], got {kk}")
    t = jnp.zeros(u.shape[:-1], jnp.uint32)  # invariant: at least kk values >= t
    for p in range(32 // radix_bits):  # unrolled: a while loop on GPU syncs with the host every step
        shift = 32 - radix_bits * (p + 1)
        cand = t[..., None] | (jnp.arange(1, 2**radix_bits, dtype=jnp.uint32) << jnp.uint32(shift))  # [..., m]
        counts = (u[..., None, :] >= cand[..., None]).sum(-1, dtype=jnp.int32)  # one fused read of u per pass
        digit = (counts >= kk).sum(-1, dtype=jnp.uint32)  # counts fall with the candidate: the largest one kept
        t = t | (digit << jnp.uint32(shift))
    return t


def compact_top_k(u: UInt32[Array, "*rows n"], kk: int, t: UInt32[Array, "*rows"]) -> Int[Array, "*rows k"]:
    """Indices [..., kk] of the kk largest values of u [..., n] given the kk-th largest t [...]: every value above t
    and the lowest-index values equal to it, up to kk, in ascending index, by cumulative sums and one scatter."""
    n = u.shape[-1]
    gt, eq = u > t[..., None], u == t[..., None]
    need = kk - gt.sum(-1, dtype=jnp.int32)[..., None]  # >= 1: fewer than kk values lie above the kk-th largest
    c_gt, c_eq = jnp.cumsum(gt, -1, dtype=jnp.int32), jnp.cumsum(eq, -1, dtype=jnp.int32)
    sel = gt | (eq & (c_eq <= need))
    slot = jnp.where(sel, c_gt + jnp.minimum(c_eq, need) - 1, kk)  # kk: out of range, dropped
    rows = slot.reshape(-1, n)
    keys = jnp.arange(n, dtype=jnp.int32)
    out = jax.vmap(lambda r: jnp.zeros(kk, jnp.int32).at[r].set(keys, mode="drop", unique_indices=True))(rows)
    return out.reshape(*u.shape[:-1], kk)


def indexer_top_k_threshold(
    q_idx: Float[Array, "b s hi di"],
    k_idx: Float[Array, "b s di"],
    w_idx: Float[Array, "b s hi"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
    *,
    top_k: int,
    query_chunk: int | None = None,
    radix_bits: int = 2,
) -> tuple[Int[Array, "b s k"], Bool[Array, "b s k"]]:
    """`indexer_top_k` impl="threshold": chunks of query_chunk queries run one after another (lax.map); each
    computes its [b, chunk, s] indexer scores over all keys (-inf where not visible), finds each query's k-th
    largest score exactly (`kth_largest_key` over the scores' `order_key`) and extracts the keys above it plus
    the lowest-index keys equal to it (`compact_top_k`). Sort-free; memory O(b * query_chunk * s) per step and
    O(b * s * top_k) for the output. query_chunk None: `default_query_chunk(b, s)`. The slots
    hold the selected keys in ascending key index; the set equals `top_k_keys(indexer_scores(...), top_k)`'s."""
    _check_indexer(q_idx, k_idx, w_idx)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if query_chunk is not None and query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1 or None, got {query_chunk}")
    b, s = positions.shape
    kk = min(top_k, s)
    chunk = default_query_chunk(b, s) if query_chunk is None else min(query_chunk, s)
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    neg_inf = order_key(jnp.float32(-jnp.inf))
    q_idx, k_idx, w_idx = jax.lax.stop_gradient((q_idx, k_idx, w_idx))  # the selection carries no gradient
    xs = tuple(_query_blocks(x, chunk, f) for x, f in ((q_idx, 0), (w_idx, 0), (positions, -1), (seg, 0)))

    def step(args):
        qc, wc, pc, sc = args
        scores = jnp.where(token_mask(pc, positions, sc, seg), _indexer_logits(qc, k_idx, wc), -jnp.inf)
        u = order_key(scores)  # [b, chunk, s]
        idx = compact_top_k(u, kk, kth_largest_key(u, kk, radix_bits))
        return idx, jnp.take_along_axis(u, idx, -1) > neg_inf

    idx, valid = jax.lax.map(step, xs)  # [n_chunks, b, chunk, kk]
    idx, valid = (jnp.moveaxis(x, 0, 1).reshape(b, -1, kk)[:, :s] for x in (idx, valid))
    return idx, valid


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
    *,
    sm_scale: float | None = None,
) -> Float[Array, "b s hq d"]:
    """Attention over each query's selected keys: dense masked reference, O(s^2) memory."""
    m = selection_mask(idx, valid, k.shape[1]) & token_mask(positions, positions, segment_ids)
    return masked_attention(q, k, v, m, sm_scale=sm_scale)[0]


def _take(x, idx):
    """x [b, s, ...] gathered per batch row at idx [b, ...] (indices clipped into range)."""
    return jax.vmap(lambda a, i: a[jnp.clip(i, 0, a.shape[0] - 1)])(x, idx)


def _query_blocks(x: Array, block_q: int, fill) -> Array:
    """x [b, s, ...] padded with `fill` to a multiple of block_q and split into [s / block_q, b, block_q, ...] (the
    leading axis is what lax.map walks)."""
    b, s = x.shape[:2]
    pad = -s % block_q
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(b, (s + pad) // block_q, block_q, *x.shape[2:]), 1, 0)


def _kl_to_target(t: Array, scores: Array, mask: Array) -> Array:
    """Per query, KL(t || softmax(scores over `mask`)) with t a distribution over the same keys (last axis)."""
    logq = jax.nn.log_softmax(jnp.where(mask, scores, -1e30), axis=-1)  # finite fill: empty rows stay nan-free
    return jnp.where(mask & (t > 0), t * (jnp.log(jnp.where(t > 0, t, 1.0)) - jnp.where(mask, logq, 0.0)), 0.0).sum(-1)


def slot_visible(
    idx: Int[Array, "b t k"],
    valid: Bool[Array, "b t k"],
    q_positions: Int[Array, "b t"],
    q_segment_ids: Int[Array, "b t"],
    k_positions: Int[Array, "b s"],
    k_segment_ids: Int[Array, "b s"],
) -> Bool[Array, "b t k"]:
    """Whether each slot holds a key its query may see: valid, in range, not padding, same segment, not later."""
    kp, ks = _take(k_positions, idx), _take(k_segment_ids, idx)
    qp, qs = q_positions[..., None], q_segment_ids[..., None]
    in_range = (idx >= 0) & (idx < k_positions.shape[1])
    return valid & in_range & (qp >= 0) & (kp >= 0) & (kp <= qp) & (ks == qs)


def dsa_pair_counts(
    idx: Int[Array, "b s k"],
    valid: Bool[Array, "b s k"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
) -> Float[Array, " b"]:
    """(query, key) pairs `dsa_attention` attends per batch row for the selection (idx, valid): each query's slots
    holding a key it may see (`slot_visible`), i.e. min(top_k, visible keys) per query for an `indexer_top_k`
    selection. Selected lists hold distinct keys. Memory O(s * k)."""
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    return slot_visible(idx, valid, positions, seg, positions, seg).sum((1, 2), dtype=jnp.float32)


def indexer_flops_per_pair(indexer_heads: int, indexer_dim: int) -> int:
    """Forward FLOPs of one lightning-indexer score I[t, s]: indexer_heads dot products of indexer_dim (2 FLOPs per
    multiply-add) and their weighted sum over heads (2 per head); the ReLU is a comparison, not counted."""
    return 2 * indexer_heads * (indexer_dim + 1)


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
    xs = tuple(_query_blocks(x, block_q, f) for x, f in ((q, 0), (idx, 0), (valid, False), (positions, -1), (seg, 0)))

    @jax.checkpoint
    def step(args):
        qb, ib, vb, pb, sb = args
        kg, vg = _take(k, ib), _take(v, ib)  # [b, bq, k, hkv, d]
        ok = slot_visible(ib, vb, pb, sb, positions, seg)
        qg = qb.reshape(b, block_q, hkv, hq // hkv, d)
        logits = jnp.einsum("bqhgd,bqkhd->bqhgk", qg, kg, preferred_element_type=jnp.float32) * scale
        p = masked_softmax(logits, ok[:, :, None, None, :])
        return jnp.einsum("bqhgk,bqkhd->bqhgd", p.astype(v.dtype), vg).reshape(b, block_q, hq, d)

    out = jax.lax.map(step, xs)  # [nb, b, bq, hq, d]
    return jnp.moveaxis(out, 0, 1).reshape(b, -1, hq, d)[:, :s]


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
    kl = _kl_to_target(t, scores, mask)
    rows = mask.any(-1)
    return jnp.where(rows, kl, 0.0).sum() / jnp.maximum(rows.sum(), 1)


def dsa_attention(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    v: Float[Array, "b s hkv d"],
    idx: Int[Array, "b s k"],
    valid: Bool[Array, "b s k"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
    *,
    impl: str = "auto",
    block_q: int = 64,
    sm_scale: float | None = None,
    **kernel_kwargs,
) -> Float[Array, "b s hq d"]:
    """Attention over each query's selected keys (shared by all heads). impl: "reference" (dense masked, O(s^2)),
    "gather" (`dsa_attention_gather`, jnp, O(s * k)), "pallas" (`pallas_kernels.topk_attention`: Triton on GPU, Mosaic
    on TPU; kernel_kwargs such as backend, interpret, block_k go to it), "auto" (pallas on GPU and TPU, else gather).
    Selected lists hold distinct keys (as `top_k_keys` / `indexer_top_k` give them)."""
    impl = resolve_impl(impl)
    if kernel_kwargs and impl != "pallas":
        raise ValueError(f"kernel arguments {sorted(kernel_kwargs)} only apply to impl='pallas', got impl={impl!r}")
    if impl == "reference":
        return dsa_attention_reference(q, k, v, idx, valid, positions, segment_ids, sm_scale=sm_scale)
    if impl == "gather":
        return dsa_attention_gather(q, k, v, idx, valid, positions, segment_ids, block_q=block_q, sm_scale=sm_scale)
    check_gqa(q, k, v)
    return topk_attention(
        q,
        k,
        v,
        idx,
        valid=valid,
        q_positions=positions,
        k_positions=positions,
        segment_ids=segment_ids,
        sm_scale=sm_scale,
        **kernel_kwargs,
    )


def indexer_kl_loss_selected(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    q_idx: Float[Array, "b s hi di"],
    k_idx: Float[Array, "b s di"],
    w_idx: Float[Array, "b s hi"],
    idx: Int[Array, "b s k"],
    valid: Bool[Array, "b s k"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
    *,
    block_q: int = 64,
) -> Float[Array, ""]:
    """Sparse-stage loss of the indexer: mean over queries with a visible selected key of KL(p_target ||
    softmax(indexer scores)), both over the query's selected keys only; p_target is the attention distribution of
    q over those keys summed over heads and L1-normalised. Query blocks of block_q run one after another
    (rematerialised in the backward), so memory is O(block_q * k * (hq + hkv * d)). With every visible key
    selected it equals `indexer_kl_loss`. q and k get no gradient from it."""
    check_gqa(q, k, k)
    _check_indexer(q_idx, k_idx, w_idx)
    if block_q < 1:
        raise ValueError(f"block_q must be >= 1, got {block_q}")
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    xs = tuple(_query_blocks(x, block_q, f) for x, f in
               ((q, 0), (q_idx, 0), (w_idx, 0), (idx, 0), (valid, False), (positions, -1), (seg, 0)))

    @jax.checkpoint
    def step(args):
        qb, qib, wib, ib, vb, pb, sb = args
        ok = slot_visible(ib, vb, pb, sb, positions, seg)  # [b, bq, k]
        kg = _take(k, ib)  # [b, bq, k, hkv, d]
        logits = jnp.einsum(
            "bqhgd,bqkhd->bqhgk", qb.reshape(b, block_q, hkv, hq // hkv, d), kg, preferred_element_type=jnp.float32
        )
        t = masked_softmax(logits * d**-0.5, ok[:, :, None, None, :]).sum((2, 3))
        t = t / jnp.maximum(t.sum(-1, keepdims=True), 1e-30)
        dots = jax.nn.relu(jnp.einsum("bqhd,bqkd->bqhk", qib, _take(k_idx, ib), preferred_element_type=jnp.float32))
        scores = jnp.einsum("bqhk,bqh->bqk", dots, wib.astype(jnp.float32))
        rows = ok.any(-1)
        return jnp.where(rows, _kl_to_target(t, scores, ok), 0.0).sum(), rows.sum()

    total, count = jax.lax.map(step, xs)
    return total.sum() / jnp.maximum(count.sum(), 1)


def dsa_decode(
    q: Float[Array, "b 1 hq d"],
    k_cache: Float[Array, "b L hkv d"],
    v_cache: Float[Array, "b L hkv d"],
    index_cache: Float[Array, "b L di"],
    q_idx: Float[Array, "b 1 hi di"],
    w_idx: Float[Array, "b 1 hi"],
    lengths: Int[Array, " b"],
    *,
    top_k: int,
    slot_positions: Int[Array, "b L"] | None = None,
    impl: str = "auto",
    sm_scale: float | None = None,
    **kernel_kwargs,
) -> tuple[Float[Array, "b 1 hq d"], Int[Array, "b 1 k"], Bool[Array, "b 1 k"]]:
    """One new token per row whose k, v and indexer key already sit in slot lengths - 1 of the caches: indexer
    scores over the row's filled slots (index_cache holds the indexer keys), its top_k (ties to the lower slot),
    and attention over those k gathered keys only. slot_positions (default: the slot number; < 0 marks padding,
    e.g. a left-padded prompt) give causality as in prefill, so the result equals the last row of the full
    recompute. impl: "pallas" (`pallas_kernels.topk_attention` on GPU / TPU), "gather" (the same gather in jnp,
    memory O(b * k * d)), "reference" (dense over the cache), "auto". Returns (output, selected slots, valid)."""
    b, L = k_cache.shape[:2]
    if q.ndim != 4 or q.shape[1] != 1 or k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q [b, 1, hq, d] and caches [b, L, hkv, d] expected, got {q.shape}, {k_cache.shape}")
    _check_indexer(q_idx, index_cache, w_idx)
    if lengths.shape != (b,):
        raise ValueError(f"lengths {lengths.shape} must be [batch={b}]")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    impl = resolve_impl(impl)
    slot = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (b, L))
    k_pos = jnp.where(slot < lengths[:, None], slot if slot_positions is None else slot_positions, -1)
    q_pos = jnp.take_along_axis(k_pos, jnp.clip(lengths - 1, 0, L - 1)[:, None], axis=1)  # [b, 1]
    scores = _indexer_logits(q_idx, index_cache, w_idx)  # [b, 1, L]
    scores = jnp.where(token_mask(q_pos, k_pos), scores, -jnp.inf)
    idx, valid = top_k_keys(scores, top_k)
    if impl == "reference":
        m = selection_mask(idx, valid, L) & token_mask(q_pos, k_pos)
        return masked_attention(q, k_cache, v_cache, m, sm_scale=sm_scale)[0], idx, valid
    if impl == "gather":
        kernel_kwargs = {**kernel_kwargs, "backend": "reference"}
    out = topk_attention(
        q, k_cache, v_cache, idx, valid=valid, q_positions=q_pos, k_positions=k_pos, sm_scale=sm_scale, **kernel_kwargs
    )
    return out, idx, valid
