"""Sparse decode: the new tokens read only the cache slots they can see, gathered inside one Triton kernel.

The work of one (sequence, kv head) is a static list of tiles: the window band (contiguous; its slots come from
`lengths` inside the kernel, so no slot list is built in HBM), then the global sinks, then the critical indices,
read straight from `critical_indices`. The list is split over programs (flash-decoding) so that one long sequence
fills the GPU; the query heads of a kv group share each K/V load as rows of one tile; a logsumexp-weighted combine
merges the splits. Every slot is shown to a query by exactly one part: the band shows the slots in its window, the
sinks and critical indices only slots outside it, and a critical index repeated in a row is skipped by comparing
it with its neighbour in the sorted row. Loads of slots nobody sees are masked off (no HBM traffic), and a
critical tile with no live entry skips its dots.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

LOG2E = math.log2(math.e)
NEG = -1e30
TARGET_PROGRAMS = 264  # about two programs per SM of an H100 (132 SMs)


def sort_critical(critical_indices: Int[Array, "b c"]) -> Int[Array, "b c"]:
    """Rows sorted ascending with every negative entry (padding) moved to the end: a sort of the uint32 view."""
    as_unsigned = jax.lax.bitcast_convert_type(critical_indices.astype(jnp.int32), jnp.uint32)
    return jax.lax.bitcast_convert_type(jnp.sort(as_unsigned, axis=-1), jnp.int32)


def decode_slots(
    lengths,
    *,
    num_new: int,
    window: int,
    num_global: int,
    critical_indices,
    tile: int,
    kv_start=None,
):
    """([b, n] int32 list of the cache slots the new tokens read, each once, -1 padding; number of band tiles).

    The band is the last new token's window; sinks and critical indices follow when they lie outside it. Used to
    count the bytes a decode step must read (the kernel itself builds no such list)."""
    b = lengths.shape[0]
    start = jnp.zeros((b,), jnp.int32) if kv_start is None else jnp.maximum(kv_start.astype(jnp.int32), 0)
    band = window + num_new - 1
    band_pad = -(-band // tile) * tile
    lo = jnp.maximum(start, lengths - num_new - window + 1)[:, None]
    window_slots = lo + jnp.arange(band_pad)[None, :]
    window_slots = jnp.where(window_slots < lengths[:, None], window_slots, -1)
    sticky = [start[:, None] + jnp.arange(num_global)[None, :]]
    if critical_indices is not None:
        crit = critical_indices.astype(jnp.int32)
        sticky.append(jnp.where(crit >= (start + num_global)[:, None], crit, -1))
    sticky = sort_critical(jnp.concatenate(sticky, axis=1).astype(jnp.int32))
    repeat = jnp.concatenate([jnp.zeros((b, 1), bool), sticky[:, 1:] == sticky[:, :-1]], axis=1)
    keep = (sticky >= start[:, None]) & (sticky < (lengths - window)[:, None]) & ~repeat
    sticky = jnp.where(keep, sticky, -1)
    sticky_pad = -(-sticky.shape[1] // tile) * tile
    sticky = jnp.pad(sticky, ((0, 0), (0, sticky_pad - sticky.shape[1])), constant_values=-1)
    return jnp.concatenate([window_slots.astype(jnp.int32), sticky], axis=1), band_pad // tile


def _decode_kernel(
    len_ref,
    start_ref,
    crit_ref,
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
    units_per_split,
    n_band,
    n_sink,
    n_crit,
    num_crit,
    window,
    num_global,
    skip_empty,
    dot_kw,
):
    h, split = pl.program_id(1), pl.program_id(2)
    length = len_ref[...]
    start = jnp.maximum(start_ref[...], 0)
    # Tile row r serves query row r % (t * group) (token-major, then the heads of the group): rows past the
    # real ones (the dots need >= 16) repeat real rows, compute identical values and store them to the same place.
    r = jnp.arange(rows) % (t * group)
    tok = r // group
    q = q_ref[tok * hq + h * group + r % group, :]
    q_pos = length - t + tok
    q_pos = jnp.where(q_pos >= start, q_pos, -1)  # a new token in the left padding sees nothing
    first = split * units_per_split
    last = first + units_per_split
    lane = jnp.arange(tile)
    # Masked loads and stores index every dimension with an array (interpret mode needs that form).
    cols = jnp.arange(q.shape[1])[None, :]

    def attend(carry, slots, slot_ok, vis):
        m, l, acc = carry
        safe = jnp.where(slot_ok, slots, 0)
        k = plgpu.load(k_ref.at[safe[:, None], cols], mask=slot_ok[:, None], other=0.0)
        v = plgpu.load(v_ref.at[safe[:, None], cols], mask=slot_ok[:, None], other=0.0)
        s = plgpu.dot(q, k, trans_b=True, **dot_kw) * scale
        s = jnp.where(vis, s, NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(vis, jnp.exp2(s - m_new[:, None]), 0.0)
        l = l * alpha + p.sum(axis=-1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, **dot_kw)
        return m_new, l, acc

    # Band: slots lo .. length - 1, seen by a query iff within its window (and not after it).
    lo = jnp.maximum(start, length - t - window + 1)

    def band(j, carry):
        slots = lo + j * tile + lane
        slot_ok = slots < length
        dist = q_pos[:, None] - slots[None, :]
        vis = slot_ok[None, :] & (dist >= 0) & (dist < window)
        return attend(carry, slots, slot_ok, vis)

    # A sticky slot (sink or critical) is read only if some query sees it outside its window: the last new
    # token (position length - 1) is the most permissive, so slot < length - window.
    def sink(j, carry):
        slots = start + (j - n_band) * tile + lane
        slot_ok = (slots < start + num_global) & (slots < length - window)
        vis = slot_ok[None, :] & (q_pos[:, None] - slots[None, :] >= window)
        return attend(carry, slots, slot_ok, vis)

    def critical(j, carry):
        pos = (j - n_band - n_sink) * tile + lane
        listed = pos < num_crit
        at = jnp.minimum(pos, num_crit - 1)
        slots = jnp.where(listed, crit_ref[at], -1)
        prev = jnp.where(listed & (pos > 0), crit_ref[jnp.maximum(at - 1, 0)], -1)
        slot_ok = (slots >= start + num_global) & (slots < length - window) & (slots != prev)
        vis = slot_ok[None, :] & (q_pos[:, None] - slots[None, :] >= window)
        if not skip_empty:
            return attend(carry, slots, slot_ok, vis)
        return jax.lax.cond(
            slot_ok.astype(jnp.int32).max() > 0, lambda c: attend(c, slots, slot_ok, vis), lambda c: c, carry
        )

    carry = (
        jnp.full((rows,), NEG, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, q.shape[1]), jnp.float32),
    )
    bounds = (0, n_band, n_band + n_sink, n_band + n_sink + n_crit)
    for body, lo_u, hi_u in zip((band, sink, critical), bounds[:-1], bounds[1:]):
        if hi_u == lo_u:
            continue
        begin, end = jnp.clip(first, lo_u, hi_u), jnp.clip(last, lo_u, hi_u)
        carry = jax.lax.fori_loop(begin, end, body, carry)
    m, l, acc = carry
    nonempty = l > 0
    plgpu.store(o_ref.at[r[:, None], cols], acc / jnp.where(nonempty, l, 1.0)[:, None])
    plgpu.store(lse_ref.at[r], jnp.where(nonempty, m + jnp.log2(jnp.where(nonempty, l, 1.0)), -jnp.inf))


def _combine_kernel(o_ref, lse_ref, out_ref, *, num_splits, chunk, t, group, hq, tg_pad, d):
    """Merge the splits of one (row, kv head) and write its query rows of out [t * hq, d] in place."""
    h = pl.program_id(1)
    r = jnp.arange(tg_pad) % (t * group)
    cols = jnp.arange(d)
    m = jnp.full((tg_pad,), NEG, jnp.float32)
    total = jnp.zeros((tg_pad,), jnp.float32)
    acc = jnp.zeros((tg_pad, d), jnp.float32)

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


def _combine(o, lse):  # XLA form of _combine_kernel
    """Merge the splits (axis 2): weights 2^(lse_s - max); a split with nothing visible has lse = -inf, weight 0."""
    m = lse.max(axis=2, keepdims=True)
    w = jnp.where(jnp.isfinite(lse), jnp.exp2(lse - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    total = w.sum(axis=2)
    return (o * w[..., None]).sum(axis=2) / jnp.where(total > 0, total, 1.0)[..., None]


def sparse_decode_attention(
    q: Float[Array, "b t hq d"],
    k_cache: Float[Array, "*layers b L hkv d"],
    v_cache: Float[Array, "*layers b L hkv d"],
    lengths: Int[Array, " b"],
    *,
    window: int,
    num_global: int = 0,
    critical_indices: Int[Array, "b c"] | None = None,
    kv_start: Int[Array, " b"] | None = None,
    critical_sorted: bool = False,
    sm_scale: float | None = None,
    backend: str = "auto",
    num_splits: int | None = None,
    tile: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    skip_empty: bool = True,
    combine: str = "pallas",
    layer: int | None = None,
    interpret: bool = False,
) -> Float[Array, "b t hq d"]:
    """Attention of t new tokens per sequence against a KV cache, reading only the slots each token can see.

    Slots: row i of the cache holds valid tokens in slots kv_start[i] .. lengths[i] - 1 (kv_start defaults to 0;
    slots before it are left padding and are never visible). The token in slot kv_start + p has position p. The t
    new tokens (already written to the cache) sit in slots lengths - t .. lengths - 1. A new token in slot s sees
    slot j iff kv_start <= j <= s and (s - j < window, or j < kv_start + num_global (the global sinks), or j is
    one of the row's `critical_indices`). A new token in a slot before kv_start sees nothing (output zeros).

    critical_indices: cache slots (not positions), any order, any static capacity c. Repeats count once;
    entries < kv_start + num_global (the sinks are seen anyway) or >= lengths, e.g. -1 padding, are ignored:
    their K/V loads are masked off (no HBM traffic) and a tile with no live entry skips its dots (skip_empty).
    By default each call sorts the rows with an XLA sort, which is slow: ~25 us for [1, 3277] and ~40 us for
    [1, 6553] on an H100, more than the decode itself. Pass critical_sorted=True whenever you can: it skips the
    sort and promises that equal entries of a row are adjacent, i.e. ascending rows (what
    jnp.nonzero(mask, size=c, fill_value=-1)[0] gives; keep the padding at the end so that dead tiles are
    contiguous) or rows without repeats. Ascending rows also gather with better locality.

    backend: "triton", "reference" (dense masked softmax, any device) or "auto" (triton on GPU). Tuning:
    num_splits (programs per (row, kv head); default: about 264 programs in all), tile (slots per step, a power
    of two >= 16), num_warps, num_stages, skip_empty, combine ("pallas": a second small kernel merges the
    splits; "xla": the same math as XLA ops).

    layer: with a stacked cache k_cache / v_cache [layers, b, L, hkv, d] (a model's cache), the layer to read.
    The kernel then indexes that layer itself: slicing cache[layer] outside would make XLA copy the whole layer's
    K/V (every slot, not just the visible ones) before the kernel on every decode step."""
    b, t, hq, d = q.shape
    if layer is not None:
        if k_cache.ndim != 5 or not 0 <= layer < k_cache.shape[0]:
            raise ValueError(f"layer={layer} needs a stacked cache [layers, b, L, hkv, d] holding that layer, got "
                             f"k_cache {k_cache.shape}")
    elif k_cache.ndim != 4:
        raise ValueError(f"k_cache {k_cache.shape} must be [b, L, hkv, d] (or [layers, b, L, hkv, d] with layer=)")
    L, hkv = k_cache.shape[-3], k_cache.shape[-2]
    if k_cache.shape != v_cache.shape or k_cache.shape[-4] != b or k_cache.shape[-1] != d:
        raise ValueError(f"k_cache {k_cache.shape} / v_cache {v_cache.shape} do not fit q {q.shape}")
    if hq % hkv:
        raise ValueError(f"kv heads ({hkv}) must divide query heads ({hq})")
    if window < 1:
        raise ValueError(f"{window=} must be >= 1")
    if num_global < 0:
        raise ValueError(f"{num_global=} must be >= 0")
    if lengths.shape != (b,):
        raise ValueError(f"lengths {lengths.shape} must be [batch={b}]")
    if kv_start is not None and kv_start.shape != (b,):
        raise ValueError(f"kv_start {kv_start.shape} must be [batch={b}]")
    if critical_indices is not None and (critical_indices.ndim != 2 or critical_indices.shape[0] != b):
        raise ValueError(f"critical_indices {critical_indices.shape} must be [batch={b}, capacity]")
    if backend == "auto":
        backend = "triton" if jax.default_backend() in ("gpu", "cuda") else "reference"
    if backend == "reference":
        from pallas_kernels import reference

        return reference.sparse_decode_attention(
            q,
            k_cache if layer is None else k_cache[layer],
            v_cache if layer is None else v_cache[layer],
            lengths,
            window=window,
            num_global=num_global,
            critical_indices=critical_indices,
            kv_start=kv_start,
            sm_scale=sm_scale,
        )
    if backend != "triton":
        raise ValueError(f"backend {backend!r} not in ('auto', 'triton', 'reference')")
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"{tile=} must be a power of two >= 16")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{num_splits=} must be >= 1")
    if combine not in ("pallas", "xla"):
        raise ValueError(f"combine {combine!r} not in ('pallas', 'xla')")
    kv_start = jnp.zeros((b,), jnp.int32) if kv_start is None else kv_start
    crit = None
    if critical_indices is not None and critical_indices.shape[1] > 0:
        crit = critical_indices.astype(jnp.int32)
        crit = crit if critical_sorted else sort_critical(crit)
    tuning = dict(num_splits=num_splits, tile=tile, num_warps=num_warps, num_stages=num_stages)
    o, lse = decode_partials(
        q, k_cache, v_cache, lengths, kv_start, crit, window=window, num_global=num_global, sm_scale=sm_scale,
        skip_empty=skip_empty, layer=layer, interpret=interpret, **tuning
    )
    return combine_splits(o, lse, q.shape, q.dtype, combine=combine, interpret=interpret)


def decode_partials(
    q, k_cache, v_cache, lengths, kv_start, crit, *, window, num_global, sm_scale, num_splits, tile, num_warps,
    num_stages, skip_empty, interpret, layer=None
):
    """The decode kernel alone: (o [b, hkv, splits, t * group, d] f32, lse [b, hkv, splits, t * group] base 2).
    `crit` ([b, c] with equal entries adjacent, or None) is read as given; `layer` indexes a stacked cache."""
    b, t, hq, d = q.shape
    L, hkv = k_cache.shape[-3], k_cache.shape[-2]
    if layer is None:
        kv_spec = pl.BlockSpec((None, L, None, d), lambda bi, h, s: (bi, 0, h, 0))
    else:
        kv_spec = pl.BlockSpec((None, None, L, None, d), lambda bi, h, s: (layer, bi, 0, h, 0))
    scale = (d**-0.5 if sm_scale is None else sm_scale) * LOG2E
    group = hq // hkv
    tg = t * group
    rows = max(16, pl.next_power_of_2(tg))
    num_crit = 0 if crit is None else crit.shape[1]
    crit = jnp.full((b, 1), -1, jnp.int32) if crit is None else crit
    n_band = -(-min(window + t - 1, L) // tile)
    n_sink = -(-min(num_global, L) // tile)
    n_crit = -(-num_crit // tile)
    units = n_band + n_sink + n_crit
    if num_splits is None:
        num_splits = -(-TARGET_PROGRAMS // (b * hkv))
    units_per_split = -(-units // min(num_splits, units))
    num_splits = -(-units // units_per_split)
    kernel = functools.partial(
        _decode_kernel,
        scale=scale,
        t=t,
        group=group,
        hq=hq,
        rows=rows,
        tile=tile,
        units_per_split=units_per_split,
        n_band=n_band,
        n_sink=n_sink,
        n_crit=n_crit,
        num_crit=num_crit,
        window=window,
        num_global=num_global,
        skip_empty=skip_empty,
        dot_kw={"allow_tf32": False} if q.dtype == jnp.float32 else {},
    )
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        in_specs=[
            pl.BlockSpec((None,), lambda bi, h, s: (bi,)),
            pl.BlockSpec((None,), lambda bi, h, s: (bi,)),
            pl.BlockSpec((None, crit.shape[1]), lambda bi, h, s: (bi, 0)),
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
    )(lengths.astype(jnp.int32), kv_start.astype(jnp.int32), crit, q.reshape(b, t * hq, d), k_cache, v_cache)


def combine_splits(o, lse, q_shape, dtype, *, combine: str = "pallas", interpret: bool = False):
    """[b, t, hq, d] output from the kernel's partials: one small Pallas kernel, or the same math in XLA."""
    b, t, hq, d = q_shape
    _, hkv, num_splits, tg, _ = o.shape
    group = hq // hkv
    if combine == "xla":
        out = _combine(o, lse).reshape(b, hkv, t, group, d).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, d)
        return out.astype(dtype)
    tg_pad = pl.next_power_of_2(tg)
    chunk = max(1, min(pl.next_power_of_2(num_splits), 8192 // (tg_pad * d)))
    out = pl.pallas_call(
        functools.partial(
            _combine_kernel, num_splits=num_splits, chunk=chunk, t=t, group=group, hq=hq, tg_pad=tg_pad, d=d
        ),
        grid=(b, hkv),
        in_specs=[
            pl.BlockSpec((None, None, num_splits, tg, d), lambda bi, h: (bi, h, 0, 0, 0)),
            pl.BlockSpec((None, None, num_splits, tg), lambda bi, h: (bi, h, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, t * hq, d), lambda bi, h: (bi, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, t * hq, d), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="sparse_decode_combine",
    )(o, lse)
    return out.reshape(b, t, hq, d)
