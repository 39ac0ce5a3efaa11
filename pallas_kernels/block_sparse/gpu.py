"""GPU backend: Pallas kernels lowered through Triton (run with interpret=True on CPU in tests).

Forward (flash attention, log2-domain online softmax, stores logsumexp), dQ pass over the layout and dK/dV pass
over the transposed layout; nothing of size N x N is ever materialised. Each row's visited blocks come full
first (no token mask computed) then partial (token mask from explicit positions). The dK/dV program owns one
kv block of one kv head and loops over the query heads of its group, so the group's gradients accumulate in
registers and are written once.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse.layout import BlockLayout
from pallas_kernels.block_sparse.token_mask import MaskRule, visible

LOG2E = math.log2(math.e)
NEG = -1e30  # finite "minus infinity": keeps exp2(s - m) free of inf - inf for rows with nothing visible yet


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Tile sizes. Each outer tile must divide the layout block on its axis, each inner tile likewise."""

    fwd_block_q: int = 128
    fwd_block_k: int = 128
    fwd_warps: int = 8
    fwd_stages: int = 3
    dq_block_q: int = 128
    dq_block_k: int = 64
    dkv_block_k: int = 128
    dkv_block_q: int = 64
    dq_warps: int = 8
    dq_stages: int = 2
    dkv_warps: int = 8
    dkv_stages: int = 2

    def tile(self, wanted: int, block: int, what: str) -> int:
        tile = min(wanted, block)
        if block % tile:
            raise ValueError(f"{what} tile {tile} must divide the layout block {block}")
        return tile


def _dot_kwargs(dtype) -> dict:
    # f32 inputs get full-precision dots (tf32 would cost ~1e-3 relative error); 16-bit inputs use the tensor cores.
    return {"allow_tf32": False} if dtype == jnp.float32 else {}


def _tokens(ref, start, size, fields):
    """Slice each token field (positions, segment ids, critical flags) of a [F, S] token ref."""
    vals = {name: ref[f, pl.ds(start, size)] for f, name in enumerate(fields)}
    return vals.get("pos"), vals.get("seg"), vals.get("crit")


def _mask(rule, qt, kt):
    q_pos, q_seg, q_crit = qt
    k_pos, k_seg, k_crit = kt
    col = lambda x: None if x is None else x[:, None]
    row = lambda x: None if x is None else x[None, :]
    return visible(rule, col(q_pos), row(k_pos), col(q_seg), row(k_seg), col(q_crit), row(k_crit))


def _fwd_kernel(
    idx_ref,
    cnt_ref,
    q_ref,
    k_ref,
    v_ref,
    qt_ref,
    kt_ref,
    o_ref,
    lse_ref,
    *,
    rule,
    scale,
    tile_k,
    block_k,
    num_tiles,
    q_fields,
    k_fields,
    dot_kw,
):
    tile_q = q_ref.shape[0]
    q_tile = num_tiles - 1 - pl.program_id(0)
    q = q_ref[...]
    qt = _tokens(qt_ref, q_tile * tile_q, tile_q, q_fields)
    d = q.shape[-1]

    def step(start, carry, masked):
        m, l, acc = carry
        k = k_ref[pl.ds(start, tile_k), :]
        v = v_ref[pl.ds(start, tile_k), :]
        s = plgpu.dot(q, k, trans_b=True, **dot_kw) * scale
        if masked:
            vis = _mask(rule, qt, _tokens(kt_ref, start, tile_k, k_fields))
            s = jnp.where(vis, s, NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(vis, p, 0.0)
        l = l * alpha + p.sum(axis=-1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, **dot_kw)
        return m_new, l, acc

    def body(masked):
        def visit(j, carry):
            base = idx_ref[j] * block_k
            for sub in range(block_k // tile_k):
                carry = step(pl.multiple_of(base + sub * tile_k, tile_k), carry, masked)
            return carry

        return visit

    carry = (
        jnp.full((tile_q,), NEG, jnp.float32),
        jnp.zeros((tile_q,), jnp.float32),
        jnp.zeros((tile_q, d), jnp.float32),
    )
    n_full = cnt_ref[1]
    carry = jax.lax.fori_loop(0, n_full, body(False), carry)
    m, l, acc = jax.lax.fori_loop(n_full, cnt_ref[0], body(True), carry)
    nonempty = l > 0
    o_ref[...] = (acc / jnp.where(nonempty, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log2(jnp.where(nonempty, l, 1.0)), jnp.inf)


def _dq_kernel(
    idx_ref,
    cnt_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qt_ref,
    kt_ref,
    dq_ref,
    *,
    rule,
    scale,
    sm_scale,
    tile_k,
    block_k,
    num_tiles,
    q_fields,
    k_fields,
    dot_kw,
):
    tile_q = q_ref.shape[0]
    q_tile = num_tiles - 1 - pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    qt = _tokens(qt_ref, q_tile * tile_q, tile_q, q_fields)

    def step(start, dq, masked):
        k = k_ref[pl.ds(start, tile_k), :]
        v = v_ref[pl.ds(start, tile_k), :]
        p = jnp.exp2(plgpu.dot(q, k, trans_b=True, **dot_kw) * scale - lse[:, None])
        if masked:
            p = jnp.where(_mask(rule, qt, _tokens(kt_ref, start, tile_k, k_fields)), p, 0.0)
        dp = plgpu.dot(do, v, trans_b=True, **dot_kw)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k, **dot_kw)

    def body(masked):
        def visit(j, dq):
            base = idx_ref[j] * block_k
            for sub in range(block_k // tile_k):
                dq = step(pl.multiple_of(base + sub * tile_k, tile_k), dq, masked)
            return dq

        return visit

    dq = jnp.zeros(q.shape, jnp.float32)
    n_full = cnt_ref[1]
    dq = jax.lax.fori_loop(0, n_full, body(False), dq)
    dq = jax.lax.fori_loop(n_full, cnt_ref[0], body(True), dq)
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(
    idx_ref,
    cnt_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qt_ref,
    kt_ref,
    dk_ref,
    dv_ref,
    *,
    rule,
    scale,
    sm_scale,
    tile_q,
    block_q,
    group,
    heads_per_layout_head,
    q_fields,
    k_fields,
    dot_kw,
):
    tile_k = k_ref.shape[0]
    k_tile = pl.program_id(0)
    kv_head = pl.program_id(2)
    k = k_ref[...]
    v = v_ref[...]
    kt = _tokens(kt_ref, k_tile * tile_k, tile_k, k_fields)

    # Transposed orientation (rows = keys): P^T and dS^T come straight out of the dots, so no register tile
    # is ever transposed before feeding the next dot.
    def step(g, start, carry, masked):
        dk, dv = carry
        q = q_ref[pl.ds(start, tile_q), g, :]
        do = do_ref[pl.ds(start, tile_q), g, :]
        lse = lse_ref[g, pl.ds(start, tile_q)]
        delta = delta_ref[g, pl.ds(start, tile_q)]
        p_t = jnp.exp2(plgpu.dot(k, q, trans_b=True, **dot_kw) * scale - lse[None, :])
        if masked:
            q_pos, q_seg, q_crit = _tokens(qt_ref, start, tile_q, q_fields)
            k_pos, k_seg, k_crit = kt
            row = lambda x: None if x is None else x[None, :]
            col = lambda x: None if x is None else x[:, None]
            vis_t = visible(rule, row(q_pos), col(k_pos), row(q_seg), col(k_seg), row(q_crit), col(k_crit))
            p_t = jnp.where(vis_t, p_t, 0.0)
        dv = dv + plgpu.dot(p_t.astype(do.dtype), do, **dot_kw)
        dp_t = plgpu.dot(v, do, trans_b=True, **dot_kw)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dk + plgpu.dot(ds_t.astype(q.dtype), q, **dot_kw)
        return dk, dv

    def head(g, carry):
        layout_head = (kv_head * group + g) // heads_per_layout_head

        def body(masked):
            def visit(j, carry):
                base = idx_ref[layout_head, j] * block_q
                for sub in range(block_q // tile_q):
                    carry = step(g, pl.multiple_of(base + sub * tile_q, tile_q), carry, masked)
                return carry

            return visit

        n_full = cnt_ref[layout_head, 1]
        carry = jax.lax.fori_loop(0, n_full, body(False), carry)
        return jax.lax.fori_loop(n_full, cnt_ref[layout_head, 0], body(True), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _common(q, k, layout: BlockLayout):
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    return b, sq, k.shape[1], hq, hkv, d, hq // hkv, hq // layout.num_heads


def forward(
    q,
    k,
    v,
    layout: BlockLayout,
    q_tok,
    k_tok,
    *,
    rule: MaskRule,
    sm_scale: float,
    fields,
    config: GpuConfig,
    interpret: bool = False,
):
    """Returns (out [b, sq, hq, d], lse [b, hq, sq] f32 in log2 units; +inf on rows with nothing visible)."""
    b, sq, sk, hq, _hkv, d, group, per_lh = _common(q, k, layout)
    tq = config.tile(config.fwd_block_q, layout.block_q, "forward query")
    tk = config.tile(config.fwd_block_k, layout.block_k, "forward key")
    nt = sq // tq
    ratio = layout.block_q // tq
    counts = jnp.stack([layout.kv_counts, layout.kv_full], axis=-1)
    wk = layout.kv_indices.shape[-1]
    kernel = functools.partial(
        _fwd_kernel,
        rule=rule,
        scale=sm_scale * LOG2E,
        tile_k=tk,
        block_k=layout.block_k,
        num_tiles=nt,
        q_fields=fields[0],
        k_fields=fields[1],
        dot_kw=_dot_kwargs(q.dtype),
    )
    rev = lambda i: nt - 1 - i
    return pl.pallas_call(
        kernel,
        grid=(nt, b, hq),
        in_specs=[
            pl.BlockSpec((None, None, None, wk), lambda i, bi, h: (bi, h // per_lh, rev(i) // ratio, 0)),
            pl.BlockSpec((None, None, None, 2), lambda i, bi, h: (bi, h // per_lh, rev(i) // ratio, 0)),
            pl.BlockSpec((None, tq, None, d), lambda i, bi, h: (bi, rev(i), h, 0)),
            pl.BlockSpec((None, sk, None, d), lambda i, bi, h: (bi, 0, h // group, 0)),
            pl.BlockSpec((None, sk, None, d), lambda i, bi, h: (bi, 0, h // group, 0)),
            pl.BlockSpec((None, q_tok.shape[1], sq), lambda i, bi, h: (bi, 0, 0)),
            pl.BlockSpec((None, k_tok.shape[1], sk), lambda i, bi, h: (bi, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, tq, None, d), lambda i, bi, h: (bi, rev(i), h, 0)),
            pl.BlockSpec((None, None, tq), lambda i, bi, h: (bi, h, rev(i))),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, sq), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=config.fwd_warps, num_stages=config.fwd_stages),
        interpret=interpret,
        name="block_sparse_fwd",
    )(layout.kv_indices, counts, q, k, v, q_tok, k_tok)


def backward(
    q,
    k,
    v,
    out,
    lse,
    do,
    layout: BlockLayout,
    q_tok,
    k_tok,
    *,
    rule: MaskRule,
    sm_scale: float,
    fields,
    config: GpuConfig,
    interpret: bool = False,
):
    """Returns (dq, dk, dv)."""
    b, sq, sk, hq, hkv, d, group, per_lh = _common(q, k, layout)
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    dot_kw = _dot_kwargs(q.dtype)

    tq = config.tile(config.dq_block_q, layout.block_q, "dq query")
    tk = config.tile(config.dq_block_k, layout.block_k, "dq key")
    nt = sq // tq
    ratio = layout.block_q // tq
    counts = jnp.stack([layout.kv_counts, layout.kv_full], axis=-1)
    wk = layout.kv_indices.shape[-1]
    rev = lambda i: nt - 1 - i
    dq = pl.pallas_call(
        functools.partial(
            _dq_kernel,
            rule=rule,
            scale=sm_scale * LOG2E,
            sm_scale=sm_scale,
            tile_k=tk,
            block_k=layout.block_k,
            num_tiles=nt,
            q_fields=fields[0],
            k_fields=fields[1],
            dot_kw=dot_kw,
        ),
        grid=(nt, b, hq),
        in_specs=[
            pl.BlockSpec((None, None, None, wk), lambda i, bi, h: (bi, h // per_lh, rev(i) // ratio, 0)),
            pl.BlockSpec((None, None, None, 2), lambda i, bi, h: (bi, h // per_lh, rev(i) // ratio, 0)),
            pl.BlockSpec((None, tq, None, d), lambda i, bi, h: (bi, rev(i), h, 0)),
            pl.BlockSpec((None, sk, None, d), lambda i, bi, h: (bi, 0, h // group, 0)),
            pl.BlockSpec((None, sk, None, d), lambda i, bi, h: (bi, 0, h // group, 0)),
            pl.BlockSpec((None, tq, None, d), lambda i, bi, h: (bi, rev(i), h, 0)),
            pl.BlockSpec((None, None, tq), lambda i, bi, h: (bi, h, rev(i))),
            pl.BlockSpec((None, None, tq), lambda i, bi, h: (bi, h, rev(i))),
            pl.BlockSpec((None, q_tok.shape[1], sq), lambda i, bi, h: (bi, 0, 0)),
            pl.BlockSpec((None, k_tok.shape[1], sk), lambda i, bi, h: (bi, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, tq, None, d), lambda i, bi, h: (bi, rev(i), h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.dq_warps, num_stages=config.dq_stages),
        interpret=interpret,
        name="block_sparse_dq",
    )(layout.kv_indices, counts, q, k, v, do, lse, delta, q_tok, k_tok)

    tk = config.tile(config.dkv_block_k, layout.block_k, "dkv key")
    tq = config.tile(config.dkv_block_q, layout.block_q, "dkv query")
    ratio = layout.block_k // tk
    lh = layout.num_heads
    q_counts = jnp.stack([layout.q_counts, layout.q_full], axis=-1)
    wq = layout.q_indices.shape[-1]
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkv_kernel,
            rule=rule,
            scale=sm_scale * LOG2E,
            sm_scale=sm_scale,
            tile_q=tq,
            block_q=layout.block_q,
            group=group,
            heads_per_layout_head=per_lh,
            q_fields=fields[0],
            k_fields=fields[1],
            dot_kw=dot_kw,
        ),
        grid=(sk // tk, b, hkv),
        in_specs=[
            pl.BlockSpec((None, lh, None, wq), lambda j, bi, h: (bi, 0, j // ratio, 0)),
            pl.BlockSpec((None, lh, None, 2), lambda j, bi, h: (bi, 0, j // ratio, 0)),
            pl.BlockSpec((None, sq, group, d), lambda j, bi, h: (bi, 0, h, 0)),
            pl.BlockSpec((None, tk, None, d), lambda j, bi, h: (bi, j, h, 0)),
            pl.BlockSpec((None, tk, None, d), lambda j, bi, h: (bi, j, h, 0)),
            pl.BlockSpec((None, sq, group, d), lambda j, bi, h: (bi, 0, h, 0)),
            pl.BlockSpec((None, group, sq), lambda j, bi, h: (bi, h, 0)),
            pl.BlockSpec((None, group, sq), lambda j, bi, h: (bi, h, 0)),
            pl.BlockSpec((None, q_tok.shape[1], sq), lambda j, bi, h: (bi, 0, 0)),
            pl.BlockSpec((None, k_tok.shape[1], sk), lambda j, bi, h: (bi, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, tk, None, d), lambda j, bi, h: (bi, j, h, 0)),
            pl.BlockSpec((None, tk, None, d), lambda j, bi, h: (bi, j, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=config.dkv_warps, num_stages=config.dkv_stages),
        interpret=interpret,
        name="block_sparse_dkv",
    )(layout.q_indices, q_counts, q, k, v, do, lse, delta, q_tok, k_tok)
    return dq, dk, dv
