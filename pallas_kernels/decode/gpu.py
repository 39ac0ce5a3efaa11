"""Triton (Pallas) sparse decode kernels: one program per (row, kv head, split) walks its tiles of cache slots with
an online softmax; a second small kernel merges the splits by their log-sum-exps. `pallas_kernels.decode.api`
validates the arguments and dispatches here."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
NEG = -1e30
# Default programs per call (~8 per SM of an H100): at batch 1 every (kv head, tile) gets its own program, at batch 8
# each program takes ~5 tiles. An H100 sweep (benchmarks/results/decode-tune-2026-11-23.json) put 1024 programs
# with 2 warps ahead of 264 with 4 by 7-17% in kernel time.
TARGET_PROGRAMS = 1024


def _decode_kernel(
    len_ref,
    start_ref,
    count_ref,
    crit_ref,
    layer_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    *,
    scale,
    t,
    group,
    hq,
    rows,
    tile,
    num_splits,
    n_band,
    n_sink,
    num_crit,
    has_counts,
    window,
    num_global,
    skip_empty,
    stacked,
    dot_kw,
):
    """One program: units split, split + num_splits, ... of its (row, kv head) while they are live.

    Unit u < n_band is a tile of the window band, then n_sink tiles of sinks, then the tiles of the critical list
    up to the row's live count: the loop bound is dynamic, so a short list (or the -1 tail past `counts`) costs no
    iterations, and the strided assignment keeps every program's share within one unit of the others'."""
    h, split = pl.program_id(1), pl.program_id(2)
    length = len_ref[...]
    start = jnp.maximum(start_ref[...], 0)
    count = jnp.clip(count_ref[...], 0, num_crit) if has_counts else num_crit
    # Tile row r serves query row r % (t * group) (token-major, then the heads of the group): rows past the
    # real ones (the dots need >= 16) repeat real rows, compute identical values and store them to the same place.
    r = jnp.arange(rows) % (t * group)
    tok = r // group
    q = q_ref[tok * hq + h * group + r % group, :]
    q_pos = length - t + tok
    q_pos = jnp.where(q_pos >= start, q_pos, -1)  # a new token in the left padding sees nothing
    lane = jnp.arange(tile)
    # Masked loads and stores index every dimension with an array (interpret mode needs that form).
    cols = jnp.arange(q.shape[1])[None, :]
    lo = jnp.maximum(start, length - t - window + 1)  # first band slot
    # A stacked cache's block holds every layer; the layer is a runtime operand, so all layers share one kernel.
    kv_at = (lambda rows_, cols_: (layer_ref[0], rows_, cols_)) if stacked else (lambda rows_, cols_: (rows_, cols_))

    def attend(carry, slots, slot_ok, vis):
        m, l, acc, seen_bad = carry
        safe = jnp.where(slot_ok, slots, 0)
        k = plgpu.load(k_ref.at[kv_at(safe[:, None], cols)], mask=slot_ok[:, None], other=0.0)
        v = plgpu.load(v_ref.at[kv_at(safe[:, None], cols)], mask=slot_ok[:, None], other=0.0)
        # A slot with a non-finite k or v (x - x != 0) is zeroed and marks only the rows that see it: in p @ v its
        # 0 weight for the other rows would still give 0 * NaN = NaN.
        bad = jnp.max(((k - k != 0) | (v - v != 0)).astype(jnp.int32), axis=1) > 0
        k = jnp.where(bad[:, None], jnp.zeros_like(k), k)
        v = jnp.where(bad[:, None], jnp.zeros_like(v), v)
        seen_bad = jnp.maximum(seen_bad, jnp.max((vis & bad[None, :]).astype(jnp.int32), axis=1))
        s = plgpu.dot(q, k, trans_b=True, **dot_kw) * scale
        s = jnp.where(vis, s, NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(vis, jnp.exp2(s - m_new[:, None]), 0.0)
        l = l * alpha + p.sum(axis=-1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, **dot_kw)
        return m_new, l, acc, seen_bad

    def unit(i, carry):
        u = split + i * num_splits
        is_band, is_crit = u < n_band, u >= n_band + n_sink
        # Band: slots lo .. length - 1, each seen by a query iff within its window (and not after it).
        band_slots = lo + u * tile + lane
        # Sinks and critical slots are read only if some query sees them outside its window: the last new token
        # (position length - 1) is the most permissive, so slot < length - window.
        sink_slots = start + (u - n_band) * tile + lane
        pos = (u - n_band - n_sink) * tile + lane
        listed = is_crit & (pos < count)
        at = jnp.clip(pos, 0, max(num_crit - 1, 0))
        crit_slots = plgpu.load(crit_ref.at[at], mask=listed, other=-1)
        # A repeat is skipped by comparing with the previous entry (equal entries are adjacent).
        prev = plgpu.load(crit_ref.at[jnp.maximum(at - 1, 0)], mask=listed & (pos > 0), other=-1)
        slots = jnp.where(is_band, band_slots, jnp.where(is_crit, crit_slots, sink_slots))
        sticky_ok = slots < length - window
        sink_ok = sticky_ok & (slots < start + num_global)
        crit_ok = sticky_ok & listed & (slots >= start + num_global) & (slots != prev)
        slot_ok = jnp.where(is_band, slots < length, jnp.where(is_crit, crit_ok, sink_ok))
        dist = q_pos[:, None] - slots[None, :]
        vis = slot_ok[None, :] & jnp.where(is_band, (dist >= 0) & (dist < window), dist >= window)
        if not skip_empty:
            return attend(carry, slots, slot_ok, vis)
        return jax.lax.cond(
            slot_ok.astype(jnp.int32).max() > 0, lambda c: attend(c, slots, slot_ok, vis), lambda c: c, carry
        )

    carry = (
        jnp.full((rows,), NEG, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, q.shape[1]), jnp.float32),
        jnp.zeros((rows,), jnp.int32),
    )
    units = n_band + n_sink + (count + tile - 1) // tile
    carry = jax.lax.fori_loop(0, jnp.maximum(units - split + num_splits - 1, 0) // num_splits, unit, carry)
    m, l, acc, seen_bad = carry
    nonempty = l > 0
    out = jnp.where(seen_bad[:, None] > 0, jnp.nan, acc / jnp.where(nonempty, l, 1.0)[:, None])
    plgpu.store(o_ref.at[r[:, None], cols], out)
    plgpu.store(lse_ref.at[r], jnp.where(nonempty, m + jnp.log2(jnp.where(nonempty, l, 1.0)), -jnp.inf))


def _combine_kernel(o_ref, lse_ref, out_ref, *, num_splits, chunk, t, group, hq, tg_pad, cols_per_program):
    """Merge the splits of one (row, kv head, column block) and write those columns of its query rows of
    out [t * hq, d] in place. With the default sizes all splits arrive in one load (chunk >= num_splits)."""
    h = pl.program_id(1)
    r = jnp.arange(tg_pad) % (t * group)
    cols = pl.program_id(2) * cols_per_program + jnp.arange(cols_per_program)
    m = jnp.full((tg_pad,), NEG, jnp.float32)
    total = jnp.zeros((tg_pad,), jnp.float32)
    acc = jnp.zeros((tg_pad, cols_per_program), jnp.float32)

    def body(c, carry):
        m, total, acc = carry
        split = c * chunk + jnp.arange(chunk)
        ok = split < num_splits
        safe = jnp.where(ok, split, 0)
        lse = plgpu.load(lse_ref.at[safe[:, None], r[None, :]], mask=ok[:, None], other=-jnp.inf)
        o = plgpu.load(
            o_ref.at[safe[:, None, None], r[None, :, None], cols[None, None, :]], mask=ok[:, None, None], other=0.0
        )
        m_new = jnp.maximum(m, lse.max(axis=0))
        alpha = jnp.exp2(m - m_new)
        w = jnp.exp2(lse - m_new[None, :])  # lse = -inf (nothing visible, or past the last split) gives 0
        total = total * alpha + w.sum(axis=0)
        acc = acc * alpha[:, None] + (w[:, :, None] * o).sum(axis=0)
        return m_new, total, acc

    m, total, acc = jax.lax.fori_loop(0, -(-num_splits // chunk), body, (m, total, acc))
    out = acc / jnp.where(total > 0, total, 1.0)[:, None]
    row = (r // group) * hq + h * group + r % group
    plgpu.store(out_ref.at[row[:, None], cols[None, :]], out.astype(out_ref.dtype))


def decode_partials(
    q, k_cache, v_cache, lengths, kv_start, crit, counts, *, window, num_global, sm_scale, num_splits, tile, num_warps,
    num_stages, skip_empty, interpret, layer=None
):
    """The decode kernel alone: (o [b, hkv, splits, t * group, d] f32, lse [b, hkv, splits, t * group] base 2).
    `crit` ([b, c] with equal entries adjacent, or None) is read as given, up to `counts` ([b] or None: all c);
    `layer` (an int or an int32 scalar array) indexes a stacked cache: it reaches the kernel as an operand, so every
    layer of a model runs one compiled kernel."""
    b, t, hq, d = q.shape
    L, hkv = k_cache.shape[-3], k_cache.shape[-2]
    if layer is None:
        kv_spec = pl.BlockSpec((None, L, None, d), lambda bi, h, s: (bi, 0, h, 0))
    else:
        layers = k_cache.shape[0]
        kv_spec = pl.BlockSpec((layers, None, L, None, d), lambda bi, h, s: (0, bi, 0, h, 0))
    layer_arr = jnp.zeros((1,), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32).reshape(1)
    scale = (d**-0.5 if sm_scale is None else sm_scale) * LOG2E
    group = hq // hkv
    tg = t * group
    rows = max(16, pl.next_power_of_2(tg))
    num_crit = 0 if crit is None else crit.shape[1]
    crit = jnp.full((b, 1), -1, jnp.int32) if crit is None else crit
    has_counts = counts is not None and num_crit > 0
    counts = jnp.zeros((b,), jnp.int32) if counts is None else counts.astype(jnp.int32)
    n_band = -(-min(window + t - 1, L) // tile)
    n_sink = -(-min(num_global, L) // tile)
    max_units = n_band + n_sink + -(-num_crit // tile)
    if num_splits is None:
        num_splits = -(-TARGET_PROGRAMS // (b * hkv))
    num_splits = min(num_splits, max_units)
    kernel = functools.partial(
        _decode_kernel,
        scale=scale,
        t=t,
        group=group,
        hq=hq,
        rows=rows,
        tile=tile,
        num_splits=num_splits,
        n_band=n_band,
        n_sink=n_sink,
        num_crit=num_crit,
        has_counts=has_counts,
        window=window,
        num_global=num_global,
        skip_empty=skip_empty,
        stacked=layer is not None,
        dot_kw={"allow_tf32": False} if q.dtype == jnp.float32 else {},
    )
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        in_specs=[
            pl.BlockSpec((None,), lambda bi, h, s: (bi,)),
            pl.BlockSpec((None,), lambda bi, h, s: (bi,)),
            pl.BlockSpec((None,), lambda bi, h, s: (bi,)),
            pl.BlockSpec((None, crit.shape[1]), lambda bi, h, s: (bi, 0)),
            pl.BlockSpec((1,), lambda bi, h, s: (0,)),
            pl.BlockSpec((None, t * hq, d), lambda bi, h, s: (bi, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, tg, d), lambda bi, h, s: (bi, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, tg), lambda bi, h, s: (bi, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, num_splits, tg, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, num_splits, tg), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sparse_decode",
    )(
        lengths.astype(jnp.int32), kv_start.astype(jnp.int32), counts, crit, layer_arr, q.reshape(b, t * hq, d),
        k_cache, v_cache,
    )


def combine_partials(o, lse, q_shape, dtype, *, cols_per_program: int = 32, interpret: bool = False):
    """[b, t, hq, d] output from the kernel's partials, merged by `_combine_kernel`: one program per (row, kv head,
    block of `cols_per_program` columns), so that a few programs per head read the splits at once instead of one
    program looping over them (at 69 splits that loop made the merge ~4 us, a third of a 32k decode)."""
    b, t, hq, d = q_shape
    _, hkv, num_splits, tg, _ = o.shape
    group = hq // hkv
    tg_pad = pl.next_power_of_2(tg)
    cols_per_program = math.gcd(cols_per_program, d)  # a power of two dividing d
    chunk = max(1, min(pl.next_power_of_2(num_splits), 8192 // (tg_pad * cols_per_program)))
    out = pl.pallas_call(
        functools.partial(
            _combine_kernel, num_splits=num_splits, chunk=chunk, t=t, group=group, hq=hq, tg_pad=tg_pad,
            cols_per_program=cols_per_program,
        ),
        grid=(b, hkv, d // cols_per_program),
        in_specs=[
            pl.BlockSpec((None, None, num_splits, tg, d), lambda bi, h, c: (bi, h, 0, 0, 0)),
            pl.BlockSpec((None, None, num_splits, tg), lambda bi, h, c: (bi, h, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, t * hq, d), lambda bi, h, c: (bi, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, t * hq, d), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="sparse_decode_combine",
    )(o, lse)
    return out.reshape(b, t, hq, d)
