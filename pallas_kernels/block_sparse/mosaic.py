"""Hopper backend: block-sparse forward on Pallas Mosaic GPU (wgmma + TMA + warp specialisation).

Structure (after jax's attention_mgpu.py / FlashAttention 3): one CTA per (query head, 128-row query tile,
batch) with three warpgroups. Warpgroups 0 and 1 compute 64 query rows each; warpgroup 2 is the producer: it
walks the query block's kv-block list from the layout (CSR-like, full blocks first) and TMA-copies K, V and the
keys' token fields into a ring of `stages` shared-memory slots, waiting on "consumed" barriers before reusing a
slot. The two compute warpgroups alternate on the tensor cores through a schedule barrier (one does QK^T while
the other does its softmax). Full blocks run without any token mask; only partial blocks (the diagonal, ragged
tails, window edges, critical tokens) evaluate the token rule (`tile_visible`, the same rule as
`token_mask.visible`) from positions / segment ids / critical flags held in shared memory.

The output and log2-domain logsumexp match the Triton forward exactly in meaning (lse = +inf on rows with
nothing visible, zeros out). The backward is the Mosaic GPU dQ and dK/dV kernels of `mosaic_bwd.py` (head_dim 64
or 128), else the Triton ones of `gpu.py`.

Imports of Mosaic GPU happen lazily (`mosaic_common.load_plgpu()`), so this module imports on any jax/jaxlib (CPU included).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse import gpu, mosaic_bwd
from pallas_kernels.block_sparse.layout import BlockLayout
from pallas_kernels.block_sparse.mosaic_common import (
    COMPUTE_WGS,
    LOG2E,
    NEG,
    SMEM_LIMIT,
    MosaicConfig,
    available,  # noqa: F401 - part of this module's interface (mosaic.available())
    load_plgpu,
    tile_visible,
)
from pallas_kernels.block_sparse.token_mask import MaskRule

def unsupported_reason(q_shape, dtype, layout: BlockLayout, config: MosaicConfig, num_fields: int = 1) -> str | None:
    """Why the Mosaic GPU forward cannot run these inputs (None when it can). Host-side, no GPU needed."""
    d = q_shape[-1]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name}: the Mosaic GPU kernel takes bf16 or f16 (wgmma operands)"
    if d % 64 or d > 256:
        return f"head_dim {d} must be a multiple of 64 (at most 256)"
    if layout.block_q % config.rows_per_cta:
        return f"layout block_q {layout.block_q} must be a multiple of {config.rows_per_cta} (rows per CTA)"
    if layout.block_k % config.block_kv:
        return f"layout block_k {layout.block_k} must be a multiple of block_kv {config.block_kv}"
    itemsize = jnp.dtype(dtype).itemsize
    need = config.smem_bytes(d, itemsize, num_fields)
    if need > SMEM_LIMIT:
        return f"shared memory {need} B > {SMEM_LIMIT} B (lower stages or block_kv)"
    return None


def _fwd_kernel(
    idx_ref,
    cnt_ref,
    q_ref,
    k_ref,
    v_ref,
    qt_ref,
    kt_ref,
    out_ref,
    lse_ref,
    scoped,
    *,
    rule,
    scale,
    cfg: MosaicConfig,
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

    def load_vec(ref, layout):
        return plgpu.load(ref, (), layout=layout)

    def cast(x, layout):
        return plgpu.layout_cast(x, layout)

    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    sub = block_k // bkv
    (q_smem2, k_smem, v_smem, kt_smem, qt_smem2, lse_smem2), bars, consumed, sched = scoped
    k_bar, v_bar, kt_bar, q_bar, qt_bar = bars
    k_cons, v_cons = consumed

    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    tile = num_tiles - 1 - lax.axis_index("q_seq")  # heaviest (last) query tiles first
    wg = lax.axis_index("wg")
    lh = lax.div(h, jnp.int32(per_lh))
    qblk = lax.div(tile, jnp.int32(tiles_per_block))
    count = cnt_ref[b, lh, qblk, 0]
    n_full = cnt_ref[b, lh, qblk, 1]
    steps = count * sub
    full_steps = n_full * sub

    def schedule():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    def kv_start(t):
        j = lax.div(t, jnp.int32(sub)) if sub > 1 else t
        blk = idx_ref[b, lh, qblk, j]
        offset = lax.rem(t, jnp.int32(sub)) * bkv if sub > 1 else 0
        return blk * block_k + offset

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem = q_smem2.at[wg]
        qt_smem = qt_smem2.at[wg]
        lse_smem = lse_smem2.at[wg]
        row0 = tile * (COMPUTE_WGS * bq) + wg * bq
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_smem, q_bar.at[wg])
        plgpu.copy_gmem_to_smem(qt_ref.at[b, :, pl.ds(row0, bq)], qt_smem, qt_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        plgpu.barrier_wait(qt_bar.at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        col_layout = plgpu.Layout.WGMMA.reduce(0)
        q_tok = {name: load_vec(qt_smem.at[f], row_layout) for f, name in enumerate(q_fields)}

        m_i = cast(jnp.full((bq,), NEG, jnp.float32), row_layout)
        l_i = cast(jnp.full((bq,), 0.0, jnp.float32), row_layout)
        acc = cast(jnp.full((bq, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        @pl.when(steps > 0)
        def _():
            plgpu.barrier_wait(k_bar.at[0])

        pl.when(wg == 1)(schedule)

        def step(t, carry, masked):
            acc, m_i, l_i = carry
            slot = lax.rem(t, jnp.int32(stages))

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                schedule()
                return acc_ref[...]

            qk = pl.run_scoped(compute_qk, plgpu.ACC((bq, bkv), jnp.float32))
            plgpu.barrier_arrive(k_cons.at[slot])
            shape = (bq, bkv)
            if masked:
                plgpu.barrier_wait(kt_bar.at[slot])
                k_tok = {
                    name: load_vec(kt_smem.at[slot, f], col_layout)
                    for f, name in enumerate(k_fields)
                }
                rows = {n: lax.broadcast_in_dim(x, shape, [0]) for n, x in q_tok.items()}
                cols = {n: lax.broadcast_in_dim(x, shape, [1]) for n, x in k_tok.items()}
                vis = tile_visible(
                    rule,
                    rows["pos"],
                    cols["pos"],
                    rows.get("seg"),
                    cols.get("seg"),
                    rows.get("crit"),
                    cols.get("crit"),
                )
                qk = jnp.where(vis, qk, NEG)
            m_new = jnp.maximum(m_i, qk.max(axis=1) * scale)
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(qk * scale - lax.broadcast_in_dim(m_new, shape, [0]))
            if masked:
                p = jnp.where(vis, p, 0.0)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            plgpu.barrier_arrive(sched)  # softmax done
            plgpu.barrier_wait(v_bar.at[slot])
            if not masked:
                plgpu.barrier_wait(kt_bar.at[slot])  # every phase is waited once (per-thread parity tracking)
            plgpu.barrier_wait(sched)  # tensor cores free

            def compute_pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                nxt = t + 1

                @pl.when(nxt < steps)
                def _():
                    plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.int32(stages))])

            acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_cons.at[slot])
            return acc, m_new, l_i

        carry = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), (acc, m_i, l_i))
        acc, m_i, l_i = lax.fori_loop(full_steps, steps, functools.partial(step, masked=True), carry)
        pl.when(wg == 0)(schedule)

        nonempty = l_i > 0.0
        l_safe = jnp.where(nonempty, l_i, 1.0)
        acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        q_smem[...] = acc.astype(dtype)
        lse_smem[...] = jnp.where(nonempty, m_i + jnp.log(l_safe) * LOG2E, jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, pl.ds(row0, bq), h])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(row0, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kvh = lax.div(h, jnp.int32(group))

        def issue_k(t, slot):
            start = kv_start(t)
            plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(start, bkv), kvh], k_smem.at[slot], k_bar.at[slot])

        def issue_v(t, slot):
            start = kv_start(t)
            plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(start, bkv), kvh], v_smem.at[slot], v_bar.at[slot])
            plgpu.copy_gmem_to_smem(kt_ref.at[b, :, pl.ds(start, bkv)], kt_smem.at[slot], kt_bar.at[slot])

        for i in range(stages):

            @pl.when(i < steps)
            def _(i=i):
                issue_k(jnp.int32(i), i)
                issue_v(jnp.int32(i), i)

        def refill(t, _):
            slot = lax.rem(t, jnp.int32(stages))
            plgpu.barrier_wait(k_cons.at[slot])
            issue_k(t + stages, slot)
            plgpu.barrier_wait(v_cons.at[slot])
            issue_v(t + stages, slot)
            return ()

        lax.fori_loop(0, jnp.maximum(steps - stages, 0), refill, ())


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
    config: gpu.GpuConfig | None = None,
    mosaic_config: MosaicConfig | None = None,
    interpret=False,
):
    """Returns (out [b, sq, hq, d], lse [b, hq, sq] f32 in log2 units; +inf on rows with nothing visible).
    Same contract as `gpu.forward`. There is no CPU interpret mode: jax's Mosaic GPU interpreter (0.10) lacks
    transposed wgmma operands and run_state, so `interpret=True` is refused with that reason."""
    del config  # the Triton tiles apply to the backward only
    if interpret:
        raise ValueError(
            "mosaic_gpu backend: no interpret mode (the Mosaic GPU interpreter cannot run transposed wgmma "
            "operands); use backend='triton' with interpret=True on CPU"
        )
    plgpu = load_plgpu()
    cfg = mosaic_config or MosaicConfig()
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    reason = unsupported_reason(q.shape, q.dtype, layout, cfg, max(q_tok.shape[1], k_tok.shape[1]))
    if reason:
        raise ValueError(f"mosaic_gpu backend: {reason}")
    rows = cfg.rows_per_cta
    num_tiles = sq // rows
    counts = jnp.stack([layout.kv_counts, layout.kv_full], axis=-1).astype(jnp.int32)
    dtype = q.dtype
    nqf, nkf = q_tok.shape[1], k_tok.shape[1]
    kernel = functools.partial(
        _fwd_kernel,
        rule=rule,
        scale=sm_scale * LOG2E,
        cfg=cfg,
        block_k=layout.block_k,
        num_tiles=num_tiles,
        tiles_per_block=layout.block_q // rows,
        group=hq // hkv,
        per_lh=hq // layout.num_heads,
        q_fields=fields[0],
        k_fields=fields[1],
        dtype=dtype,
        head_dim=d,
    )
    swizzle = 128
    elems = swizzle // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages

    def entry(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qt_ref, kt_ref, out_ref, lse_ref):
        smem = (
            plgpu.SMEM((COMPUTE_WGS, bq, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, bkv, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, bkv, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, nkf, bkv), jnp.int32),
            plgpu.SMEM((COMPUTE_WGS, nqf, bq), jnp.int32),
            plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
        )
        bars = (
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=COMPUTE_WGS),
            plgpu.Barrier(num_barriers=COMPUTE_WGS),
        )
        consumed = (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *scoped: kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qt_ref, kt_ref, out_ref, lse_ref, scoped),
            smem,
            bars,
            consumed,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
            collective_axes="wg",
        )

    out, lse = plgpu.kernel(
        entry,
        out_type=[jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, sq), jnp.float32)],
        grid=(hq, num_tiles, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(layout.kv_indices.astype(jnp.int32), counts, q, k, v, q_tok, k_tok)
    return out, lse


def backward(q, k, v, out, lse, do, layout, q_tok, k_tok, *, config, mosaic_config=None, interpret=False, **kw):
    """The Mosaic GPU dQ and dK/dV kernels (`mosaic_bwd.py`) when they take these inputs and the config asks for
    them; otherwise the Triton kernels (both consume this forward's lse unchanged)."""
    cfg = mosaic_config or MosaicConfig()
    num_fields = max(q_tok.shape[1], k_tok.shape[1])
    if cfg.backward == "mosaic" and mosaic_bwd.unsupported_reason(q.shape, q.dtype, layout, cfg, num_fields) is None:
        return mosaic_bwd.backward(q, k, v, out, lse, do, layout, q_tok, k_tok, mosaic_config=cfg, **kw)
    return gpu.backward(
        q, k, v, out, lse, do, layout, q_tok, k_tok, config=config, interpret=bool(interpret), **kw
    )
