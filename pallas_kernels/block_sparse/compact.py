"""Compact ("gathered") SRA attention: attention cost grows with K^2 (K critical tokens), not N^2.

The SRA rule (j visible to i iff same segment, 0 <= pos_j <= pos_i, and pos_i - pos_j < window, or pos_j <
num_global, or j critical and (i critical or queries == "all")) is split into disjoint parts:

- part A, every query: the window band, through the block-sparse kernels with a band layout (about window / N
  of the causal blocks);
- part G, every query: the global keys outside the window (pos_i - pos_j >= window, pos_j < num_global), N x
  num_global in dense jnp (in the band layout every query block would visit the first key block: a serial tail
  in the dK/dV pass). With segment ids (the globals repeat per segment) they stay in part A instead;
- part B, the critical keys that part A does not already count (pos_i - pos_j >= window, pos_j >= num_global),
  gathered into a compact K/V buffer of static width `max_critical`. Their positions are shifted by `window`, so
  the kernels' plain causal rule (shifted pos_j <= pos_i) *is* pos_i - pos_j >= window. Queries: the gathered
  critical queries (K x K work) when queries == "critical", every query (N x K) when queries == "all". The
  gathered tokens keep their sequence order, so the compact grid is causal by blocks too.

The parts are merged per query with their log-sum-exps (part B only on its gathered rows). Gradient: each
part's flash backward is called with the MERGED output and the MERGED log-sum-exp as residuals (the
ring-attention trick: then P = exp(S - L_union) and D = rowsum(dO * O_union) are those of the union softmax),
and the parts' dQ / dK / dV are summed (added back into the gathered rows).

jax only; the kernels are the block-sparse ones (Triton / Mosaic GPU / Mosaic TPU), or dense jnp per part for
backend "reference" (which still runs the split and the merge).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.block_sparse import gpu
from pallas_kernels.block_sparse.dispatch import BACKENDS, KernelCall, pack_fields, pad_seq, resolve_backend
from pallas_kernels.block_sparse.layout import BlockLayout, sra_layout
from pallas_kernels.block_sparse.token_mask import MaskRule, TokenInfo, query_rows, token_mask
from pallas_kernels.finite import exclude_nonfinite_keys

QUERIES = ("critical", "all")
LN2 = math.log(2.0)


def compact_block(length: int, block: int = 128) -> int:
    """The kernel block for a sequence of `length` tokens: `block`, shrunk to a power of two >= 16 when short."""
    return min(block, max(16, 1 << max(length - 1, 1).bit_length()))


def estimated_blocks(
    seq_q: int, seq_k: int, *, window: int, num_global: int, max_critical: int, queries: str, block: int = 128
) -> tuple[int, int]:
    """(compact, plain) number of kernel blocks visited, the plain block-sparse layout counted at its worst case
    (scattered critical keys: every causal block holds one, as measured with a random router)."""
    nq, nk = -(-seq_q // block), -(-seq_k // block)
    plain = nq * (nq + 1) // 2 if seq_q == seq_k else nq * nk
    band = nq * (min(-(-window // block), nk) + 1) + (nq if num_global else 0)
    m = -(-max_critical // block)
    crit = (m * (m + 1)) // 2 if queries == "critical" else nq * m
    return band + crit, plain


def compact_is_cheaper(
    seq_q: int,
    seq_k: int,
    *,
    window: int,
    num_global: int,
    max_critical: int | None,
    queries: str,
    block: int = 128,
) -> bool:
    """The static rule `sra_jax` uses: the compact path when its estimated block count is at most half the
    plain layout's worst case (the other half pays for the gathers, the merge and the second kernel launch)."""
    if max_critical is None:
        return False
    compact, plain = estimated_blocks(
        seq_q, seq_k, window=window, num_global=num_global, max_critical=max_critical, queries=queries, block=block
    )
    return 2 * compact <= plain


def compact_bounds(
    seq_q: int, seq_k: int, *, window: int, num_global: int, queries: str, block: int = 128
) -> tuple[int, ...]:
    """Ascending static bounds on critical tokens per row (block * 2^i, at most seq_k) at which the compact path
    is cheaper than the plain layout: when no static bound is given, the caller rounds the counted critical
    tokens up to the first of these (so nearby counts share one compiled program), or takes the plain layout when
    the count is above them all. Rounding up costs at most 2x the bound, i.e. <= 4x the K x K part."""
    bounds = []
    bound = block
    while bound < 2 * seq_k:
        bound_k = min(bound, seq_k)
        if not compact_is_cheaper(
            seq_q, seq_k, window=window, num_global=num_global, max_critical=bound_k, queries=queries, block=block
        ):
            break
        bounds.append(bound_k)
        bound *= 2
    return tuple(dict.fromkeys(bounds))


def critical_counts(
    q_positions: Int[Array, "b sq"],
    k_positions: Int[Array, "b sk"],
    q_critical: Bool[Array, "b sq"],
    k_critical: Bool[Array, "b sk"],
    *,
    num_global: int,
    queries: str,
) -> Int[Array, " b"]:
    """Per row, what `max_critical` must bound: critical keys at positions >= num_global (part B's keys) and,
    for queries == "critical", the critical non-padding queries."""
    counts = (jnp.asarray(k_critical, bool) & (k_positions >= num_global)).sum(1)
    if queries == "critical":
        counts = jnp.maximum(counts, (jnp.asarray(q_critical, bool) & (q_positions >= 0)).sum(1))
    return counts.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------- one part
@dataclasses.dataclass(frozen=True)
class _Part:
    """Static description of one part's kernel call."""

    rule: MaskRule
    sm_scale: float
    backend: str
    config: gpu.GpuConfig
    interpret: bool

    def _static(self, fields):
        return KernelCall(
            rule=self.rule,
            sm_scale=self.sm_scale,
            fields=fields,
            backend=self.backend,
            config=self.config,
            interpret=self.interpret,
        )


def _packed(tokens: TokenInfo):
    q_tok, q_fields = pack_fields({"pos": tokens.q_positions, "seg": tokens.q_segment_ids})
    k_tok, k_fields = pack_fields({"pos": tokens.k_positions, "seg": tokens.k_segment_ids})
    return q_tok, k_tok, (q_fields, k_fields)


def _dense_scores(q, k, scale):
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, sq, hkv, hq // hkv, d)
    return jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale  # [b, hkv, g, q, k]


def _lse_from_kernel(lse, backend):
    """Kernel lse -> [b, sq, hq] natural log, -inf on empty rows."""
    if backend == "tpu":
        lse = lse[..., 0]
    else:  # triton / mosaic_gpu: log2 units
        lse = lse * LN2
    lse = jnp.where(jnp.isposinf(lse), -jnp.inf, lse)
    return lse.swapaxes(1, 2)


def _lse_to_kernel(lse, backend):
    """[b, sq, hq] natural log (-inf empty) -> the kernel's convention (+inf empty)."""
    lse = lse.swapaxes(1, 2)
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
    if backend == "tpu":
        return lse[..., None]
    return lse * (1.0 / LN2)


def part_forward(part: _Part, q, k, v, layout: BlockLayout | None, tokens: TokenInfo):
    """(out [b, sq, hq, d] in q's dtype, lse [b, sq, hq] f32 natural log, -inf where nothing is visible)."""
    if part.backend == "reference":
        mask = token_mask(part.rule, tokens)[:, None, None]  # [b, 1, 1, q, k]
        s = jnp.where(mask, _dense_scores(q, k, part.sm_scale), -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = p.sum(-1, keepdims=True)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]  # [b, hkv, g, q]
        out = jnp.einsum("bhgqk,bkhd->bqhgd", p / jnp.where(l > 0, l, 1.0), v.astype(jnp.float32))
        b, sq, hq, d = q.shape
        return out.reshape(b, sq, hq, d).astype(q.dtype), lse.reshape(b, hq, sq).swapaxes(1, 2)
    q_tok, k_tok, fields = _packed(tokens)
    kernels, kwargs = part._static(fields).kernels()
    out, lse = kernels.forward(q, k, v, layout, q_tok, k_tok, **kwargs)
    return out, _lse_from_kernel(lse, part.backend)


def part_backward(part: _Part, q, k, v, layout: BlockLayout | None, tokens: TokenInfo, out, lse, do):
    """Flash backward of one part with the given residuals (out, lse [b, sq, hq] natural log): with the merged
    output and log-sum-exp these are the part's share of the union softmax's gradients. Returns (dq, dk, dv)."""
    if part.backend == "reference":
        b, sq, hq, d = q.shape
        hkv = k.shape[2]
        g = hq // hkv
        mask = token_mask(part.rule, tokens)[:, None, None]
        lse_g = lse.swapaxes(1, 2).reshape(b, hkv, g, sq)[..., None]
        p = jnp.where(mask & jnp.isfinite(lse_g), jnp.exp(_dense_scores(q, k, part.sm_scale) - lse_g), 0.0)
        dog = do.astype(jnp.float32).reshape(b, sq, hkv, g, d)
        delta = jnp.einsum("bqhgd,bqhgd->bhgq", dog, out.astype(jnp.float32).reshape(b, sq, hkv, g, d))
        dv = jnp.einsum("bhgqk,bqhgd->bkhd", p, dog)
        dp = jnp.einsum("bqhgd,bkhd->bhgqk", dog, v.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * part.sm_scale
        dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k.astype(jnp.float32)).reshape(q.shape)
        dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, q.astype(jnp.float32).reshape(b, sq, hkv, g, d))
        return dq, dk, dv
    q_tok, k_tok, fields = _packed(tokens)
    kernels, kwargs = part._static(fields).kernels()
    return kernels.backward(
        q, k, v, out.astype(q.dtype), _lse_to_kernel(lse, part.backend), do.astype(q.dtype), layout, q_tok, k_tok,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------- gather / merge
def compact_indices(flags: Bool[Array, "b s"], width: int) -> Int[Array, "b w"]:
    """Indices of the True entries of each row in order, `width` slots; empty slots hold s (out of range).
    Entries past `width` are dropped (the caller checks the count)."""
    s = flags.shape[1]
    slot = jnp.where(flags, jnp.cumsum(flags, axis=1) - 1, width)
    src = jnp.arange(s, dtype=jnp.int32)
    # per row (vmap): a 1-d scatter needs no row-index arithmetic
    return jax.vmap(lambda row: jnp.full((width,), s, jnp.int32).at[row].set(src, mode="drop"))(slot)


def _gather(x, idx, fill):
    """x [b, s, ...] at idx [b, w] with entries in [0, s] (s = empty slot -> fill)."""
    s = x.shape[1]
    safe = jnp.minimum(idx, s - 1)  # in bounds: the gather needs no fill or clip of its own
    got = jnp.take_along_axis(x, safe.reshape(safe.shape + (1,) * (x.ndim - 2)), axis=1, mode="promise_in_bounds")
    empty = (idx >= s).reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.where(empty, jnp.asarray(fill, x.dtype), got)


def _scatter(x_like, idx, vals):
    """x_like with vals [b, w, ...] set at its rows idx [b, w] (entry s: dropped), one batch row at a time."""
    return jax.vmap(lambda x, i, val: x.at[i].set(val, mode="drop"))(x_like, idx, vals)


def merge(out_a, lse_a, out_b, lse_b):
    """Union of two disjoint softmaxes from (out, lse [b, s, h] natural log, -inf empty): (out f32, lse)."""
    m = jnp.maximum(lse_a, lse_b)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    total = wa + wb
    nonempty = total > 0
    lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, total, 1.0)), -jnp.inf)
    inv = 1.0 / jnp.where(nonempty, total, 1.0)
    out = (out_a.astype(jnp.float32) * (wa * inv)[..., None]) + (out_b.astype(jnp.float32) * (wb * inv)[..., None])
    return out, lse


# -------------------------------------------------------------------------------------------- custom_vjp
@dataclasses.dataclass(frozen=True)
class _Static:
    part_a: _Part  # window band (and the global keys when part_g is None)
    part_g: _Part | None  # global keys outside the window, dense jnp (N x num_global)
    part_b: _Part | None  # compact critical keys outside the window; None when max_critical == 0
    gather_queries: bool  # queries == "critical"


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["layout_a", "tokens_a", "tokens_g", "g_idx", "layout_b", "tokens_b", "q_idx", "k_idx"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class _Plan:
    """Integer inputs of the parts (padded to the blocks): layouts, tokens, gather indices. Plain `Any`
    annotations: jax rebuilds pytree nodes with placeholder leaves, which a type check would reject."""

    layout_a: Any  # BlockLayout
    tokens_a: Any  # TokenInfo
    tokens_g: Any  # TokenInfo | None
    g_idx: Any  # [b, num_global] gathered global key rows, or None
    layout_b: Any  # BlockLayout | None
    tokens_b: Any  # TokenInfo | None
    q_idx: Any  # [b, mq] gathered query rows (queries == "critical"), or None
    k_idx: Any  # [b, mk] gathered critical key rows, or None


def _part_b_inputs(st: _Static, plan: _Plan, q, k, v):
    cq = _gather(q, plan.q_idx, 0) if st.gather_queries else q
    return cq, _gather(k, plan.k_idx, 0), _gather(v, plan.k_idx, 0)


def _add_rows(x, idx, vals):
    """x with vals [b, w, ...] added (in f32) to its rows idx (distinct; empty slots dropped)."""
    rows = _gather(x, idx, 0).astype(jnp.float32) + vals.astype(jnp.float32)
    return _scatter(x, idx, rows.astype(x.dtype))


def _forward(q, k, v, plan: _Plan, st: _Static):
    """(out in q's dtype, lse [b, s, hq] natural log) of the union of the parts."""
    out, lse = part_forward(st.part_a, q, k, v, plan.layout_a, plan.tokens_a)
    if st.part_g is not None:
        gk, gv = _gather(k, plan.g_idx, 0), _gather(v, plan.g_idx, 0)
        out_g, lse_g = part_forward(st.part_g, q, gk, gv, None, plan.tokens_g)
        out, lse = merge(out, lse, out_g, lse_g)
        out = out.astype(q.dtype)
    if st.part_b is not None:
        cq, ck, cv = _part_b_inputs(st, plan, q, k, v)
        out_b, lse_b = part_forward(st.part_b, cq, ck, cv, plan.layout_b, plan.tokens_b)
        if st.gather_queries:  # merge only the K gathered rows
            rows_o, rows_l = merge(_gather(out, plan.q_idx, 0), _gather(lse, plan.q_idx, -jnp.inf), out_b, lse_b)
            out = _scatter(out, plan.q_idx, rows_o.astype(out.dtype))
            lse = _scatter(lse, plan.q_idx, rows_l)
        else:
            out, lse = merge(out, lse, out_b, lse_b)
            out = out.astype(q.dtype)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _compact(q, k, v, plan: _Plan, st: _Static):
    return _forward(q, k, v, plan, st)[0]


def _compact_fwd(q, k, v, plan: _Plan, st: _Static):
    out, lse = _forward(q, k, v, plan, st)
    return out, (q, k, v, plan, out, lse)


def _compact_bwd(st: _Static, residuals, do):
    q, k, v, plan, out, lse = residuals
    dq, dk, dv = part_backward(st.part_a, q, k, v, plan.layout_a, plan.tokens_a, out, lse, do)
    if st.part_g is not None:
        gk, gv = _gather(k, plan.g_idx, 0), _gather(v, plan.g_idx, 0)
        dqg, dkg, dvg = part_backward(st.part_g, q, gk, gv, None, plan.tokens_g, out, lse, do)
        dq = (dq.astype(jnp.float32) + dqg).astype(q.dtype)
        dk, dv = _add_rows(dk, plan.g_idx, dkg), _add_rows(dv, plan.g_idx, dvg)
    if st.part_b is not None:
        cq, ck, cv = _part_b_inputs(st, plan, q, k, v)
        if st.gather_queries:
            c_out, c_lse, c_do = (
                _gather(out, plan.q_idx, 0),
                _gather(lse, plan.q_idx, -jnp.inf),
                _gather(do, plan.q_idx, 0),
            )
        else:
            c_out, c_lse, c_do = out, lse, do
        dcq, dck, dcv = part_backward(st.part_b, cq, ck, cv, plan.layout_b, plan.tokens_b, c_out, c_lse, c_do)
        if st.gather_queries:
            dq = _add_rows(dq, plan.q_idx, dcq)
        else:
            dq = (dq.astype(jnp.float32) + dcq.astype(jnp.float32)).astype(q.dtype)
        dk, dv = _add_rows(dk, plan.k_idx, dck), _add_rows(dv, plan.k_idx, dcv)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_compact.defvjp(_compact_fwd, _compact_bwd)


# ------------------------------------------------------------------------------------------------ public
def _check_args(q, k, v, window, num_global, queries, max_critical):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [b, s, h, d]; got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"q, k, v must share one dtype of bf16, f16, f32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"k {k.shape} / v {v.shape} do not fit q {q.shape} (same batch, head_dim; GQA heads)")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window ({window!r}) must be an integer >= 1 (it counts the token itself)")
    if not isinstance(num_global, int) or num_global < 0:
        raise ValueError(f"num_global ({num_global!r}) must be an integer >= 0")
    if queries not in QUERIES:
        raise ValueError(f"queries ({queries!r}) must be one of {QUERIES}")
    if not isinstance(max_critical, int) or max_critical < 0:
        raise ValueError(f"max_critical ({max_critical!r}) must be an integer >= 0")


def _check_counts(counts, bound, what):
    """counts > bound per row; raises on concrete counts (traced ones NaN-poison their rows instead)."""
    try:
        concrete = np.asarray(counts)
    except jax.errors.TracerArrayConversionError:
        return counts > bound
    if (concrete > bound).any():
        raise ValueError(f"{int(concrete.max())} {what} {bound} in a row")
    return counts > bound


def sra_compact_attention(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    *,
    q_positions: Int[Array, "b sq"],
    k_positions: Int[Array, "b sk"],
    q_critical: Bool[Array, "b sq"],
    k_critical: Bool[Array, "b sk"],
    window: int,
    num_global: int,
    queries: str,
    max_critical: int,
    segment_ids: Int[Array, "b sq"] | None = None,
    k_segment_ids: Int[Array, "b sk"] | None = None,
    sm_scale: float | None = None,
    backend: str = "auto",
    block: int = 128,
    config: gpu.GpuConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "b sq hq d"]:
    """Exact SRA attention with the critical tokens gathered into a compact K/V buffer (see the module doc).

    Positions < 0 are padding (never visible; a padding query row gives zeros). `max_critical` (static) bounds
    the critical keys (and, for queries == "critical", the critical queries) per row; keys at positions <
    num_global do not count (parts A and G cover them). A row holding more gives a ValueError for concrete
    inputs and NaN output for that row under jit. backend: "triton" / "mosaic_gpu" / "tpu" kernels,
    "reference" (dense jnp per part, same split and merge), "auto" (by platform). `block`: kernel block (shrunk
    for short sequences); `config`: Triton tiles. Differentiable in q, k, v."""
    _check_args(q, k, v, window, num_global, queries, max_critical)
    if (segment_ids is None) != (k_segment_ids is None) and q.shape[1] != k.shape[1]:
        raise ValueError("k_segment_ids is needed with segment_ids when query and key lengths differ")
    if k_segment_ids is None:
        k_segment_ids = segment_ids
    if (segment_ids is None) != (k_segment_ids is None):
        raise ValueError("segment ids must be given for both queries and keys, or for neither")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} not in {BACKENDS}")
    backend = resolve_backend(backend)
    b, sq = q.shape[:2]
    sk = k.shape[1]
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    cfg = config or gpu.GpuConfig()
    as_i32 = lambda x: None if x is None else jnp.asarray(x).astype(jnp.int32)
    q_positions, k_positions = as_i32(q_positions), as_i32(k_positions)
    segment_ids, k_segment_ids = as_i32(segment_ids), as_i32(k_segment_ids)
    has_seg = segment_ids is not None

    # Part A: the window band on the block-padded sequence (plus the global keys when segments are given).
    bq, bk = compact_block(sq, block), compact_block(sk, block)
    qa = pad_seq(q, bq, 0)
    ka, va = pad_seq(k, bk, 0), pad_seq(v, bk, 0)
    qpos_a, kpos_a = pad_seq(q_positions, bq, -1), pad_seq(k_positions, bk, -1)
    qseg_a = None if not has_seg else pad_seq(segment_ids, bq, 0)
    kseg_a = None if not has_seg else pad_seq(k_segment_ids, bk, 0)
    # Global keys get their own dense part (N x num_global) unless segments repeat them per segment: in the
    # band layout every query block would visit the first key block, a serial tail for the dK/dV pass.
    split_globals = num_global > 0 and not has_seg
    global_a = 0 if split_globals else num_global
    rule_a = MaskRule(causal=True, window=window, num_global=global_a, has_segments=has_seg)
    layout_a = sra_layout(
        qpos_a, kpos_a, block_q=bq, block_k=bk, window=window, num_global=global_a,
        segment_ids=qseg_a, k_segment_ids=kseg_a,
    )
    tokens_a = TokenInfo(qpos_a, kpos_a, qseg_a, kseg_a)
    part_a = _Part(rule_a, scale, backend, cfg, interpret)
    shift = lambda pos: jnp.where(pos >= 0, pos + window, -1)  # shifted keys: causal <=> q_pos - k_pos >= window

    overflow = jnp.zeros((b,), bool)
    part_g = tokens_g = g_idx = None
    if split_globals:
        g_flags = (kpos_a >= 0) & (kpos_a < num_global)
        what = "keys at positions < num_global (a position may not repeat without segment ids) exceed num_global ="
        overflow |= _check_counts(g_flags.sum(1), num_global, what)
        g_idx = compact_indices(g_flags, num_global)
        tokens_g = TokenInfo(qpos_a, shift(_gather(kpos_a, g_idx, -1)))
        part_g = _Part(MaskRule(causal=True), scale, "reference", cfg, interpret)

    k_flags = pad_seq(jnp.asarray(k_critical, bool), bk, False) & (kpos_a >= num_global)
    q_flags = pad_seq(jnp.asarray(q_critical, bool), bq, False) & (qpos_a >= 0)
    counts = critical_counts(qpos_a, kpos_a, q_flags, k_flags, num_global=num_global, queries=queries)
    what = "critical tokens (keys at positions >= num_global) exceed max_critical ="
    overflow |= _check_counts(counts, max_critical, what)

    part_b = layout_b = tokens_b = q_idx = k_idx = None
    if max_critical > 0:
        bc = compact_block(max_critical, block)
        width = -(-max_critical // bc) * bc
        k_idx = compact_indices(k_flags, width)
        ck_pos = shift(_gather(kpos_a, k_idx, -1))
        ck_seg = None if not has_seg else _gather(kseg_a, k_idx, 0)
        if queries == "critical":
            q_idx = compact_indices(q_flags, width)
            cq_pos = _gather(qpos_a, q_idx, -1)
            cq_seg = None if not has_seg else _gather(qseg_a, q_idx, 0)
            cbq = bc
        else:
            cq_pos, cq_seg, cbq = qpos_a, qseg_a, bq
        layout_b = sra_layout(
            cq_pos, ck_pos, block_q=cbq, block_k=bc, segment_ids=cq_seg, k_segment_ids=ck_seg
        )
        tokens_b = TokenInfo(cq_pos, ck_pos, cq_seg, ck_seg)
        part_b = _Part(MaskRule(causal=True, has_segments=has_seg), scale, backend, cfg, interpret)

    plan = _Plan(layout_a, tokens_a, tokens_g, g_idx, layout_b, tokens_b, q_idx, k_idx)
    st = _Static(part_a, part_g, part_b, queries == "critical")
    # The union of the parts is the SRA rule on the padded tokens: the rows that see a non-finite key come from it.
    rule = MaskRule(causal=True, window=window, num_global=num_global, has_segments=has_seg, has_k_critical=True,
                    has_q_critical=queries == "critical")
    tokens = TokenInfo(qpos_a, kpos_a, qseg_a, kseg_a, q_flags, k_flags)
    out = exclude_nonfinite_keys(
        lambda q, k, v: _compact(q, k, v, plan, st), qa, ka, va,
        lambda start, size: token_mask(rule, query_rows(tokens, start, size)),
    )[:, :sq]
    return jnp.where(overflow[:, None, None, None], jnp.nan, out).astype(q.dtype)
