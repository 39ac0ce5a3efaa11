"""TPU (Pallas Mosaic) sparse decode kernel: one program per (row, split) walks its units of cache slots with an
online softmax (base 2) per kv head and writes (o, lse) partials that `pallas_kernels.decode.api` merges with its
XLA combine. `api` validates the arguments and dispatches here (backend="tpu").

K/V stay in HBM (memory_space ANY); the kernel DMAs what it reads into two VMEM buffers of [tile, hkv, d] per
tensor, so the copies of unit u + 1 are in flight while unit u computes. A unit is one of:
  - a band tile: `tile` contiguous slots of the window band (lo .. length - 1), one DMA per tensor;
  - a sink tile: the global sinks that lie outside every new token's window, one DMA of a few (>= 8) slots;
  - a critical chunk: `tile` consecutive entries of the row's critical list; each live entry is one DMA of its
    slot ([hkv, d]) into the buffer row it occupies in the chunk; dead entries (-1 padding, out of range, inside
    the window, among the sinks, repeats, past critical_counts) issue no copy, and a chunk without live entries
    skips its dots. The list is cleaned by one small XLA op (an elementwise pass over [b, c]) before the kernel.
A copy takes every kv head of its slots (the cache is [.., L, hkv, d], so [hkv, d] per slot is contiguous and
whole tiles in HBM): a per-head copy would squeeze the second-minor dimension of the HBM ref, which Mosaic tiles by
min(hkv, 8) rows (>= 2 for 16-bit) and refuses to squeeze unless that tile is 1 (tpu.memref_squeeze), and it
would issue hkv times as many single-slot DMAs. Each kv head then reads its rows of the buffer (a strided sublane
load) and its query heads (t new tokens x group, padded to the sublane multiple) are the rows of one matmul.
Per-row scalars (lengths, kv_start, the live critical list, counts) are scalar-prefetched into SMEM, so every loop
bound is the row's own (a list with 10% live entries costs its live chunks, not its capacity).
Tested on CPU in TPU interpret mode and lowered for the TPU platform on CPU; never compiled by Mosaic or run on a TPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

LOG2E = math.log2(math.e)
NEG = -1e30
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def live_critical(
    crit: Int[Array, "b c"],
    counts: Int[Array, " b"] | None,
    lengths: Int[Array, " b"],
    kv_start: Int[Array, " b"],
    *,
    window: int,
    num_global: int,
    tile: int,
    cache_len: int,
) -> Int[Array, "b cap"]:
    """[b, ceil(c / tile) * tile] int32: each row's entries that a query reads, -1 elsewhere. An entry is live iff
    it is among the row's first counts[i], kv_start + num_global <= slot < length - window (outside the last new
    token's window and not a sink), and differs from the entry before it (repeats are adjacent in `crit`).
    Slots past the cache (only with lengths > cache_len, invalid input) are dead too: no DMA may leave the cache."""
    b, c = crit.shape
    pos = jnp.arange(c)[None, :]
    start = jnp.maximum(kv_start.astype(jnp.int32), 0)[:, None]
    prev = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), crit[:, :-1]], axis=1)
    end = jnp.minimum(lengths.astype(jnp.int32) - window, cache_len)[:, None]
    live = (crit >= start + num_global) & (crit < end) & (crit != prev)
    if counts is not None:
        live &= pos < counts.astype(jnp.int32)[:, None]
    out = jnp.where(live, crit, -1)
    pad = -(-c // tile) * tile - c
    return jnp.pad(out, ((0, 0), (0, pad)), constant_values=-1)


def _split(n, split, num_splits):
    """[first, last) of the n units that split `split` of num_splits takes (contiguous, sizes differ by <= 1)."""
    return jax.lax.div(split * n, num_splits), jax.lax.div((split + 1) * n, num_splits)


def _decode_kernel(
    len_ref,
    start_ref,
    count_ref,
    crit_sm,
    layer_sm,
    q_ref,
    crit_ref,
    k_hbm,
    v_hbm,
    o_ref,
    lse_ref,
    k_buf,
    v_buf,
    sem,
    nlive,
    m_sc,
    l_sc,
    acc_sc,
    bad_sc,
    *,
    scale,
    t,
    group,
    rows,
    tile,
    band_rows,
    sink_rows,
    cap,
    window,
    num_global,
    num_splits,
    cache_len,
    hkv,
    stacked,
    compute_dtype,
    precision,
):
    bi, split = pl.program_id(0), pl.program_id(1)
    length = len_ref[bi]
    start = jnp.maximum(start_ref[bi], 0)
    count = jnp.clip(count_ref[bi], 0, cap)

    # Unit ranges: band [band_lo, length), sinks [start, sink_hi) (only those outside the last token's window),
    # critical chunks [0, ceil(count / tile)).
    band_lo = jnp.maximum(start, length - t - window + 1)
    sink_hi = jnp.minimum(start + num_global, length - window)

    def tiles(lo, hi, size):
        return jnp.where(hi > lo, jax.lax.div(hi - lo + size - 1, size), 0)

    b0, b1 = _split(tiles(band_lo, length, band_rows), split, num_splits)
    s0, s1 = _split(tiles(start, sink_hi, sink_rows) if num_global else jnp.int32(0), split, num_splits)
    c0, c1 = _split(jax.lax.div(count + tile - 1, tile), split, num_splits)
    n_band, n_sink = b1 - b0, s1 - s0
    n_units = n_band + n_sink + (c1 - c0)

    def hbm(ref, slots):  # [n, hkv, d] view of the given slots (a pl.ds) of this row: whole HBM tiles
        return ref.at[layer_sm[0], bi, slots] if stacked else ref.at[bi, slots]

    def contiguous(u):
        """(nominal first slot, DMA base, range end, is band) of band / sink unit u. The base is clamped so
        the copy stays inside the cache; slots before the nominal start were another tile's and are masked."""
        is_band = u < n_band
        j = jnp.where(is_band, b0 + u, s0 + u - n_band)
        size = jnp.where(is_band, band_rows, sink_rows)
        nominal = jnp.where(is_band, band_lo, start) + j * size
        return nominal, jnp.minimum(nominal, cache_len - size), jnp.where(is_band, length, sink_hi), is_band

    def contiguous_copies(u, buf, size):
        _, base, _, _ = contiguous(u)
        return [
            pltpu.make_async_copy(hbm(src, pl.ds(base, size)), dst.at[buf, pl.ds(0, size)], sem.at[buf, i])
            for i, (src, dst) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf)))
        ]

    def row_copies(slot, r, buf):
        return [
            pltpu.make_async_copy(hbm(src, pl.ds(slot, 1)), dst.at[buf, pl.ds(r, 1)], sem.at[buf, i])
            for i, (src, dst) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf)))
        ]

    def chunk(u):
        return c0 + u - n_band - n_sink

    def issue(u, buf):
        @pl.when(u < n_band)
        def _():
            for copy in contiguous_copies(u, buf, band_rows):
                copy.start()

        if num_global:

            @pl.when((u >= n_band) & (u < n_band + n_sink))
            def _():
                for copy in contiguous_copies(u, buf, sink_rows):
                    copy.start()

        @pl.when(u >= n_band + n_sink)
        def _():
            first = bi * cap + chunk(u) * tile

            def one(r, n):
                slot = crit_sm[first + r]

                @pl.when(slot >= 0)
                def _():
                    for copy in row_copies(slot, r, buf):
                        copy.start()

                return n + (slot >= 0).astype(jnp.int32)

            nlive[buf] = jax.lax.fori_loop(0, tile, one, jnp.int32(0))

    def wait(u, buf):
        @pl.when(u < n_band)
        def _():
            for copy in contiguous_copies(u, buf, band_rows):
                copy.wait()

        if num_global:

            @pl.when((u >= n_band) & (u < n_band + n_sink))
            def _():
                for copy in contiguous_copies(u, buf, sink_rows):
                    copy.wait()

        @pl.when(u >= n_band + n_sink)
        def _():
            def one(_, carry):  # a wait takes one copy's bytes off the semaphore: one row each
                for copy in row_copies(0, 0, buf):
                    copy.wait()
                return carry

            jax.lax.fori_loop(0, nlive[buf], one, 0)

    # Query row r is token r // group, head h * group + r % group; rows past t * group are padding (see nothing).
    r = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    tok = sum((r >= n * group).astype(jnp.int32) for n in range(1, t)) if t > 1 else jnp.zeros_like(r)
    q_pos = length - t + tok
    q_ok = (r < t * group) & (q_pos >= start)  # a new token in the left padding sees nothing
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1)

    def compute(u, buf):
        nominal, base, end, is_band = contiguous(u)
        is_crit = u >= n_band + n_sink
        size = jnp.where(is_band, band_rows, sink_rows)
        crit_slots = crit_ref[pl.ds(jnp.clip(chunk(u), 0, cap // tile - 1), 1), :]  # [1, tile]
        slots = jnp.where(is_crit, crit_slots, base + lane)
        ok = jnp.where(is_crit, crit_slots >= 0, (lane < size) & (slots >= nominal) & (slots < end))
        dist = q_pos - slots  # [rows, tile]
        near = (dist >= 0) & (dist < window)
        vis = ok & q_ok & jnp.where(is_band, near, dist >= window)
        for h in range(hkv):  # one tile copy serves every kv head: head h's rows are a strided sublane load
            q = q_ref[h].astype(compute_dtype)  # [rows, d]: the query heads of group h
            k = k_buf[buf, :, h, :].astype(compute_dtype)  # [tile, d]
            v = v_buf[buf, :, h, :].astype(compute_dtype)
            # A slot with a non-finite k or v (x - x != 0) is zeroed and marks only the rows that see it: in P @ V
            # its 0 weight for the other rows would still give 0 * NaN = NaN.
            bad = (((k - k) != 0) | ((v - v) != 0)).astype(jnp.float32)  # [tile, d]
            bad_slot = bad.max(axis=1, keepdims=True) > 0  # [tile, 1]
            k = jnp.where(bad_slot, jnp.zeros_like(k), k)
            v = jnp.where(bad_slot, jnp.zeros_like(v), v)
            hits = jax.lax.dot_general(jnp.ones((rows, k.shape[1]), jnp.float32), bad, _NT) > 0  # [rows, tile]
            bad_sc[h] = jnp.maximum(bad_sc[h], jnp.where(vis & hits, 1.0, 0.0).max(axis=1, keepdims=True))
            s = jax.lax.dot_general(q, k, _NT, precision=precision, preferred_element_type=jnp.float32) * scale
            s = jnp.where(vis, s, NEG)
            m_prev = m_sc[h]
            m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            alpha = jnp.exp2(m_prev - m_new)
            p = jnp.where(vis, jnp.exp2(s - m_new), 0.0)
            l_sc[h] = alpha * l_sc[h] + p.sum(axis=1, keepdims=True)
            acc_sc[h] = alpha * acc_sc[h] + jax.lax.dot_general(
                p.astype(compute_dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                preferred_element_type=jnp.float32,
            )
            m_sc[h] = m_new

    m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
    bad_sc[...] = jnp.zeros(bad_sc.shape, jnp.float32)
    # Buffer rows no copy fills (dead critical entries, rows past a sink tile) hold stale K/V of earlier units or,
    # before the first copy, whatever VMEM held: masked scores ignore K, but 0 * NaN in P @ V does not, so V starts
    # at zero (stale V is finite).
    v_buf[...] = jnp.zeros(v_buf.shape, v_buf.dtype)

    @pl.when(n_units > 0)
    def _():
        issue(jnp.int32(0), 0)

    def body(u, carry):
        buf = jax.lax.rem(u, 2)

        @pl.when(u + 1 < n_units)
        def _():
            issue(u + 1, 1 - buf)

        wait(u, buf)
        pl.when((u < n_band + n_sink) | (nlive[buf] > 0))(lambda: compute(u, buf))
        return carry

    jax.lax.fori_loop(0, n_units, body, 0)
    l = l_sc[...]
    nonempty = l > 0
    o_ref[...] = jnp.where(bad_sc[...] > 0, jnp.nan, acc_sc[...] / jnp.where(nonempty, l, 1.0))
    lse_ref[...] = jnp.where(nonempty, m_sc[...] + jnp.log2(jnp.where(nonempty, l, 1.0)), -jnp.inf)


def _interpret(interpret):
    """TPU interpret mode (CPU) for True, or the given pltpu.InterpretParams (tests: race detection)."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


def decode_partials(
    q: Float[Array, "b t hq d"],
    k_cache: Float[Array, "*layers b L hkv d"],
    v_cache: Float[Array, "*layers b L hkv d"],
    lengths: Int[Array, " b"],
    kv_start: Int[Array, " b"],
    crit: Int[Array, "b c"] | None,
    counts: Int[Array, " b"] | None = None,
    *,
    window: int,
    num_global: int,
    sm_scale: float | None,
    num_splits: int | None = None,
    tile: int = 64,
    layer: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[Float[Array, "b hkv splits tg d"], Float[Array, "b hkv splits tg"]]:
    """The decode kernel alone: (o [b, hkv, splits, t * group, d] f32, lse [b, hkv, splits, t * group] base 2), the
    layout `api.combine_splits(..., combine="xla")` merges. `crit` ([b, c] with equal entries adjacent, or None) and
    `counts` ([b] or None: all c entries) as api passes them; `layer` (an int or an int32 scalar array) indexes a stacked cache in place; it is a scalar-prefetch operand,
    so every layer of a model runs one compiled kernel."""
    b, t, hq, d = q.shape
    L, hkv = k_cache.shape[-3], k_cache.shape[-2]
    if tile % 8:
        raise ValueError(f"{tile=} must be a multiple of 8 (TPU sublanes)")
    num_splits = 1 if num_splits is None else num_splits
    window = min(window, L + t)  # a longer window sees the same slots; keeps slot arithmetic inside int32
    group = hq // hkv
    tg = t * group
    compute_dtype = jnp.float32 if k_cache.dtype == jnp.float16 else k_cache.dtype  # no f16 MXU path: f32
    sublanes = 8 * 4 // jnp.dtype(compute_dtype).itemsize  # 8 rows of 32-bit, 16 of 16-bit
    rows = -(-tg // sublanes) * sublanes
    # [b, t, hkv * group, d] -> [b, hkv, t * group (+ padding), d]: row r = token r // group, head r % group.
    qg = q.astype(compute_dtype).reshape(b, t, hkv, group, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, tg, d)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - tg), (0, 0)))
    lengths = lengths.astype(jnp.int32)
    kv_start = kv_start.astype(jnp.int32)
    if crit is None or crit.shape[1] == 0:
        live = jnp.full((b, tile), -1, jnp.int32)
        counts = jnp.zeros((b,), jnp.int32)
    else:
        live = live_critical(
            crit, counts, lengths, kv_start, window=window, num_global=num_global, tile=tile, cache_len=L
        )
        counts = jnp.full((b,), crit.shape[1], jnp.int32) if counts is None else counts.astype(jnp.int32)
    cap = live.shape[1]
    layer_arr = jnp.zeros((1,), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32).reshape(1)
    band_rows = min(tile, L)
    sink_rows = min(band_rows, max(8, -(-num_global // 8) * 8))
    scale = (d**-0.5 if sm_scale is None else sm_scale) * LOG2E
    kernel = functools.partial(
        _decode_kernel,
        scale=scale,
        t=t,
        group=group,
        rows=rows,
        tile=tile,
        band_rows=band_rows,
        sink_rows=sink_rows,
        cap=cap,
        window=window,
        num_global=num_global,
        num_splits=num_splits,
        cache_len=L,
        hkv=hkv,
        stacked=layer is not None,
        compute_dtype=compute_dtype,
        precision=jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None,
    )
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(b, num_splits),
            in_specs=[
                pl.BlockSpec((None, hkv, rows, d), lambda bi, s, *_: (bi, 0, 0, 0)),
                pl.BlockSpec((None, cap // tile, tile), lambda bi, s, *_: (bi, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=[
                pl.BlockSpec((None, None, hkv, rows, d), lambda bi, s, *_: (bi, s, 0, 0, 0)),
                pl.BlockSpec((None, None, hkv, rows, 1), lambda bi, s, *_: (bi, s, 0, 0, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((2, tile, hkv, d), k_cache.dtype),
                pltpu.VMEM((2, tile, hkv, d), v_cache.dtype),
                pltpu.SemaphoreType.DMA((2, 2)),
                pltpu.SMEM((2,), jnp.int32),
                pltpu.VMEM((hkv, rows, 1), jnp.float32),
                pltpu.VMEM((hkv, rows, 1), jnp.float32),
                pltpu.VMEM((hkv, rows, d), jnp.float32),
                pltpu.VMEM((hkv, rows, 1), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b, num_splits, hkv, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, num_splits, hkv, rows, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=_interpret(interpret),
        name="sparse_decode_tpu",
    )(lengths, kv_start, counts, live.reshape(-1), layer_arr, qg, live.reshape(b, cap // tile, tile), k_cache, v_cache)
    return o[:, :, :, :tg].transpose(0, 2, 1, 3, 4), lse[:, :, :, :tg, 0].transpose(0, 2, 1, 3)
