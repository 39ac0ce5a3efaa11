"""Native Sparse Attention (Yuan et al. 2025) in pure jnp: block compression of keys/values, the compressed
branch, per-query-block top-n block selection from the compressed scores (shared across a GQA group), the
selected-blocks branch, a sliding window and the gated mix `sum_c g_c * o_c`.

Conventions: q [b, s, hq, d], k/v [b, s, hkv, d] (GQA, hq % hkv == 0), positions [b, s] with -1 for padding,
segment_ids [b, s] for packed sequences (tokens attend only within their segment). Causality is by position.
The selected-blocks branch also runs on `pallas_kernels.block_sparse_attention` through `nsa_block_layout`
(a per-batch, per-kv-head `BlockLayout`); `custom_block_layout` turns any FlexAttention-style block mask into one.
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
    idx = _compressed_token_index(x.shape[1], block, stride)
    if weights.shape != (block,) or pos_emb.shape != (block, x.shape[-1]):
        raise ValueError(
            f"weights must be [{block}] and pos_emb [{block}, {x.shape[-1]}], got {weights.shape}, {pos_emb.shape}"
        )
    c_end, c_seg = compressed_blocks(positions, block=block, stride=stride, segment_ids=segment_ids)
    xb = x[:, idx] + pos_emb[None, None, :, None, :].astype(x.dtype)  # [b, nc, l, h, d]
    return jnp.einsum("bclhd,l->bchd", xb, weights.astype(x.dtype)), c_end, c_seg


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
    start = jnp.arange(nc) * stride
    tok = jnp.arange(nsel) * block_sel
    overlap = (start[:, None] < tok[None, :] + block_sel) & (start[:, None] + block > tok[None, :])  # [nc, nsel]
    imp = jnp.einsum("bhqc,cn->bhqn", jax.lax.stop_gradient(p_cmp), overlap.astype(p_cmp.dtype))
    imp = imp.reshape(b, num_kv_heads, hq // num_kv_heads, s, nsel).sum(2)
    imp = jnp.pad(imp, ((0, 0), (0, 0), (0, nsel * block_sel - s), (0, 0)))
    imp = imp.reshape(b, num_kv_heads, nsel, block_sel, nsel).sum(3)  # [b, hkv, nq, nsel]
    qi, kj = jnp.arange(nsel)[:, None], jnp.arange(nsel)[None, :]
    forced = (kj == 0) | (kj == qi)
    score = jnp.where(kj <= qi, jnp.where(forced, jnp.inf, imp), -jnp.inf)
    n = min(top_n, nsel)
    vals, idx = jax.lax.top_k(score, n)
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
    g = gates.astype(q.dtype)
    out = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
    return out, bm


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
