"""Native Sparse Attention (Yuan et al. 2025) in pure jnp: block compression of keys/values, the compressed
branch, per-query-block top-n block selection from the compressed scores (shared across a GQA group), the
selected-blocks branch, a sliding window and the gated mix `sum_c g_c * o_c`.

Conventions: q [b, s, hq, d], k/v [b, s, hkv, d] (GQA, hq % hkv == 0), positions [b, s] with -1 for padding,
segment_ids [b, s] for packed sequences (tokens attend only within their segment). Causality is by position.
The selected-blocks branch also runs on `pallas_kernels.block_sparse_attention` through `nsa_block_layout`
(a per-batch, per-kv-head `BlockLayout`); `custom_block_layout` turns any FlexAttention-style block mask into one.
Decode with a cache (`nsa_prefill`, `compress_cache_block`, `nsa_decode`, `nsa_decode_step`) works by position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.block_sparse.layout import BlockLayout, layout_from_block_mask


def check_gqa(q: Array, k: Array, v: Array) -> None:
    """Raise ValueError unless q is [b, s, hq, d] and k, v are [b, s, hkv, d] with hq a multiple of hkv."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [b, s, hq, d] and k, v [b, s, hkv, d], got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")


def token_mask(
    q_positions: Int[Array, "b sq"],
    k_positions: Int[Array, "b sk"],
    segment_ids: Int[Array, "b sq"] | None = None,
    k_segment_ids: Int[Array, "b sk"] | None = None,
    *,
    window: int | None = None,
) -> Bool[Array, "b sq sk"]:
    """Causal (by position), padding (position < 0) and segment mask; `window` keeps keys with q_pos - k_pos < window."""
    qp, kp = q_positions[:, :, None], k_positions[:, None, :]
    m = (qp >= 0) & (kp >= 0) & (kp <= qp)
    if window is not None:
        m &= qp - kp < window
    if segment_ids is not None:
        ks = segment_ids if k_segment_ids is None else k_segment_ids
        m &= segment_ids[:, :, None] == ks[:, None, :]
    return m


def masked_softmax(logits: Float[Array, "*b k"], mask: Bool[Array, "*#b #k"]) -> Float[Array, "*b k"]:
    """Softmax over the last axis among the `mask`ed entries (mask broadcasts against logits); masked entries get
    probability 0, and rows with nothing visible give zeros and zero gradients (no nan)."""
    logits = jnp.where(mask, logits, -jnp.inf)
    mx = jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True))
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.where(mask, jnp.exp(logits - mx), 0.0)
    den = e.sum(-1, keepdims=True)
    return e / jnp.where(den > 0, den, 1.0)


def masked_attention(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    mask: Bool[Array, "b sq sk"] | Bool[Array, "b hkv sq sk"],
    *,
    sm_scale: float | None = None,
) -> tuple[Float[Array, "b sq hq d"], Float[Array, "b hq sq sk"]]:
    """Dense masked softmax attention (GQA; a mask per batch or per kv head); rows with nothing visible give zeros
    and zero gradients. Returns (output, probabilities)."""
    check_gqa(q, k, v)
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, sq, hkv, hq // hkv, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    m = mask[:, None, None] if mask.ndim == 3 else mask[:, :, None]
    p = masked_softmax(logits, m)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v).reshape(b, sq, hq, d)
    return o, p.reshape(b, hq, sq, -1)


def compress(
    x: Float[Array, "b s h d"],
    positions: Int[Array, "b s"],
    weights: Float[Array, " l"],
    pos_emb: Float[Array, "l d"],
    *,
    block: int,
    stride: int,
    segment_ids: Int[Array, "b s"] | None = None,
) -> tuple[Float[Array, "b nc h d"], Int[Array, "b nc"], Int[Array, "b nc"]]:
    """phi: block i covers tokens [i*stride, i*stride + block) and becomes sum_j weights[j] * (x_j + pos_emb[j])
    (a learned linear pool with an intra-block position embedding). Returns (compressed, end position, segment):
    the end position is the last token's position, -1 when any token of the block is padding or the block
    straddles a segment boundary (such a block is never attended)."""
    _check_pool(block, stride, weights, pos_emb, x.shape[-1])
    idx = _compressed_token_index(x.shape[1], block, stride)
    c_end, c_seg = compressed_blocks(positions, block=block, stride=stride, segment_ids=segment_ids)
    return _pool(x[:, idx], weights, pos_emb), c_end, c_seg


def _compressed_token_index(s: int, block: int, stride: int) -> Int[Array, "nc l"]:
    if block < 1 or stride < 1 or stride > block:
        raise ValueError(f"need 1 <= stride <= block, got block={block}, stride={stride}")
    if s < block:
        raise ValueError(f"sequence length {s} is shorter than the compression block {block}")
    nc = (s - block) // stride + 1
    return jnp.arange(nc)[:, None] * stride + jnp.arange(block)[None, :]


def compressed_blocks(
    positions: Int[Array, "b s"],
    *,
    block: int,
    stride: int,
    segment_ids: Int[Array, "b s"] | None = None,
) -> tuple[Int[Array, "b nc"], Int[Array, "b nc"]]:
    """(end position, segment) of each compressed block of `compress`: the end position is the last token's
    position, -1 when any token of the block is padding or the block straddles a segment boundary."""
    idx = _compressed_token_index(positions.shape[1], block, stride)
    pb = positions[:, idx]
    ok = (pb >= 0).all(-1)
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    sb = seg[:, idx]
    ok &= (sb == sb[..., -1:]).all(-1)
    return jnp.where(ok, pb[..., -1], -1), sb[..., -1]


def _pool(xb: Float[Array, "b c l h d"], weights: Float[Array, " l"], pos_emb: Float[Array, "l d"]) -> Array:
    """The compression pool phi of blocks of `l` gathered keys: sum_j weights[j] * (x_j + pos_emb[j])."""
    xb = xb + pos_emb[None, None, :, None, :].astype(xb.dtype)
    return jnp.einsum("bclhd,l->bchd", xb, weights.astype(xb.dtype))


def _check_pool(block: int, stride: int, weights: Array, pos_emb: Array, d: int) -> None:
    if block < 1 or stride < 1 or stride > block:
        raise ValueError(f"need 1 <= stride <= block, got block={block}, stride={stride}")
    if weights.shape != (block,) or pos_emb.shape != (block, d):
        raise ValueError(f"weights must be [{block}] and pos_emb [{block}, {d}], got {weights.shape}, {pos_emb.shape}")


def compressed_mask(
    q_positions: Int[Array, "b s"],
    c_end: Int[Array, "b nc"],
    segment_ids: Int[Array, "b s"] | None,
    c_segment: Int[Array, "b nc"],
) -> Bool[Array, "b s nc"]:
    """A query sees the compressed blocks that end at or before it, in its segment."""
    m = (q_positions[:, :, None] >= 0) & (c_end[:, None, :] >= 0) & (c_end[:, None, :] <= q_positions[:, :, None])
    if segment_ids is not None:
        m &= segment_ids[:, :, None] == c_segment[:, None, :]
    return m


def selection_block_mask(
    p_cmp: Float[Array, "b hq s nc"],
    *,
    num_kv_heads: int,
    block: int,
    stride: int,
    block_sel: int,
    top_n: int,
    seq_len: int,
) -> Bool[Array, "b hkv nq nsel"]:
    """Top-n selection blocks (size block_sel) per query block (size block_sel) and kv head. The importance of a
    selection block is the compressed attention mass of the compressed blocks overlapping it, summed over the
    query heads of the GQA group and the queries of the query block. Causal at block level (selection block j <=
    query block i); the first block and the query's own block are always selected (when they exist)."""
    b, hq, s, nc = p_cmp.shape
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    nsel = -(-seq_len // block_sel)
    imp = token_importance(p_cmp, num_kv_heads=num_kv_heads, block=block, stride=stride, block_sel=block_sel,
                           num_sel=nsel)  # fmt: skip
    imp = jnp.pad(imp, ((0, 0), (0, 0), (0, nsel * block_sel - s), (0, 0)))
    imp = imp.reshape(b, num_kv_heads, nsel, block_sel, nsel).sum(3)  # [b, hkv, nq, nsel]
    return top_blocks(imp, jnp.arange(nsel), top_n)


def token_importance(
    p_cmp: Float[Array, "b hq s nc"], *, num_kv_heads: int, block: int, stride: int, block_sel: int, num_sel: int
) -> Float[Array, "b hkv s nsel"]:
    """Each query's importance of the selection blocks 0 .. num_sel - 1: the compressed attention mass of the
    compressed blocks (block c covers tokens [c*stride, c*stride + block)) overlapping the selection block, summed
    over the query heads of the GQA group. No gradient flows through it."""
    b, hq, s, nc = p_cmp.shape
    start = jnp.arange(nc) * stride
    tok = jnp.arange(num_sel) * block_sel
    overlap = (start[:, None] < tok[None, :] + block_sel) & (start[:, None] + block > tok[None, :])  # [nc, nsel]
    imp = jnp.einsum("bhqc,cn->bhqn", jax.lax.stop_gradient(p_cmp), overlap.astype(p_cmp.dtype))
    return imp.reshape(b, num_kv_heads, hq // num_kv_heads, s, num_sel).sum(2)


def top_blocks(imp: Float[Array, "*b nsel"], q_block: Int[Array, "*#b"], top_n: int) -> Bool[Array, "*b nsel"]:
    """The top-n selection blocks of a query block `q_block` (broadcast against imp's leading axes) by importance
    `imp`: causal at block level (block j <= q_block), the first block and the query's own block always selected
    (when they exist); ties go to the lower block (`lax.top_k`)."""
    nsel = imp.shape[-1]
    qi, kj = q_block[..., None], jnp.arange(nsel)
    forced = (kj == 0) | (kj == qi)
    score = jnp.where(kj <= qi, jnp.where(forced, jnp.inf, imp), -jnp.inf)
    vals, idx = jax.lax.top_k(score, min(top_n, nsel))
    hot = jax.nn.one_hot(idx, nsel, dtype=jnp.bool_) & (vals > -jnp.inf)[..., None]
    return hot.any(-2)


def nsa_block_layout(block_mask: Bool[Array, "b hkv nq nk"], *, block_sel: int, seq_len: int) -> BlockLayout:
    """The selected-blocks branch as a `BlockLayout` (per batch row and kv head: NSA shares a selection across a
    GQA group), for `pallas_kernels.block_sparse_attention` with causal=True and the token positions."""
    return layout_from_block_mask(block_mask, block_q=block_sel, block_k=block_sel, seq_q=seq_len, seq_k=seq_len)


def custom_block_layout(
    block_mask: Bool[Array, "b nq nk"] | Bool[Array, "b h nq nk"],
    *,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
) -> BlockLayout:
    """A FlexAttention-style user block mask ([b, nq, nk] shared by heads, or [b, h, nq, nk] with h 1, the kv-head
    or the query-head count) as a `BlockLayout`; token masking (causal, window, segments, padding) is applied
    inside the visited blocks by the kernel."""
    nq, nk = -(-seq_q // block_q), -(-seq_k // block_k)
    if block_mask.ndim not in (3, 4) or block_mask.shape[-2:] != (nq, nk):
        raise ValueError(
            f"block_mask must be [b, (h,) {nq}, {nk}] for these lengths and blocks, got {block_mask.shape}"
        )
    return layout_from_block_mask(block_mask.astype(bool), block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k)


def expand_block_mask(block_mask: Bool[Array, "b h nq nk"], block: int, seq_len: int) -> Bool[Array, "b h s s"]:
    """Token-level view of a square-block mask."""
    m = jnp.repeat(jnp.repeat(block_mask, block, axis=-2), block, axis=-1)
    return m[..., :seq_len, :seq_len]


def nsa_attention(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    v: Float[Array, "b s hkv d"],
    gates: Float[Array, "b s hq 3"],
    positions: Int[Array, "b s"],
    *,
    cmp_weights_k: Float[Array, " l"],
    cmp_pos_k: Float[Array, "l d"],
    cmp_weights_v: Float[Array, " l"],
    cmp_pos_v: Float[Array, "l d"],
    block: int,
    stride: int,
    block_sel: int,
    top_n: int,
    window: int,
    segment_ids: Int[Array, "b s"] | None = None,
    selected_fn=None,
) -> tuple[Float[Array, "b s hq d"], Bool[Array, "b hkv nq nsel"]]:
    """The three NSA branches mixed by `gates` (already in [0, 1]: compressed, selected, window). Returns (output,
    selection block mask). `selected_fn(q, k, v, block_mask)` computes the selected branch (default: the dense
    masked reference here; `nsa_selected_kernel` runs it on the block-sparse kernel)."""
    out, bm, _ = _nsa_parts(
        q, k, v, gates, positions,
        cmp_weights_k=cmp_weights_k, cmp_pos_k=cmp_pos_k, cmp_weights_v=cmp_weights_v, cmp_pos_v=cmp_pos_v,
        block=block, stride=stride, block_sel=block_sel, top_n=top_n, window=window, segment_ids=segment_ids,
        selected_fn=selected_fn,
    )  # fmt: skip
    return out, bm


def _nsa_parts(q, k, v, gates, positions, *, cmp_weights_k, cmp_pos_k, cmp_weights_v, cmp_pos_v, block, stride,
               block_sel, top_n, window, segment_ids=None, selected_fn=None):  # fmt: skip
    """`nsa_attention`, also returning (compressed keys, compressed values, block end positions, p_cmp)."""
    check_gqa(q, k, v)
    b, s, hq, d = q.shape
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    kc, c_end, c_seg = compress(
        k, positions, cmp_weights_k, cmp_pos_k, block=block, stride=stride, segment_ids=segment_ids
    )
    vc, _, _ = compress(v, positions, cmp_weights_v, cmp_pos_v, block=block, stride=stride, segment_ids=segment_ids)
    o_cmp, p_cmp = masked_attention(q, kc, vc, compressed_mask(positions, c_end, segment_ids, c_seg))
    bm = selection_block_mask(
        p_cmp, num_kv_heads=k.shape[2], block=block, stride=stride, block_sel=block_sel, top_n=top_n, seq_len=s
    )
    if selected_fn is None:
        o_slc = nsa_selected_reference(q, k, v, bm, positions, block_sel=block_sel, segment_ids=segment_ids)
    else:
        o_slc = selected_fn(q, k, v, bm)
    o_win, _ = masked_attention(q, k, v, token_mask(positions, positions, segment_ids, window=window))
    return _mix(gates, o_cmp, o_slc, o_win), bm, (kc, vc, c_end, p_cmp)


def _mix(gates, o_cmp, o_slc, o_win):
    g = gates.astype(o_cmp.dtype)
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win


# Decode. A row's cache holds its keys in slots with per-slot positions (-1: empty); compressed block c covers the
# positions [c*stride, c*stride + block) and is kept once its last position is cached; `sel_imp` holds the summed
# selection importance of the queries of the row's current query block (positions [i*block_sel, t]), which is what
# the forward's per-query-block selection of a query at t reads from queries up to t. Hence decoding the token at
# position t equals the forward run on positions 0..t, at t.


def num_cache_blocks(max_len: int, *, block: int, stride: int) -> int:
    """Compressed blocks a cache of `max_len` positions holds: the blocks complete at positions < max_len, at least
    one (a cache shorter than a block keeps one slot that never fills)."""
    return max((max_len - block) // stride + 1, 1)


def num_sel_blocks(max_len: int, *, block_sel: int) -> int:
    """Selection blocks over `max_len` positions."""
    return -(-max_len // block_sel)


def nsa_prefill(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    v: Float[Array, "b s hkv d"],
    gates: Float[Array, "b s hq 3"],
    positions: Int[Array, "b s"],
    *,
    cmp_weights_k: Float[Array, " l"],
    cmp_pos_k: Float[Array, "l d"],
    cmp_weights_v: Float[Array, " l"],
    cmp_pos_v: Float[Array, "l d"],
    block: int,
    stride: int,
    block_sel: int,
    top_n: int,
    window: int,
    max_len: int,
    selected_fn=None,
) -> tuple[
    Float[Array, "b s hq d"], Float[Array, "b nc hkv d"], Float[Array, "b nc hkv d"], Int[Array, "b nc"],
    Float[Array, "b hkv nsel"],
]:  # fmt: skip
    """`nsa_attention` of a prompt by position (blocks of positions, not of slots: a left-padded row gives what it
    gives alone) plus the decode state of a cache of `max_len` positions: (output, compressed keys, compressed
    values, their end positions (-1: not complete), importance of the last query block; see `nsa_decode`).
    Each row's valid positions must be distinct and < max(s, block) (a prompt at positions 0..n-1, in any slots);
    a token at a larger position gets NaN (checked with a ValueError when positions are concrete).
    `selected_fn(q, k, v, block_mask, positions)` runs the selected branch (default: the reference)."""
    check_gqa(q, k, v)
    b, s = positions.shape
    n = max(s, block)
    if not isinstance(positions, jax.core.Tracer) and int(jnp.max(positions, initial=-1)) >= n:
        raise ValueError(f"nsa_prefill: positions must be < max(s, block) = {n} (a prompt from position 0), got "
                         f"max {int(jnp.max(positions))}")  # fmt: skip
    rows = jnp.arange(b)[:, None]
    slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    slot_of = jnp.full((b, n), s, jnp.int32).at[rows, jnp.where(positions >= 0, positions, n)].set(slots, mode="drop")

    def by_position(x):  # [b, s, ...] -> [b, n, ...]: position p's token (zeros where none)
        xp = jnp.pad(x, ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2))
        return jnp.take_along_axis(xp, slot_of.reshape(b, n, *(1,) * (x.ndim - 2)), axis=1)

    pos = jnp.where(slot_of < s, jnp.arange(n, dtype=jnp.int32), -1)
    sel = None if selected_fn is None else (lambda q, k, v, bm: selected_fn(q, k, v, bm, pos))
    out, _, (kc, vc, c_end, p_cmp) = _nsa_parts(
        by_position(q), by_position(k), by_position(v), by_position(gates), pos,
        cmp_weights_k=cmp_weights_k, cmp_pos_k=cmp_pos_k, cmp_weights_v=cmp_weights_v, cmp_pos_v=cmp_pos_v,
        block=block, stride=stride, block_sel=block_sel, top_n=top_n, window=window, selected_fn=sel,
    )  # fmt: skip
    gather = jnp.clip(positions, 0, n - 1)[:, :, None, None]
    out = jnp.take_along_axis(out, gather, axis=1)
    out = jnp.where((positions < 0)[:, :, None, None], 0.0, jnp.where((positions >= n)[:, :, None, None], jnp.nan, out))
    nc_cache, nsel = num_cache_blocks(max_len, block=block, stride=stride), num_sel_blocks(max_len, block_sel=block_sel)
    keep = min(kc.shape[1], nc_cache)
    fill = ((0, 0), (0, nc_cache - keep), (0, 0), (0, 0))
    cmp_k, cmp_v = jnp.pad(kc[:, :keep], fill), jnp.pad(vc[:, :keep], fill)
    cmp_end = jnp.pad(c_end[:, :keep], ((0, 0), (0, nc_cache - keep)), constant_values=-1)
    imp = token_importance(p_cmp, num_kv_heads=k.shape[2], block=block, stride=stride, block_sel=block_sel,
                           num_sel=nsel)  # fmt: skip
    last = pos.max(1)
    in_block = (pos >= 0) & (pos // block_sel == (last // block_sel)[:, None])
    sel_imp = (imp * in_block[:, None, :, None]).sum(2)
    return out.astype(q.dtype), cmp_k, cmp_v, cmp_end, sel_imp


def compress_cache_block(
    x_cache: Float[Array, "b n h d"],
    slot_positions: Int[Array, "b n"],
    slot: Int[Array, ""],
    position: Int[Array, " b"],
    weights: Float[Array, " l"],
    pos_emb: Float[Array, "l d"],
    *,
    block: int,
    stride: int,
) -> tuple[Float[Array, "b h d"], Int[Array, " b"]]:
    """The compressed block completed by the token at position `position[r]` in slot `slot` of each row r:
    (phi of the block, as `compress` pools it; the block's index c, -1 when the token completes no block).
    Block c covers positions [c*stride, c*stride + block) and is complete at its last position; its keys are the
    `block` slots ending at `slot`, which must hold these positions (they do in a cache filled one position per slot,
    as `KVCache` and `LeftPaddedKVCache` fill it); otherwise the block is treated as incomplete (index -1)."""
    _check_pool(block, stride, weights, pos_emb, x_cache.shape[-1])
    n = x_cache.shape[1]
    idx = slot + jnp.arange(block, dtype=jnp.int32) - block + 1  # [l]
    safe = jnp.clip(idx, 0, n - 1)
    start = position - block + 1
    held = (idx >= 0).all() & (slot_positions[:, safe] == start[:, None] + jnp.arange(block)).all(-1)
    done = (start >= 0) & (start % stride == 0) & held
    pooled = _pool(x_cache[:, safe][:, None], weights, pos_emb)[:, 0]
    return pooled, jnp.where(done, start // stride, -1)


def nsa_decode(
    q: Float[Array, "b sq hq d"],
    k_cache: Float[Array, "b n hkv d"],
    v_cache: Float[Array, "b n hkv d"],
    gates: Float[Array, "b sq hq 3"],
    positions: Int[Array, "b sq"],
    slot_positions: Int[Array, "b n"],
    cmp_k: Float[Array, "b nc hkv d"],
    cmp_v: Float[Array, "b nc hkv d"],
    cmp_end: Int[Array, "b nc"],
    sel_imp: Float[Array, "b hkv nsel"],
    *,
    block: int,
    stride: int,
    block_sel: int,
    top_n: int,
    window: int,
) -> tuple[Float[Array, "b 1 hq d"], Float[Array, "b hkv nsel"]]:
    """One new token per row (sq == 1, at `positions`, already written into the caches, its compressed block too) over the
    cached keys at `slot_positions`: the compressed branch over the complete blocks ending at or before it, the
    top-n selection blocks (by position) of its query block from `sel_imp` plus its own importance, the window.
    Returns (output, updated `sel_imp`: reset when the token starts a query block). Dense masked reads of the cache
    (the reference path: one query per row reads each cached key once per branch)."""
    check_gqa(q, k_cache, v_cache)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if q.shape[1] != 1 or positions.shape != q.shape[:2]:
        raise ValueError(f"nsa_decode takes one token per row: q [b, 1, hq, d], positions [b, 1], got {q.shape}, "
                         f"{positions.shape}")  # fmt: skip
    hkv, nsel = k_cache.shape[2], sel_imp.shape[-1]
    t = positions[:, 0]
    o_cmp, p_cmp = masked_attention(q, cmp_k, cmp_v, compressed_mask(positions, cmp_end, None, cmp_end))
    imp = token_importance(p_cmp, num_kv_heads=hkv, block=block, stride=stride, block_sel=block_sel, num_sel=nsel)
    start = (t % block_sel == 0)[:, None, None]
    acc = jnp.where((t < 0)[:, None, None], sel_imp, jnp.where(start, 0.0, sel_imp) + imp[:, :, 0])
    bm = top_blocks(acc, jnp.where(t >= 0, t // block_sel, -1)[:, None], top_n)  # [b, hkv, nsel]
    kb = slot_positions // block_sel
    picked = jnp.take_along_axis(bm, jnp.clip(kb, 0, nsel - 1)[:, None, :], axis=-1) & (kb < nsel)[:, None, :]
    m_slc = picked[:, :, None, :] & token_mask(positions, slot_positions)[:, None]
    o_slc, _ = masked_attention(q, k_cache, v_cache, m_slc)
    o_win, _ = masked_attention(q, k_cache, v_cache, token_mask(positions, slot_positions, window=window))
    return _mix(gates, o_cmp, o_slc, o_win), acc


def nsa_decode_step(
    q: Float[Array, "b 1 hq d"],
    k_cache: Float[Array, "b n hkv d"],
    v_cache: Float[Array, "b n hkv d"],
    gates: Float[Array, "b 1 hq 3"],
    positions: Int[Array, "b 1"],
    slot_positions: Int[Array, "b n"],
    slot: Int[Array, ""],
    cmp_k: Float[Array, "b nc hkv d"],
    cmp_v: Float[Array, "b nc hkv d"],
    cmp_end: Int[Array, "b nc"],
    sel_imp: Float[Array, "b hkv nsel"],
    *,
    cmp_weights_k: Float[Array, " l"],
    cmp_pos_k: Float[Array, "l d"],
    cmp_weights_v: Float[Array, " l"],
    cmp_pos_v: Float[Array, "l d"],
    block: int,
    stride: int,
    block_sel: int,
    top_n: int,
    window: int,
) -> tuple[Float[Array, "b 1 hq d"], tuple[Array, Array, Array, Array]]:
    """A decode step whose token's key/value are already in the caches at `slot`: store the compressed block it
    completes (per row: rows complete blocks at different steps), then `nsa_decode`. Returns (output, (cmp_k,
    cmp_v, cmp_end, sel_imp) updated)."""
    kw = dict(block=block, stride=stride)
    ck, c_idx = compress_cache_block(k_cache, slot_positions, slot, positions[:, 0], cmp_weights_k, cmp_pos_k, **kw)
    cv, _ = compress_cache_block(v_cache, slot_positions, slot, positions[:, 0], cmp_weights_v, cmp_pos_v, **kw)
    rows = jnp.arange(q.shape[0])
    target = jnp.where(c_idx >= 0, c_idx, cmp_k.shape[1])  # past the end: dropped
    cmp_k = cmp_k.at[rows, target].set(ck.astype(cmp_k.dtype), mode="drop")
    cmp_v = cmp_v.at[rows, target].set(cv.astype(cmp_v.dtype), mode="drop")
    cmp_end = cmp_end.at[rows, target].set(positions[:, 0], mode="drop")
    out, sel_imp = nsa_decode(q, k_cache, v_cache, gates, positions, slot_positions, cmp_k.astype(q.dtype),
                              cmp_v.astype(q.dtype), cmp_end, sel_imp, block=block, stride=stride,
                              block_sel=block_sel, top_n=top_n, window=window)  # fmt: skip
    return out, (cmp_k, cmp_v, cmp_end, sel_imp)


def nsa_pair_counts(
    block_mask: Bool[Array, "b hkv nq nk"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
    *,
    block: int,
    stride: int,
    block_sel: int,
    window: int,
) -> tuple[Float[Array, " b"], Float[Array, " b"], Float[Array, " b"]]:
    """(compressed, selected, window) (query, key) pairs each NSA branch of `nsa_attention` attends per batch row,
    for the selection `block_mask` it returned: queries x visible compressed blocks (`compressed_mask`), queries x
    the visible keys (causal, padding, segment) of their selected blocks, and queries x their window keys. The
    selected count is the mean over kv heads (each kv head's selection serves its GQA group, so hq * mean is the
    per-query-head total), hence fractional. Padding queries attend nothing. Counted per (query block, key block)
    tile, one query block of block_sel at a time: memory O(b * block_sel * s), no [s, s] array."""
    b, s = positions.shape
    nq = -(-s // block_sel)
    if block_mask.ndim != 4 or block_mask.shape[0] != b or block_mask.shape[2:] != (nq, nq):
        raise ValueError(f"block_mask must be [{b}, hkv, {nq}, {nq}] for s={s}, block_sel={block_sel}, "
                         f"got {block_mask.shape}")  # fmt: skip
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    c_end, c_seg = compressed_blocks(positions, block=block, stride=stride, segment_ids=seg)
    pad = nq * block_sel - s
    k_pos = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    k_seg = jnp.pad(seg, ((0, 0), (0, pad)))
    q_blocks = (jnp.moveaxis(x.reshape(b, nq, block_sel), 1, 0) for x in (k_pos, k_seg))

    def step(args):
        qp, qs = args  # [b, block_sel]
        visible = token_mask(qp, k_pos, qs, k_seg)  # [b, block_sel, nq * block_sel]
        tiles = visible.reshape(b, block_sel, nq, block_sel).sum((1, 3), dtype=jnp.int32)  # [b, nk]
        in_window = visible & (qp[:, :, None] - k_pos[:, None, :] < window)
        return (tiles, in_window.sum((1, 2), dtype=jnp.int32),
                compressed_mask(qp, c_end, qs, c_seg).sum((1, 2), dtype=jnp.int32))  # fmt: skip

    tiles, win, cmp = jax.lax.map(step, tuple(q_blocks))  # [nq, b, nk], [nq, b], [nq, b]
    tiles = jnp.moveaxis(tiles, 0, 1).astype(jnp.float32)  # [b, nq, nk]
    selected = jnp.where(block_mask, tiles[:, None], 0.0).sum((2, 3)).mean(1)  # no matmul: exact on TPU too
    return cmp.astype(jnp.float32).sum(0), selected, win.astype(jnp.float32).sum(0)


def nsa_selected_reference(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    v: Float[Array, "b s hkv d"],
    block_mask: Bool[Array, "b hkv nq nk"],
    positions: Int[Array, "b s"],
    *,
    block_sel: int,
    segment_ids: Int[Array, "b s"] | None = None,
) -> Float[Array, "b s hq d"]:
    """Selected-blocks branch, dense masked reference."""
    s = q.shape[1]
    m = expand_block_mask(block_mask, block_sel, s) & token_mask(positions, positions, segment_ids)[:, None]
    return masked_attention(q, k, v, m)[0]


def nsa_selected_kernel(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    v: Float[Array, "b s hkv d"],
    block_mask: Bool[Array, "b hkv nq nk"],
    positions: Int[Array, "b s"],
    *,
    block_sel: int,
    segment_ids: Int[Array, "b s"] | None = None,
    **kernel_kwargs,
) -> Float[Array, "b s hq d"]:
    """Selected-blocks branch on `pallas_kernels.block_sparse_attention` (kernel_kwargs: backend, interpret, ...)."""
    from pallas_kernels import block_sparse_attention

    layout = nsa_block_layout(block_mask, block_sel=block_sel, seq_len=q.shape[1])
    return block_sparse_attention(
        q,
        k,
        v,
        layout,
        causal=True,
        q_positions=positions,
        k_positions=positions,
        segment_ids=segment_ids,
        k_segment_ids=segment_ids,
        **kernel_kwargs,
    )
