"""TPU (Pallas Mosaic) top-k gather attention: one program per (row, query token) takes every kv head. K and V stay
in HBM (memory_space ANY); each tile of `block_k` list slots is gathered by one DMA per live slot that copies the
slot's [hkv, d] rows (contiguous in the [b, s, hkv, d] layout, whole HBM tiles) into a VMEM buffer, and each kv
head then reads its rows of the buffer (a strided sublane load) against its group's query heads (padded to the
sublane multiple). The list is read from SMEM (a per-program block of the index array); whether a slot is visible
(the token rule) comes precomputed as a row and a column mask.

The backward recomputes the tiles; dQ accumulates in VMEM, and dK and dV are read-modify-written in HBM: the
tile's listed rows are gathered from the float32 accumulators, the tile's dS^T Q and P^T dO added, and the rows
written back. The grid runs in order ("arbitrary"), so no two programs touch a row at once; lists hold distinct
keys (as a top-k gives), so no two slots of a tile do.
Correctness first: copies are not double-buffered. Tested on CPU in TPU interpret mode and lowered for the TPU
platform on CPU; never compiled by Mosaic or run on a TPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LOG2E = math.log2(math.e)
NEG = -1e30
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims, precision):
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _copy_rows(idx_sm, lst, j, block_k, pairs, sem, *, scatter: bool):
    """Row DMAs between HBM and VMEM for the live slots of tile j of list `lst`, for each (hbm [sk, hkv, d] view,
    VMEM buffer [block_k, hkv, d]) pair: gather (buffer row r <- hbm row idx[lst, j * block_k + r]) or, with
    `scatter`, the reverse. Returns the number of live slots (copies per pair)."""

    def copies(slot, r):
        out = []
        for i, (hbm, buf) in enumerate(pairs):
            src, dst = hbm.at[pl.ds(slot, 1)], buf.at[pl.ds(r, 1)]
            out.append(pltpu.make_async_copy(*((dst, src) if scatter else (src, dst)), sem.at[i]))
        return out

    def issue(r, n):
        slot = idx_sm[lst, j * block_k + r]

        @pl.when(slot >= 0)
        def _():
            for copy in copies(slot, r):
                copy.start()

        return n + (slot >= 0).astype(jnp.int32)

    n = jax.lax.fori_loop(0, block_k, issue, jnp.int32(0))

    def wait(_, carry):  # a wait takes one copy's bytes off its semaphore: one row each
        for copy in copies(0, 0):
            copy.wait()
        return carry

    jax.lax.fori_loop(0, n, wait, 0)
    return n


_gather_rows = functools.partial(_copy_rows, scatter=False)
_scatter_rows = functools.partial(_copy_rows, scatter=True)


def _lists(hi, hkv):
    """(list, the kv heads reading it): one list for all heads, or one per kv head."""
    return [(0, range(hkv))] if hi == 1 else [(h, (h,)) for h in range(hkv)]


def _forward_kernel(
    idx_sm, okr_ref, okc_ref, q_ref, k_hbm, v_hbm, o_ref, lse_ref, k_buf, v_buf, sem, m_sc, l_sc, acc_sc, *,
    scale, block_k, n_tiles, hi, hkv, compute_dtype, precision
):  # fmt: skip
    bi = pl.program_id(0)
    m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
    # Rows no copy fills hold stale (finite) K/V of earlier tiles or, before the first copy, whatever VMEM held:
    # masked scores ignore K, but 0 * NaN in P @ V does not, so V starts at zero.
    v_buf[...] = jnp.zeros(v_buf.shape, v_buf.dtype)
    pairs = ((k_hbm.at[bi], k_buf), (v_hbm.at[bi], v_buf))
    for lst, heads in _lists(hi, hkv):

        def tile(j, carry, lst=lst, heads=heads):
            n = _gather_rows(idx_sm, lst, j, block_k, pairs, sem)

            @pl.when(n > 0)
            def _():
                ok_row = okr_ref[lst, pl.ds(j, 1), :] > 0  # [1, block_k]
                ok_col = okc_ref[lst, j] > 0  # [block_k, 1]
                for h in heads:
                    k = k_buf[:, h, :].astype(compute_dtype)
                    v = jnp.where(ok_col, v_buf[:, h, :], jnp.zeros((), v_buf.dtype)).astype(compute_dtype)
                    s = jnp.where(ok_row, _dot(q_ref[h].astype(compute_dtype), k, _NT, precision) * scale, NEG)
                    m_prev = m_sc[h]
                    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
                    alpha = jnp.exp2(m_prev - m_new)
                    p = jnp.where(ok_row, jnp.exp2(s - m_new), 0.0)
                    l_sc[h] = alpha * l_sc[h] + p.sum(axis=1, keepdims=True)
                    acc_sc[h] = alpha * acc_sc[h] + _dot(p.astype(compute_dtype), v, _NN, precision)
                    m_sc[h] = m_new

            return carry

        jax.lax.fori_loop(0, n_tiles, tile, 0)
    l = l_sc[...]
    seen = l > 0
    o_ref[...] = acc_sc[...] / jnp.where(seen, l, 1.0)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log2(jnp.where(seen, l, 1.0)), -jnp.inf)


def _backward_kernel(
    idx_sm, okr_ref, okc_ref, q_ref, do_ref, lse_ref, delta_ref, k_hbm, v_hbm, dk_in, dv_in, dq_ref, dk_hbm, dv_hbm,
    k_buf, v_buf, dk_buf, dv_buf, sem, *, scale, sm_scale, block_k, n_tiles, hi, hkv, compute_dtype, precision
):  # fmt: skip
    del dk_in, dv_in  # aliased to dk_hbm / dv_hbm (zeros in, sums out)
    bi = pl.program_id(0)
    dq_ref[...] = jnp.zeros(dq_ref.shape, jnp.float32)
    v_buf[...] = jnp.zeros(v_buf.shape, v_buf.dtype)
    k_buf[...] = jnp.zeros(k_buf.shape, k_buf.dtype)
    kv = ((k_hbm.at[bi], k_buf), (v_hbm.at[bi], v_buf))
    acc = ((dk_hbm.at[bi], dk_buf), (dv_hbm.at[bi], dv_buf))
    for lst, heads in _lists(hi, hkv):

        def tile(j, carry, lst=lst, heads=heads):
            n = _gather_rows(idx_sm, lst, j, block_k, kv + acc, sem)

            @pl.when(n > 0)
            def _():
                ok_row = okr_ref[lst, pl.ds(j, 1), :] > 0
                ok_col = okc_ref[lst, j] > 0
                for h in heads:
                    q, do = q_ref[h].astype(compute_dtype), do_ref[h].astype(compute_dtype)
                    k = jnp.where(ok_col, k_buf[:, h, :], jnp.zeros((), k_buf.dtype)).astype(compute_dtype)
                    v = jnp.where(ok_col, v_buf[:, h, :], jnp.zeros((), v_buf.dtype)).astype(compute_dtype)
                    lse = lse_ref[h]
                    lse = jnp.where(lse > -jnp.inf, lse, 0.0)  # a row with nothing visible has p = 0 below
                    s = _dot(q, k, _NT, precision) * scale
                    p = jnp.where(ok_row, jnp.exp2(s - lse), 0.0)
                    dp = _dot(do, v, _NT, precision)
                    ds = (p * (dp - delta_ref[h])).astype(compute_dtype)
                    dq_ref[h] += _dot(ds, k, _NN, precision) * sm_scale
                    dk_buf[:, h, :] += _dot(ds, q, _TN, precision) * sm_scale
                    dv_buf[:, h, :] += _dot(p.astype(compute_dtype), do, _TN, precision)
                _scatter_rows(idx_sm, lst, j, block_k, acc, sem)

            return carry

        jax.lax.fori_loop(0, n_tiles, tile, 0)


def _interpret(interpret):
    """TPU interpret mode (CPU) for True, or the given pltpu.InterpretParams."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


def _prepare(q, k, idx, ok, block_k):
    """Shapes and per-program operands: q as [b, s, hkv, rows, d]; idx with -1 in every invisible slot; the
    visibility mask as rows [b, s, hi, n_tiles, block_k] and columns [b, s, hi, n_tiles, block_k, 1] (float)."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    compute_dtype = jnp.float32 if q.dtype == jnp.float16 else q.dtype  # no f16 MXU path: f32
    sublanes = 8 * 4 // jnp.dtype(compute_dtype).itemsize
    rows = -(-group // sublanes) * sublanes
    qg = jnp.pad(q.reshape(b, sq, hkv, group, d), [(0, 0)] * 3 + [(0, rows - group), (0, 0)])
    hi, kp = idx.shape[2], idx.shape[3]
    n_tiles = kp // block_k
    idx = jnp.where(ok, idx, -1)
    okf = ok.astype(jnp.float32).reshape(b, sq, hi, n_tiles, block_k)
    return qg, idx, okf, okf[..., None], (b, sq, hq, d, hkv, group, rows, hi, kp, n_tiles, compute_dtype)


def _common_specs(hi, kp, n_tiles, block_k):
    return [
        pl.BlockSpec((None, None, hi, kp), lambda bi, t: (bi, t, 0, 0), memory_space=pltpu.SMEM),
        pl.BlockSpec((None, None, hi, n_tiles, block_k), lambda bi, t: (bi, t, 0, 0, 0)),
        pl.BlockSpec((None, None, hi, n_tiles, block_k, 1), lambda bi, t: (bi, t, 0, 0, 0, 0)),
    ]


def forward(q, k, v, idx, ok, *, sm_scale, block_k, interpret):
    """(out [b, sq, hq, d], lse [b, sq, hkv, rows, 1] base 2); idx [b, sq, hi, kp] (kp a multiple of block_k) and
    ok (its slots' visibility) as `api` prepares them."""
    qg, idx, okr, okc, dims = _prepare(q, k, idx, ok, block_k)
    b, sq, hq, d, hkv, group, rows, hi, kp, n_tiles, compute_dtype = dims
    kernel = functools.partial(
        _forward_kernel, scale=sm_scale * LOG2E, block_k=block_k, n_tiles=n_tiles, hi=hi, hkv=hkv,
        compute_dtype=compute_dtype, precision=_precision(compute_dtype),
    )  # fmt: skip
    tile_spec = pl.BlockSpec((None, None, hkv, rows, d), lambda bi, t: (bi, t, 0, 0, 0))
    row_spec = pl.BlockSpec((None, None, hkv, rows, 1), lambda bi, t: (bi, t, 0, 0, 0))
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, sq),
        in_specs=_common_specs(hi, kp, n_tiles, block_k)
        + [tile_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[tile_spec, row_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, sq, hkv, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, sq, hkv, rows, 1), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((block_k, hkv, d), k.dtype),
            pltpu.VMEM((block_k, hkv, d), v.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((hkv, rows, 1), jnp.float32),
            pltpu.VMEM((hkv, rows, 1), jnp.float32),
            pltpu.VMEM((hkv, rows, d), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=_interpret(interpret),
        name="topk_attention_fwd_tpu",
    )(idx, okr, okc, qg, k, v)
    return o[:, :, :, :group].reshape(b, sq, hq, d).astype(q.dtype), lse


def backward(q, k, v, out, lse, do, idx, ok, *, sm_scale, block_k, interpret):
    """(dq, dk, dv); dk and dv are float32 sums read-modify-written in HBM, cast to k's dtype."""
    qg, idx, okr, okc, dims = _prepare(q, k, idx, ok, block_k)
    b, sq, hq, d, hkv, group, rows, hi, kp, n_tiles, compute_dtype = dims
    sk = k.shape[1]
    delta = (out.astype(jnp.float32) * do.astype(jnp.float32)).sum(-1).reshape(b, sq, hkv, group)
    delta = jnp.pad(delta, [(0, 0)] * 3 + [(0, rows - group)])[..., None]
    dog = jnp.pad(do.reshape(b, sq, hkv, group, d), [(0, 0)] * 3 + [(0, rows - group), (0, 0)])
    kernel = functools.partial(
        _backward_kernel, scale=sm_scale * LOG2E, sm_scale=sm_scale, block_k=block_k, n_tiles=n_tiles, hi=hi,
        hkv=hkv, compute_dtype=compute_dtype, precision=_precision(compute_dtype),
    )  # fmt: skip
    tile_spec = pl.BlockSpec((None, None, hkv, rows, d), lambda bi, t: (bi, t, 0, 0, 0))
    row_spec = pl.BlockSpec((None, None, hkv, rows, 1), lambda bi, t: (bi, t, 0, 0, 0))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    zeros = jnp.zeros((b, sk, hkv, d), jnp.float32)
    dq, dk, dv = pl.pallas_call(
        kernel,
        grid=(b, sq),
        in_specs=_common_specs(hi, kp, n_tiles, block_k) + [tile_spec, tile_spec, row_spec, row_spec] + [any_spec] * 4,
        out_specs=[tile_spec, any_spec, any_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, sq, hkv, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, sk, hkv, d), jnp.float32),
            jax.ShapeDtypeStruct((b, sk, hkv, d), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((block_k, hkv, d), k.dtype),
            pltpu.VMEM((block_k, hkv, d), v.dtype),
            pltpu.VMEM((block_k, hkv, d), jnp.float32),
            pltpu.VMEM((block_k, hkv, d), jnp.float32),
            pltpu.SemaphoreType.DMA((4,)),
        ],
        input_output_aliases={9: 1, 10: 2},
        # in order: programs read-modify-write shared dK / dV rows
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        interpret=_interpret(interpret),
        name="topk_attention_bwd_tpu",
    )(idx, okr, okc, qg, dog, lse, delta, k, v, zeros, zeros)
    dq = dq[:, :, :, :group].reshape(b, sq, hq, d).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


def _precision(compute_dtype):
    return jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
