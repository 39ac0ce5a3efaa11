"""TPU backend: Pallas Mosaic kernels with the layout scalar-prefetched into SMEM.

The grid walks (batch, head, row block, list slot); the kv (or q) block of each step comes from the prefetched
list, so the pipeline only DMAs visited blocks, and slots past a row's count repeat the last block (no new DMA)
and skip compute. Heads are moved to the front ([b, h, s, d]) so every block's last two dims are (tokens, d).
Tested on CPU in TPU interpret mode; never run on a real TPU here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse.layout import BlockLayout
from pallas_kernels.block_sparse.token_mask import MaskRule, visible

NEG = -1e30
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _mask(rule, qt_ref, kt_ref, fields):
    """Token visibility of a (q block, kv block) pair: q fields as columns [bq, 1], k fields as rows [1, bk]."""
    q_fields, k_fields = fields
    col = {name: qt_ref[:, f : f + 1] for f, name in enumerate(q_fields)}
    row = {name: kt_ref[f : f + 1, :] for f, name in enumerate(k_fields)}
    return visible(
        rule, col["pos"], row["pos"], col.get("seg"), row.get("seg"), col.get("crit"), row.get("crit")
    )


def _flat(x):
    return x.reshape(-1).astype(jnp.int32)


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
    m_sc,
    l_sc,
    acc_sc,
    *,
    rule,
    scale,
    fields,
    per_lh,
    dims,
):
    bi, h, i, j = (pl.program_id(a) for a in range(4))
    lh_count, nq, width = dims
    row = (bi * lh_count + h // per_lh) * nq + i
    count, n_full = cnt_ref[2 * row], cnt_ref[2 * row + 1]

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def update(masked):
        s = jax.lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        if masked:
            vis = _mask(rule, qt_ref, kt_ref, fields)
            s = jnp.where(vis, s, NEG)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        if masked:
            p = jnp.where(vis, p, 0.0)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=-1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(
            p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32
        )
        m_sc[...] = m_new

    pl.when(j < n_full)(lambda: update(False))
    pl.when((j >= n_full) & (j < count))(lambda: update(True))

    @pl.when(j == width - 1)
    def _():
        l = l_sc[...]
        nonempty = l > 0
        o_ref[...] = (acc_sc[...] / jnp.where(nonempty, l, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(nonempty, m_sc[...] + jnp.log(jnp.where(nonempty, l, 1.0)), jnp.inf)


def _heads_first(x):
    return x.transpose(0, 2, 1, 3)


def _tokens(q_tok, k_tok):
    """q fields as [b, sq, F] (columns in the kernel), k fields as [b, F, sk] (rows)."""
    return q_tok.transpose(0, 2, 1), k_tok


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
    interpret: bool = False,
):
    """Returns (out [b, sq, hq, d], lse [b, hq, sq, 1] f32, natural log; +inf on rows with nothing visible)."""
    b, sq, hq, d = q.shape
    _sk, hkv = k.shape[1], k.shape[2]
    group, per_lh = hq // hkv, hq // layout.num_heads
    bq, bk = layout.block_q, layout.block_k
    nq, width = layout.num_q_blocks, layout.kv_indices.shape[-1]
    q_cols, k_rows = _tokens(q_tok, k_tok)
    fq, fk = q_cols.shape[-1], k_rows.shape[1]
    dims = (layout.num_heads, nq, width)

    def kv_block(bi, h, i, j, idx, cnt):
        return idx[((bi * dims[0] + h // per_lh) * nq + i) * width + j]

    kernel = functools.partial(
        _fwd_kernel, rule=rule, scale=sm_scale, fields=fields, per_lh=per_lh, dims=dims
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hq, nq, width),
            in_specs=[
                pl.BlockSpec((None, None, bq, d), lambda bi, h, i, j, idx, cnt: (bi, h, i, 0)),
                pl.BlockSpec(
                    (None, None, bk, d),
                    lambda bi, h, i, j, idx, cnt: (bi, h // group, kv_block(bi, h, i, j, idx, cnt), 0),
                ),
                pl.BlockSpec(
                    (None, None, bk, d),
                    lambda bi, h, i, j, idx, cnt: (bi, h // group, kv_block(bi, h, i, j, idx, cnt), 0),
                ),
                pl.BlockSpec((None, bq, fq), lambda bi, h, i, j, idx, cnt: (bi, i, 0)),
                pl.BlockSpec(
                    (None, fk, bk), lambda bi, h, i, j, idx, cnt: (bi, 0, kv_block(bi, h, i, j, idx, cnt))
                ),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bq, d), lambda bi, h, i, j, idx, cnt: (bi, h, i, 0)),
                pl.BlockSpec((None, None, bq, 1), lambda bi, h, i, j, idx, cnt: (bi, h, i, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, d), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b, hq, sq, d), q.dtype),
            jax.ShapeDtypeStruct((b, hq, sq, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret(interpret),
        name="block_sparse_fwd_tpu",
    )(
        _flat(layout.kv_indices),
        _flat(jnp.stack([layout.kv_counts, layout.kv_full], -1)),
        _heads_first(q),
        _heads_first(k),
        _heads_first(v),
        q_cols,
        k_rows,
    )
    return _heads_first(out), lse


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
    dq_sc,
    *,
    rule,
    scale,
    fields,
    per_lh,
    dims,
):
    bi, h, i, j = (pl.program_id(a) for a in range(4))
    lh_count, nq, width = dims
    row = (bi * lh_count + h // per_lh) * nq + i
    count, n_full = cnt_ref[2 * row], cnt_ref[2 * row + 1]

    @pl.when(j == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def update(masked):
        k = k_ref[...]
        s = jax.lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) * scale
        p = jnp.exp(s - lse_ref[...])
        if masked:
            p = jnp.where(_mask(rule, qt_ref, kt_ref, fields), p, 0.0)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    pl.when(j < n_full)(lambda: update(False))
    pl.when((j >= n_full) & (j < count))(lambda: update(True))

    @pl.when(j == width - 1)
    def _():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


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
    dk_sc,
    dv_sc,
    *,
    rule,
    scale,
    fields,
    per_lh,
    group,
    dims,
):
    bi, kvh, kb, j = (pl.program_id(a) for a in range(4))
    lh_count, nk, width = dims
    g, slot = j // width, j % width
    row = (bi * lh_count + (kvh * group + g) // per_lh) * nk + kb
    count, n_full = cnt_ref[2 * row], cnt_ref[2 * row + 1]

    @pl.when(j == 0)
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def update(masked):
        q, do = q_ref[...], do_ref[...]
        s = jax.lax.dot_general(q, k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        p = jnp.exp(s - lse_ref[...])
        if masked:
            p = jnp.where(_mask(rule, qt_ref, kt_ref, fields), p, 0.0)
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)

    pl.when(slot < n_full)(lambda: update(False))
    pl.when((slot >= n_full) & (slot < count))(lambda: update(True))

    @pl.when(j == group * width - 1)
    def _():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


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
    interpret: bool = False,
):
    """Returns (dq, dk, dv): a dQ pass over the layout and a dK/dV pass over its transpose."""
    b, _sq, hq, d = q.shape
    _sk, hkv = k.shape[1], k.shape[2]
    group, per_lh = hq // hkv, hq // layout.num_heads
    bq, bk = layout.block_q, layout.block_k
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    q_cols, k_rows = _tokens(q_tok, k_tok)
    fq, fk = q_cols.shape[-1], k_rows.shape[1]
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))[..., None]
    qh, kh, vh, doh = (_heads_first(x) for x in (q, k, v, do))
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    wk = layout.kv_indices.shape[-1]
    dims = (layout.num_heads, nq, wk)

    def kv_block(bi, h, i, j, idx, cnt):
        return idx[((bi * dims[0] + h // per_lh) * nq + i) * wk + j]

    q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, h, i, j, idx, cnt: (bi, h, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, bk, d),
        lambda bi, h, i, j, idx, cnt: (bi, h // group, kv_block(bi, h, i, j, idx, cnt), 0),
    )
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda bi, h, i, j, idx, cnt: (bi, h, i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, rule=rule, scale=sm_scale, fields=fields, per_lh=per_lh, dims=dims),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hq, nq, wk),
            in_specs=[
                q_spec,
                kv_spec,
                kv_spec,
                q_spec,
                row_spec,
                row_spec,
                pl.BlockSpec((None, bq, fq), lambda bi, h, i, j, idx, cnt: (bi, i, 0)),
                pl.BlockSpec(
                    (None, fk, bk), lambda bi, h, i, j, idx, cnt: (bi, 0, kv_block(bi, h, i, j, idx, cnt))
                ),
            ],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=params,
        interpret=_interpret(interpret),
        name="block_sparse_dq_tpu",
    )(
        _flat(layout.kv_indices),
        _flat(jnp.stack([layout.kv_counts, layout.kv_full], -1)),
        qh,
        kh,
        vh,
        doh,
        lse,
        delta,
        q_cols,
        k_rows,
    )

    wq = layout.q_indices.shape[-1]
    tdims = (layout.num_heads, nk, wq)

    def q_head(h, j):
        return h * group + j // wq

    def q_block(bi, h, kb, j, idx, cnt):
        return idx[((bi * tdims[0] + q_head(h, j) // per_lh) * nk + kb) * wq + j % wq]

    kq_spec = pl.BlockSpec(
        (None, None, bq, d),
        lambda bi, h, kb, j, idx, cnt: (bi, q_head(h, j), q_block(bi, h, kb, j, idx, cnt), 0),
    )
    krow_spec = pl.BlockSpec(
        (None, None, bq, 1),
        lambda bi, h, kb, j, idx, cnt: (bi, q_head(h, j), q_block(bi, h, kb, j, idx, cnt), 0),
    )
    own_spec = pl.BlockSpec((None, None, bk, d), lambda bi, h, kb, j, idx, cnt: (bi, h, kb, 0))
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkv_kernel, rule=rule, scale=sm_scale, fields=fields, per_lh=per_lh, group=group, dims=tdims
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hkv, nk, group * wq),
            in_specs=[
                kq_spec,
                own_spec,
                own_spec,
                kq_spec,
                krow_spec,
                krow_spec,
                pl.BlockSpec(
                    (None, bq, fq), lambda bi, h, kb, j, idx, cnt: (bi, q_block(bi, h, kb, j, idx, cnt), 0)
                ),
                pl.BlockSpec((None, fk, bk), lambda bi, h, kb, j, idx, cnt: (bi, 0, kb)),
            ],
            out_specs=[own_spec, own_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
        compiler_params=params,
        interpret=_interpret(interpret),
        name="block_sparse_dkv_tpu",
    )(
        _flat(layout.q_indices),
        _flat(jnp.stack([layout.q_counts, layout.q_full], -1)),
        qh,
        kh,
        vh,
        doh,
        lse,
        delta,
        q_cols,
        k_rows,
    )
    return _heads_first(dq), _heads_first(dk), _heads_first(dv)
