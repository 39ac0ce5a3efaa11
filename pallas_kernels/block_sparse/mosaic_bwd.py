"""Hopper backward on Pallas Mosaic GPU: a dQ kernel over the layout and a dK/dV kernel over the transposed layout.

Written after jax's dense `attention_mgpu._attention_bwd` (kernel_dq / kernel_dkv), with the block-sparse walk and the
producer warpgroup of our forward (`mosaic.py`):

* dQ: one CTA per (query head, 128-row query tile, batch); compute warpgroups 0 and 1 own 64 query rows each (Q, dO,
  lse, delta and the query token fields stay in shared memory); warpgroup 2 walks the query block's kv-block list
  (full blocks first) and TMA-copies K, V and the keys' token fields into a ring of `bwd_stages` slots. Per step:
  S = Q K^T and dP = dO V^T in one wgmma group, P = exp2(S * scale - lse) (lse = +inf on empty rows gives P = 0),
  dS = P (dP - delta), dQ += dS K.
* dK/dV: one CTA per (kv head, 128-key tile, batch); warpgroups 0 and 1 own 64 keys each (K, V in shared memory);
  the producer walks, for every query head of the GQA group in turn, that head's list of query blocks visiting
  this key block and streams Q, dO, (lse, delta) and the query token fields. The compute warpgroups run in the
  transposed orientation (S^T = K Q^T, dP^T = V dO^T) so P^T and dS^T feed dV += P^T dO and dK += dS^T Q straight
  from registers; the group's query heads accumulate in the same registers and dK/dV are written once.

Full blocks run without any token mask; partial blocks apply `mosaic_common.tile_visible` (the rule of
`token_mask.visible`) to P before it is used. dQ and dK carry sm_scale. Imports of Mosaic GPU are lazy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse.layout import BlockLayout
from pallas_kernels.block_sparse.mosaic_common import (
    COMPUTE_WGS,
    LOG2E,
    SMEM_LIMIT,
    MosaicConfig,
    load_plgpu,
    tile_visible,
)
from pallas_kernels.block_sparse.token_mask import MaskRule

ROWS = 64  # rows per compute warpgroup (one wgmma M) in both kernels


def smem_bytes(cfg: MosaicConfig, head_dim: int, itemsize: int, num_fields: int) -> tuple[int, int]:
    """Shared memory of the (dQ, dK/dV) kernels in bytes."""
    mine = COMPUTE_WGS * 2 * ROWS * head_dim * itemsize  # Q and dO (dQ kernel) / K and V (dK/dV kernel)
    dq = mine + cfg.bwd_stages * 2 * cfg.dq_block_kv * head_dim * itemsize
    dq += 4 * (COMPUTE_WGS * (2 + num_fields) * ROWS + cfg.bwd_stages * num_fields * cfg.dq_block_kv)
    dkv = mine + cfg.bwd_stages * 2 * cfg.dkv_block_q * head_dim * itemsize
    dkv += 4 * (COMPUTE_WGS * num_fields * ROWS + cfg.bwd_stages * (2 + num_fields) * cfg.dkv_block_q)
    return dq, dkv


def unsupported_reason(q_shape, dtype, layout: BlockLayout, config: MosaicConfig, num_fields: int = 1) -> str | None:
    """Why the Mosaic GPU backward cannot run these inputs (None when it can; then the Triton backward runs)."""
    d = q_shape[-1]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name}: the Mosaic GPU backward takes bf16 or f16"
    if d % 64 or d > 128:
        return f"head_dim {d}: the Mosaic GPU backward keeps 64 x head_dim f32 dK and dV in registers (64 or 128)"
    rows = COMPUTE_WGS * ROWS
    if layout.block_q % rows or layout.block_q % config.dkv_block_q:
        return f"layout block_q {layout.block_q} must be a multiple of {rows} and of dkv_block_q {config.dkv_block_q}"
    if layout.block_k % rows or layout.block_k % config.dq_block_kv:
        return f"layout block_k {layout.block_k} must be a multiple of {rows} and of dq_block_kv {config.dq_block_kv}"
    need = max(smem_bytes(config, d, jnp.dtype(dtype).itemsize, num_fields))
    if need > SMEM_LIMIT:
        return f"backward shared memory {need} B > {SMEM_LIMIT} B (lower bwd_stages or dq_block_kv)"
    return None


def _transforms(dtype):
    plgpu = load_plgpu()
    elems = 128 // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(128))


def _dq_kernel(
    idx_ref,
    cnt_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    ld_ref,
    qt_ref,
    kt_ref,
    dq_ref,
    scoped,
    *,
    rule,
    scale,
    sm_scale,
    bkv,
    stages,
    block_k,
    num_tiles,
    tiles_per_block,
    group,
    per_lh,
    q_fields,
    k_fields,
    dtype,
    head_dim,
):
    plgpu = load_plgpu()
    bq = ROWS
    sub = block_k // bkv
    (q_smem2, do_smem2, ld_smem2, qt_smem2, k_smem, v_smem, kt_smem), own_bars, ring_bars, consumed = scoped
    q_bar, do_bar, ld_bar, qt_bar = own_bars
    k_bar, v_bar, kt_bar = ring_bars
    k_cons, v_cons = consumed

    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    tile = num_tiles - 1 - lax.axis_index("q_seq")  # heaviest (last) query tiles first
    wg = lax.axis_index("wg")
    lh = lax.div(h, jnp.int32(per_lh))
    qblk = lax.div(tile, jnp.int32(tiles_per_block))
    steps = cnt_ref[b, lh, qblk, 0] * sub
    full_steps = cnt_ref[b, lh, qblk, 1] * sub

    def kv_start(t):
        j = lax.div(t, jnp.int32(sub)) if sub > 1 else t
        offset = lax.rem(t, jnp.int32(sub)) * bkv if sub > 1 else 0
        return idx_ref[b, lh, qblk, j] * block_k + offset

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem, do_smem, ld_smem, qt_smem = (r.at[wg] for r in (q_smem2, do_smem2, ld_smem2, qt_smem2))
        row0 = tile * (COMPUTE_WGS * bq) + wg * bq
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_smem, q_bar.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(row0, bq), h], do_smem, do_bar.at[wg])
        plgpu.copy_gmem_to_smem(ld_ref.at[b, h, :, pl.ds(row0, bq)], ld_smem, ld_bar.at[wg])
        plgpu.copy_gmem_to_smem(qt_ref.at[b, :, pl.ds(row0, bq)], qt_smem, qt_bar.at[wg])
        for bar in own_bars:
            plgpu.barrier_wait(bar.at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        col_layout = plgpu.Layout.WGMMA.reduce(0)
        q_tok = {name: plgpu.load(qt_smem.at[f], (), layout=row_layout) for f, name in enumerate(q_fields)}
        lse = plgpu.load(ld_smem.at[0], (), layout=row_layout)
        delta = plgpu.load(ld_smem.at[1], (), layout=row_layout)
        shape = (bq, bkv)
        zeros = plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), plgpu.Layout.WGMMA)
        dq = plgpu.layout_cast(jnp.full((bq, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        def step(t, dq, masked):
            slot = lax.rem(t, jnp.int32(stages))
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_wait(kt_bar.at[slot])

            def s_and_dp(refs):
                s_ref, dp_ref = refs
                plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                plgpu.wgmma(dp_ref, do_smem, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))

            s, dp = pl.run_state(s_and_dp)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))
            plgpu.barrier_arrive(v_cons.at[slot])
            p = jnp.exp2(s * scale - lax.broadcast_in_dim(lse, shape, [0]))
            if masked:
                k_tok = {
                    name: plgpu.load(kt_smem.at[slot, f], (), layout=col_layout) for f, name in enumerate(k_fields)
                }
                rows = {n: lax.broadcast_in_dim(x, shape, [0]) for n, x in q_tok.items()}
                cols = {n: lax.broadcast_in_dim(x, shape, [1]) for n, x in k_tok.items()}
                vis = tile_visible(
                    rule, rows["pos"], cols["pos"], rows.get("seg"), cols.get("seg"), rows.get("crit"), cols.get("crit")
                )
                p = jnp.where(vis, p, 0.0)
            ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))

            def dq_mm(acc_ref):
                plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

            dq = pl.run_state(dq_mm)(plgpu.ACC.init(dq))
            plgpu.barrier_arrive(k_cons.at[slot])
            return dq

        dq = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), dq)
        dq = lax.fori_loop(full_steps, steps, functools.partial(step, masked=True), dq)
        q_smem[...] = (dq * sm_scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, pl.ds(row0, bq), h])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kvh = lax.div(h, jnp.int32(group))

        def issue(t, _):
            slot = lax.rem(t, jnp.int32(stages))
            start = kv_start(t)

            @pl.when(t >= stages)
            def _():
                plgpu.barrier_wait(k_cons.at[slot])

            plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(start, bkv), kvh], k_smem.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(kt_ref.at[b, :, pl.ds(start, bkv)], kt_smem.at[slot], kt_bar.at[slot])

            @pl.when(t >= stages)
            def _():
                plgpu.barrier_wait(v_cons.at[slot])

            plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(start, bkv), kvh], v_smem.at[slot], v_bar.at[slot])
            return ()

        lax.fori_loop(0, steps, issue, ())


def _dkv_kernel(
    idx_ref,
    cnt_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    ld_ref,
    qt_ref,
    kt_ref,
    dk_ref,
    dv_ref,
    scoped,
    *,
    rule,
    scale,
    sm_scale,
    bq,
    stages,
    block_q,
    tiles_per_block,
    group,
    per_lh,
    q_fields,
    k_fields,
    dtype,
    head_dim,
):
    plgpu = load_plgpu()
    bkv = ROWS
    sub = block_q // bq
    (k_smem2, v_smem2, kt_smem2, q_smem, do_smem, ld_smem, qt_smem), own_bars, ring_bars, consumed = scoped
    k_bar, v_bar, kt_bar = own_bars
    q_bar, do_bar, ld_bar, qt_bar = ring_bars

    b = lax.axis_index("batch")
    kvh = lax.axis_index("heads")
    tile = lax.axis_index("kv_seq")  # early key tiles are visited by the most query blocks: first
    wg = lax.axis_index("wg")
    kblk = lax.div(tile, jnp.int32(tiles_per_block))

    def head_steps(g):
        lh = lax.div(kvh * group + g, jnp.int32(per_lh))
        return lh, cnt_ref[b, lh, kblk, 0] * sub, cnt_ref[b, lh, kblk, 1] * sub

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        k_smem, v_smem, kt_smem = (r.at[wg] for r in (k_smem2, v_smem2, kt_smem2))
        col0 = tile * (COMPUTE_WGS * bkv) + wg * bkv
        plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(col0, bkv), kvh], k_smem, k_bar.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(col0, bkv), kvh], v_smem, v_bar.at[wg])
        plgpu.copy_gmem_to_smem(kt_ref.at[b, :, pl.ds(col0, bkv)], kt_smem, kt_bar.at[wg])
        for bar in own_bars:
            plgpu.barrier_wait(bar.at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        col_layout = plgpu.Layout.WGMMA.reduce(0)
        k_tok = {name: plgpu.load(kt_smem.at[f], (), layout=row_layout) for f, name in enumerate(k_fields)}
        shape = (bkv, bq)
        zeros = plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), plgpu.Layout.WGMMA)
        acc0 = plgpu.layout_cast(jnp.full((bkv, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        def step(_, carry, masked):
            dk, dv, t = carry
            slot = lax.rem(t, jnp.int32(stages))
            for bar in ring_bars:
                plgpu.barrier_wait(bar.at[slot])

            def st_and_dpt(refs):
                s_ref, dp_ref = refs
                plgpu.wgmma(s_ref, k_smem, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
                plgpu.wgmma(dp_ref, v_smem, plgpu.transpose_ref(do_smem.at[slot], (1, 0)))

            s_t, dp_t = pl.run_state(st_and_dpt)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))
            lse = plgpu.load(ld_smem.at[slot, 0], (), layout=col_layout)
            delta = plgpu.load(ld_smem.at[slot, 1], (), layout=col_layout)
            p_t = jnp.exp2(s_t * scale - lax.broadcast_in_dim(lse, shape, [1]))
            if masked:
                q_tok = {
                    name: plgpu.load(qt_smem.at[slot, f], (), layout=col_layout) for f, name in enumerate(q_fields)
                }
                rows = {n: lax.broadcast_in_dim(x, shape, [0]) for n, x in k_tok.items()}
                cols = {n: lax.broadcast_in_dim(x, shape, [1]) for n, x in q_tok.items()}
                vis = tile_visible(
                    rule, cols["pos"], rows["pos"], cols.get("seg"), rows.get("seg"), cols.get("crit"), rows.get("crit")
                )
                p_t = jnp.where(vis, p_t, 0.0)
            ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, shape, [1]))

            def dv_dk(refs):
                dv_ref, dk_ref = refs
                plgpu.wgmma(dv_ref, p_t.astype(dtype), do_smem.at[slot])
                plgpu.wgmma(dk_ref, ds_t.astype(dtype), q_smem.at[slot])

            dv, dk = pl.run_state(dv_dk)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
            plgpu.barrier_arrive(consumed.at[slot])
            return dk, dv, t + 1

        def head(g, carry):
            _, steps, full_steps = head_steps(g)
            carry = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), carry)
            return lax.fori_loop(full_steps, steps, functools.partial(step, masked=True), carry)

        dk, dv, _ = lax.fori_loop(0, group, head, (acc0, acc0, jnp.int32(0)))
        k_smem[...] = (dk * sm_scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, pl.ds(col0, bkv), kvh], commit_group=False)
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, pl.ds(col0, bkv), kvh], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def head(g, t0):
            lh, steps, _ = head_steps(g)
            h = kvh * group + g

            def issue(i, t):
                slot = lax.rem(t, jnp.int32(stages))
                j = lax.div(i, jnp.int32(sub)) if sub > 1 else i
                offset = lax.rem(i, jnp.int32(sub)) * bq if sub > 1 else 0
                start = idx_ref[b, lh, kblk, j] * block_q + offset

                @pl.when(t >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                rows = pl.ds(start, bq)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_bar.at[slot])
                plgpu.copy_gmem_to_smem(ld_ref.at[b, h, :, rows], ld_smem.at[slot], ld_bar.at[slot])
                plgpu.copy_gmem_to_smem(qt_ref.at[b, :, rows], qt_smem.at[slot], qt_bar.at[slot])
                return t + 1

            return lax.fori_loop(0, steps, issue, t0)

        lax.fori_loop(0, group, head, jnp.int32(0))


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
    mosaic_config: MosaicConfig | None = None,
):
    """Returns (dq, dk, dv) from the forward's out and log2-domain lse (+inf on rows with nothing visible)."""
    plgpu = load_plgpu()
    cfg = mosaic_config or MosaicConfig()
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    nqf, nkf = q_tok.shape[1], k_tok.shape[1]
    reason = unsupported_reason(q.shape, q.dtype, layout, cfg, max(nqf, nkf))
    if reason:
        raise ValueError(f"mosaic_gpu backward: {reason}")
    dtype = q.dtype
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    ld = jnp.stack([lse, delta], axis=2)  # [b, hq, 2, sq]: one copy brings both row statistics
    tf = _transforms(dtype)
    rows = COMPUTE_WGS * ROWS
    group, per_lh = hq // hkv, hq // layout.num_heads
    common = dict(
        rule=rule,
        scale=sm_scale * LOG2E,
        sm_scale=sm_scale,
        stages=cfg.bwd_stages,
        group=group,
        per_lh=per_lh,
        q_fields=fields[0],
        k_fields=fields[1],
        dtype=dtype,
        head_dim=d,
    )
    stages = cfg.bwd_stages
    params = plgpu.CompilerParams(approx_math=True)

    # ---- dQ over the layout
    bkv = cfg.dq_block_kv
    num_tiles = sq // rows
    dq_kernel = functools.partial(
        _dq_kernel,
        bkv=bkv,
        block_k=layout.block_k,
        num_tiles=num_tiles,
        tiles_per_block=layout.block_q // rows,
        **common,
    )
    counts = jnp.stack([layout.kv_counts, layout.kv_full], axis=-1).astype(jnp.int32)

    def dq_entry(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, ld_ref, qt_ref, kt_ref, dq_ref):
        smem = (
            plgpu.SMEM((COMPUTE_WGS, ROWS, d), dtype, transforms=tf),
            plgpu.SMEM((COMPUTE_WGS, ROWS, d), dtype, transforms=tf),
            plgpu.SMEM((COMPUTE_WGS, 2, ROWS), jnp.float32),
            plgpu.SMEM((COMPUTE_WGS, nqf, ROWS), jnp.int32),
            plgpu.SMEM((stages, bkv, d), dtype, transforms=tf),
            plgpu.SMEM((stages, bkv, d), dtype, transforms=tf),
            plgpu.SMEM((stages, nkf, bkv), jnp.int32),
        )
        own = tuple(plgpu.Barrier(num_barriers=COMPUTE_WGS) for _ in range(4))
        ring = tuple(plgpu.Barrier(num_barriers=stages) for _ in range(3))
        consumed = tuple(plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages) for _ in range(2))
        pl.run_scoped(
            lambda *scoped: dq_kernel(
                idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, ld_ref, qt_ref, kt_ref, dq_ref, scoped
            ),
            smem,
            own,
            ring,
            consumed,
            collective_axes="wg",
        )

    dq = plgpu.kernel(
        dq_entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(hq, num_tiles, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=params,
    )(layout.kv_indices.astype(jnp.int32), counts, q, k, v, do, ld, q_tok, k_tok)

    # ---- dK/dV over the transposed layout
    bq = cfg.dkv_block_q
    dkv_kernel = functools.partial(
        _dkv_kernel, bq=bq, block_q=layout.block_q, tiles_per_block=layout.block_k // rows, **common
    )
    q_counts = jnp.stack([layout.q_counts, layout.q_full], axis=-1).astype(jnp.int32)

    def dkv_entry(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, ld_ref, qt_ref, kt_ref, dk_ref, dv_ref):
        smem = (
            plgpu.SMEM((COMPUTE_WGS, ROWS, d), dtype, transforms=tf),
            plgpu.SMEM((COMPUTE_WGS, ROWS, d), dtype, transforms=tf),
            plgpu.SMEM((COMPUTE_WGS, nkf, ROWS), jnp.int32),
            plgpu.SMEM((stages, bq, d), dtype, transforms=tf),
            plgpu.SMEM((stages, bq, d), dtype, transforms=tf),
            plgpu.SMEM((stages, 2, bq), jnp.float32),
            plgpu.SMEM((stages, nqf, bq), jnp.int32),
        )
        own = tuple(plgpu.Barrier(num_barriers=COMPUTE_WGS) for _ in range(3))
        ring = tuple(plgpu.Barrier(num_barriers=stages) for _ in range(4))
        consumed = plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)
        pl.run_scoped(
            lambda *scoped: dkv_kernel(
                idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, ld_ref, qt_ref, kt_ref, dk_ref, dv_ref, scoped
            ),
            smem,
            own,
            ring,
            consumed,
            collective_axes="wg",
        )

    dk, dv = plgpu.kernel(
        dkv_entry,
        out_type=[jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)],
        grid=(hkv, sk // rows, b),
        grid_names=("heads", "kv_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=params,
    )(layout.q_indices.astype(jnp.int32), q_counts, q, k, v, do, ld, q_tok, k_tok)
    return dq, dk, dv
