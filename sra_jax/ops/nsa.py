"""Native Sparse Attention (Yuan et al. 2025) in pure jnp: block compression of keys/values, the compressed
branch, per-token top-n block selection from the compressed scores (shared across the query heads of a GQA group),
the selected-blocks branch, a sliding window and the gated mix `sum_c g_c * o_c`.

Conventions: q [b, s, hq, d], k/v [b, s, hkv, d] (GQA, hq % hkv == 0), positions [b, s] with -1 for padding,
segment_ids [b, s] for packed sequences (tokens attend only within their segment). Causality is by position, and
the whole forward is causal: a token's selection reads only its own compressed attention.
A selection is `blocks` [b, s, hkv, n] (the selected block indices of each token and kv head, -1 for an empty
slot); the selected-blocks branch runs on `pallas_kernels.topk_attention` with each token's keys listed
(`selected_key_indices`). `custom_block_layout` turns a FlexAttention-style block mask into a `BlockLayout` for
`pallas_kernels.block_sparse_attention`. Decode with a cache (`nsa_prefill`, `compress_cache_block`, `nsa_decode`,
`nsa_decode_step`) works by position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.block_sparse.layout import BlockLayout, layout_from_block_mask
from pallas_kernels.topk import topk_attention

SELECTED_IMPLS = ("auto", "reference", "gather", "pallas")


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


def select_blocks(
    p_cmp: Float[Array, "b hq s nc"],
    *,
    num_kv_heads: int,
    block: int,
    stride: int,
    block_sel: int,
    top_n: int,
    num_sel: int | None = None,
) -> Int[Array, "b s hkv n"]:
    """Each token's top-n selection blocks (size block_sel, block j holds sequence indices [j*block_sel,
    (j+1)*block_sel)) per kv head, n = min(top_n, num_sel): importance is the token's own compressed attention mass
    on the compressed blocks overlapping a selection block, summed over the query heads of the GQA group
    (`token_importance`). Causal at block level (block j <= the token's own block s_i // block_sel); the first block
    and the token's own block are always selected (`top_blocks`); -1 marks an empty slot (fewer causal blocks than
    n). num_sel defaults to ceil(s / block_sel). A token's selection depends on its own query only."""
    b, hq, s, nc = p_cmp.shape
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    nsel = num_sel_blocks(s, block_sel=block_sel) if num_sel is None else num_sel
    imp = token_importance(p_cmp, num_kv_heads=num_kv_heads, block=block, stride=stride, block_sel=block_sel,
                           num_sel=nsel)  # fmt: skip
    blocks = top_blocks(imp, (jnp.arange(s, dtype=jnp.int32) // block_sel)[None, None, :], top_n)  # [b, hkv, s, n]
    return jnp.moveaxis(blocks, 1, 2)


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


def top_blocks(imp: Float[Array, "*b nsel"], q_block: Int[Array, "*#b"], top_n: int) -> Int[Array, "*b n"]:
    """The top-n selection blocks (indices, n = min(top_n, nsel), -1 for an empty slot) of a query in block `q_block`
    (broadcast against imp's leading axes) by importance `imp`: causal at block level (block j <= q_block), the
    first block and the query's own block always selected (when they exist); ties go to the lower block
    (`lax.top_k`). The selection carries no gradient."""
    nsel = imp.shape[-1]
    qi, kj = q_block[..., None], jnp.arange(nsel)
    forced = (kj == 0) | (kj == qi)
    score = jnp.where(kj <= qi, jnp.where(forced, jnp.inf, jax.lax.stop_gradient(imp)), -jnp.inf)
    vals, idx = jax.lax.top_k(score, min(top_n, nsel))
    return jnp.where(vals > -jnp.inf, idx, -1).astype(jnp.int32)


def selected_key_indices(blocks: Int[Array, "b s hkv n"], block_sel: int) -> Int[Array, "b s hkv nk"]:
    """Each token's key list (nk = n * block_sel, -1 for the keys of an empty slot) of its selected blocks, as
    `pallas_kernels.topk_attention` takes it; indices past the sequence end (a ragged last block) are out of range,
    which the kernel treats as empty."""
    keys = blocks[..., None] * block_sel + jnp.arange(block_sel, dtype=jnp.int32)
    keys = jnp.where(blocks[..., None] >= 0, keys, -1)
    return keys.reshape(*blocks.shape[:-1], -1)


def selected_token_mask(blocks: Int[Array, "b s hkv n"], block_sel: int, seq_k: int) -> Bool[Array, "b hkv s sk"]:
    """Token-level view of a selection: key j is selected for token t and kv head h when j's block is in
    blocks[t, h]. Dense ([s, sk] per row and kv head): for references and tests."""
    nsel = num_sel_blocks(seq_k, block_sel=block_sel)
    hot = (jax.nn.one_hot(blocks, nsel, dtype=jnp.bool_)).any(-2)  # [b, s, hkv, nsel]; -1 is all False
    m = jnp.repeat(hot, block_sel, axis=-1)[..., :seq_k]
    return jnp.moveaxis(m, 2, 1)


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
) -> tuple[Float[Array, "b s hq d"], Int[Array, "b s hkv n"]]:
    """The three NSA branches mixed by `gates` (already in [0, 1]: compressed, selected, window). Returns (output,
    selection: each token's selected blocks per kv head, `select_blocks`). `selected_fn(q, k, v, blocks)` computes
    the selected branch (default: the dense masked reference `nsa_selected_reference`; `nsa_selected` runs it on
    the top-k gather kernel). Causal: a token's output reads no later token."""
    out, bm, _ = _nsa_parts(
        q, k, v, gates, positions,
        cmp_weights_k=cmp_weights_k, cmp_pos_k=cmp_pos_k, cmp_weights_v=cmp_weights_v, cmp_pos_v=cmp_pos_v,
        block=block, stride=stride, block_sel=block_sel, top_n=top_n, window=window, segment_ids=segment_ids,
        selected_fn=selected_fn,
    )  # fmt: skip
    return out, bm


def _nsa_parts(q, k, v, gates, positions, *, cmp_weights_k, cmp_pos_k, cmp_weights_v, cmp_pos_v, block, stride,
               block_sel, top_n, window, segment_ids=None, selected_fn=None):  # fmt: skip
    """`nsa_attention`, also returning (compressed keys, compressed values, block end positions)."""
    check_gqa(q, k, v)
    b, s, hq, d = q.shape
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    kc, c_end, c_seg = compress(
        k, positions, cmp_weights_k, cmp_pos_k, block=block, stride=stride, segment_ids=segment_ids
    )
    vc, _, _ = compress(v, positions, cmp_weights_v, cmp_pos_v, block=block, stride=stride, segment_ids=segment_ids)
    o_cmp, p_cmp = masked_attention(q, kc, vc, compressed_mask(positions, c_end, segment_ids, c_seg))
    bm = select_blocks(p_cmp, num_kv_heads=k.shape[2], block=block, stride=stride, block_sel=block_sel, top_n=top_n)
    if selected_fn is None:
        o_slc = nsa_selected_reference(q, k, v, bm, positions, block_sel=block_sel, segment_ids=segment_ids)
    else:
        o_slc = selected_fn(q, k, v, bm)
    o_win, _ = masked_attention(q, k, v, token_mask(positions, positions, segment_ids, window=window))
    return _mix(gates, o_cmp, o_slc, o_win), bm, (kc, vc, c_end)


def _mix(gates, o_cmp, o_slc, o_win):
    g = gates.astype(o_cmp.dtype)
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win


# Decode. A row's cache holds its keys in slots with per-slot positions (-1: empty); compressed block c covers the
# positions [c*stride, c*stride + block) and is kept once its last position is cached. A token's selection reads
# only its own compressed attention, so decoding the token at position t equals the forward at t (of any sequence
# holding positions 0..t: the forward is causal).


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
    Float[Array, "b s hq d"], Float[Array, "b nc hkv d"], Float[Array, "b nc hkv d"], Int[Array, "b nc"]
]:  # fmt: skip
    """`nsa_attention` of a prompt by position (blocks of positions, not of slots: a left-padded row gives what it
    gives alone) plus the decode state of a cache of `max_len` positions: (output, compressed keys, compressed
    values, their end positions (-1: not complete); see `nsa_decode`).
    Each row's valid positions must be distinct and < max(s, block) (a prompt at positions 0..n-1, in any slots);
    a token at a larger position gets NaN (checked with a ValueError when positions are concrete).
    `selected_fn(q, k, v, blocks, positions)` runs the selected branch (default: the reference)."""
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
    out, _, (kc, vc, c_end) = _nsa_parts(
        by_position(q), by_position(k), by_position(v), by_position(gates), pos,
        cmp_weights_k=cmp_weights_k, cmp_pos_k=cmp_pos_k, cmp_weights_v=cmp_weights_v, cmp_pos_v=cmp_pos_v,
        block=block, stride=stride, block_sel=block_sel, top_n=top_n, window=window, selected_fn=sel,
    )  # fmt: skip
    gather = jnp.clip(positions, 0, n - 1)[:, :, None, None]
    out = jnp.take_along_axis(out, gather, axis=1)
    out = jnp.where((positions < 0)[:, :, None, None], 0.0, jnp.where((positions >= n)[:, :, None, None], jnp.nan, out))
    nc_cache = num_cache_blocks(max_len, block=block, stride=stride)
    keep = min(kc.shape[1], nc_cache)
    fill = ((0, 0), (0, nc_cache - keep), (0, 0), (0, 0))
    cmp_k, cmp_v = jnp.pad(kc[:, :keep], fill), jnp.pad(vc[:, :keep], fill)
    cmp_end = jnp.pad(c_end[:, :keep], ((0, 0), (0, nc_cache - keep)), constant_values=-1)
    return out.astype(q.dtype), cmp_k, cmp_v, cmp_end


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
    *,
    block: int,
    stride: int,
    block_sel: int,
    top_n: int,
    window: int,
) -> Float[Array, "b 1 hq d"]:
    """One new token per row (sq == 1, at `positions`, already written into the caches, its compressed block too) over
    the cached keys at `slot_positions` (each < n, as a cache filled one position per slot holds them): the
    compressed branch over the complete blocks ending at or before it, its own top-n selection blocks (by position,
    first and own block forced, as `select_blocks`), the window. Dense masked reads of the cache (the reference
    path: one query per row reads each cached key once per branch)."""
    check_gqa(q, k_cache, v_cache)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if q.shape[1] != 1 or positions.shape != q.shape[:2]:
        raise ValueError(f"nsa_decode takes one token per row: q [b, 1, hq, d], positions [b, 1], got {q.shape}, "
                         f"{positions.shape}")  # fmt: skip
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    hkv, n = k_cache.shape[2], k_cache.shape[1]
    nsel = num_sel_blocks(n, block_sel=block_sel)
    t = positions[:, 0]
    o_cmp, p_cmp = masked_attention(q, cmp_k, cmp_v, compressed_mask(positions, cmp_end, None, cmp_end))
    imp = token_importance(p_cmp, num_kv_heads=hkv, block=block, stride=stride, block_sel=block_sel, num_sel=nsel)
    blocks = top_blocks(imp[:, :, 0], jnp.where(t >= 0, t // block_sel, -1)[:, None], top_n)  # [b, hkv, n]
    kb = jnp.where(slot_positions >= 0, slot_positions // block_sel, -1)
    picked = (blocks[:, :, :, None] == kb[:, None, None, :]).any(2) & (kb >= 0)[:, None, :]  # [b, hkv, n]
    m_slc = picked[:, :, None, :] & token_mask(positions, slot_positions)[:, None]
    o_slc, _ = masked_attention(q, k_cache, v_cache, m_slc)
    o_win, _ = masked_attention(q, k_cache, v_cache, token_mask(positions, slot_positions, window=window))
    return _mix(gates, o_cmp, o_slc, o_win)


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
) -> tuple[Float[Array, "b 1 hq d"], tuple[Array, Array, Array]]:
    """A decode step whose token's key/value are already in the caches at `slot`: store the compressed block it
    completes (per row: rows complete blocks at different steps), then `nsa_decode`. Returns (output, (cmp_k,
    cmp_v, cmp_end) updated)."""
    kw = dict(block=block, stride=stride)
    ck, c_idx = compress_cache_block(k_cache, slot_positions, slot, positions[:, 0], cmp_weights_k, cmp_pos_k, **kw)
    cv, _ = compress_cache_block(v_cache, slot_positions, slot, positions[:, 0], cmp_weights_v, cmp_pos_v, **kw)
    rows = jnp.arange(q.shape[0])
    target = jnp.where(c_idx >= 0, c_idx, cmp_k.shape[1])  # past the end: dropped
    cmp_k = cmp_k.at[rows, target].set(ck.astype(cmp_k.dtype), mode="drop")
    cmp_v = cmp_v.at[rows, target].set(cv.astype(cmp_v.dtype), mode="drop")
    cmp_end = cmp_end.at[rows, target].set(positions[:, 0], mode="drop")
    out = nsa_decode(q, k_cache, v_cache, gates, positions, slot_positions, cmp_k.astype(q.dtype),
                     cmp_v.astype(q.dtype), cmp_end, block=block, stride=stride, block_sel=block_sel, top_n=top_n,
                     window=window)  # fmt: skip
    return out, (cmp_k, cmp_v, cmp_end)


def nsa_pair_counts(
    blocks: Int[Array, "b s hkv n"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
    *,
    block: int,
    stride: int,
    block_sel: int,
    window: int,
) -> tuple[Float[Array, " b"], Float[Array, " b"], Float[Array, " b"]]:
    """(compressed, selected, window) (query, key) pairs each NSA branch of `nsa_attention` attends per batch row,
    for the selection `blocks` it returned: queries x visible compressed blocks (`compressed_mask`), each query x
    the visible keys (causal, padding, segment) of its selected blocks, and queries x their window keys. The
    selected count is the mean over kv heads (each kv head's selection serves its GQA group, so hq * mean is the
    per-query-head total), hence fractional. Padding queries attend nothing. Counted one chunk of block_sel queries
    at a time: memory O(b * block_sel * (s + hkv * n * block_sel)), no [s, s] array."""
    b, s = positions.shape
    nq = -(-s // block_sel)
    if blocks.ndim != 4 or blocks.shape[:2] != (b, s) or not jnp.issubdtype(blocks.dtype, jnp.integer):
        raise ValueError(f"blocks must be integer [{b}, {s}, hkv, n] (the selection nsa_attention returns), "
                         f"got {blocks.dtype}{list(blocks.shape)}")  # fmt: skip
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    c_end, c_seg = compressed_blocks(positions, block=block, stride=stride, segment_ids=seg)
    pad = nq * block_sel - s
    k_pos = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    k_seg = jnp.pad(seg, ((0, 0), (0, pad)))
    keys = selected_key_indices(jnp.pad(blocks, ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=-1), block_sel)
    chunks = tuple(jnp.moveaxis(x.reshape(b, nq, block_sel, *x.shape[2:]), 1, 0) for x in (k_pos, k_seg, keys))
    take = jax.vmap(lambda a, i: a[i])  # per batch row

    def step(args):
        qp, qs, kb = args  # [b, block_sel], [b, block_sel], [b, block_sel, hkv, nk]
        visible = token_mask(qp, k_pos, qs, k_seg)  # [b, block_sel, nq * block_sel]
        in_window = visible & (qp[:, :, None] - k_pos[:, None, :] < window)
        safe = jnp.clip(kb, 0, nq * block_sel - 1)
        kp, ks = take(k_pos, safe), take(k_seg, safe)
        qp4, qs4 = qp[:, :, None, None], qs[:, :, None, None]
        sel = (kb >= 0) & (qp4 >= 0) & (kp >= 0) & (kp <= qp4) & (ks == qs4)
        return (sel.sum((1, 3), dtype=jnp.int32), in_window.sum((1, 2), dtype=jnp.int32),
                compressed_mask(qp, c_end, qs, c_seg).sum((1, 2), dtype=jnp.int32))  # fmt: skip

    sel, win, cmp = jax.lax.map(step, chunks)  # [nq, b, hkv], [nq, b], [nq, b]
    selected = sel.astype(jnp.float32).sum(0).mean(-1)
    return cmp.astype(jnp.float32).sum(0), selected, win.astype(jnp.float32).sum(0)


def nsa_selected_reference(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    v: Float[Array, "b s hkv d"],
    blocks: Int[Array, "b s hkv n"],
    positions: Int[Array, "b s"],
    *,
    block_sel: int,
    segment_ids: Int[Array, "b s"] | None = None,
) -> Float[Array, "b s hq d"]:
    """Selected-blocks branch, dense masked reference (O(s^2) memory): each token attends to the visible keys of its
    own selected blocks (per kv head, shared by the GQA group)."""
    s = q.shape[1]
    m = selected_token_mask(blocks, block_sel, s) & token_mask(positions, positions, segment_ids)[:, None]
    return masked_attention(q, k, v, m)[0]


def resolve_impl(impl: str) -> str:
    """An `impl` of `SELECTED_IMPLS` with "auto" resolved: the Pallas kernel where it compiles (Triton on GPU,
    Mosaic on TPU), the jnp gather elsewhere."""
    if impl not in SELECTED_IMPLS:
        raise ValueError(f"impl {impl!r} not in {SELECTED_IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "gather"
    return impl


def nsa_selected(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    v: Float[Array, "b s hkv d"],
    blocks: Int[Array, "b s hkv n"],
    positions: Int[Array, "b s"],
    *,
    block_sel: int,
    segment_ids: Int[Array, "b s"] | None = None,
    impl: str = "auto",
    **kernel_kwargs,
) -> Float[Array, "b s hq d"]:
    """Selected-blocks branch: each token attends to the keys of its selected blocks (`selected_key_indices`, per kv
    head), masked per token (causal, padding, segment). impl: "reference" (`nsa_selected_reference`, dense, O(s^2)),
    "gather" (`pallas_kernels.topk_attention`'s jnp backend, memory O(s * hkv * n * block_sel * d)), "pallas"
    (`nsa_selected_kernel`: the top-k gather kernel, Triton on GPU, Mosaic on TPU; kernel_kwargs such as backend,
    interpret, block_k go to it), "auto" (pallas on GPU and TPU, else gather). Differentiable in q, k, v."""
    impl = resolve_impl(impl)
    if kernel_kwargs and impl != "pallas":
        raise ValueError(f"kernel arguments {sorted(kernel_kwargs)} only apply to impl='pallas', got impl={impl!r}")
    if impl == "reference":
        return nsa_selected_reference(q, k, v, blocks, positions, block_sel=block_sel, segment_ids=segment_ids)
    if impl == "gather":
        kernel_kwargs = {"backend": "reference"}
    return nsa_selected_kernel(q, k, v, blocks, positions, block_sel=block_sel, segment_ids=segment_ids,
                               **kernel_kwargs)  # fmt: skip


def nsa_selected_kernel(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b s hkv d"],
    v: Float[Array, "b s hkv d"],
    blocks: Int[Array, "b s hkv n"],
    positions: Int[Array, "b s"],
    *,
    block_sel: int,
    segment_ids: Int[Array, "b s"] | None = None,
    **kernel_kwargs,
) -> Float[Array, "b s hq d"]:
    """Selected-blocks branch on `pallas_kernels.topk_attention` (one program per token and kv head walks the
    token's n * block_sel listed keys; kernel_kwargs: backend, interpret, block_k, num_warps, num_stages). The key
    lists are int32 [b, s, hkv, n * block_sel]: memory O(s * hkv * top_n * block_sel), no [s, s] array."""
    check_gqa(q, k, v)
    b, s = q.shape[:2]
    if blocks.ndim != 4 or blocks.shape[:3] != (b, s, k.shape[2]):
        raise ValueError(f"blocks must be [{b}, {s}, {k.shape[2]}, n], got {blocks.shape}")
    return topk_attention(
        q,
        k,
        v,
        selected_key_indices(blocks, block_sel),
        causal=True,
        q_positions=positions,
        k_positions=positions,
        segment_ids=segment_ids,
        k_segment_ids=segment_ids,
        **kernel_kwargs,
    )
