"""Sparse decode: the new tokens read only the cache slots they can see, gathered inside one kernel (Triton:
gpu.py; Mosaic TPU: tpu.py; this module validates the arguments, dispatches, and holds the XLA merge).

The work of one (sequence, kv head) is a list of tiles: the window band (contiguous; its slots come from `lengths`
inside the kernel, so no slot list is built in HBM), then the global sinks, then the critical indices up to the
row's live count, read straight from `critical_indices`. The tiles are shared out over programs (flash-decoding) so
that one long sequence fills the GPU; the query heads of a kv group share each K/V load as rows of one tile; a
logsumexp-weighted merge combines the programs. Every slot is shown to a query by exactly one part: the band shows
the slots in its window, the sinks and critical indices only slots outside it, and a critical index repeated in a
row is skipped by comparing it with its neighbour in the sorted row. Loads of slots nobody sees are masked off (no
HBM traffic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels import reference


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

def sparse_decode_attention(
    q: Float[Array, "b t hq d"],
    k_cache: Float[Array, "*layers b L hkv d"],
    v_cache: Float[Array, "*layers b L hkv d"],
    lengths: Int[Array, " b"],
    *,
    window: int,
    num_global: int = 0,
    critical_indices: Int[Array, "b c"] | None = None,
    critical_counts: Int[Array, " b"] | None = None,
    kv_start: Int[Array, " b"] | None = None,
    critical_sorted: bool = False,
    sm_scale: float | None = None,
    backend: str = "auto",
    num_splits: int | None = None,
    tile: int = 64,
    num_warps: int = 2,
    num_stages: int = 2,
    skip_empty: bool = False,
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
    their K/V loads are masked off (no HBM traffic); with skip_empty=True a tile with no live entry also skips its
    dots, but it still costs its index load and a branch: give critical_counts instead, so padding is never visited.
    By default each call sorts the rows with an XLA sort, which is slow: ~25 us for [1, 3277] and ~40 us for
    [1, 6553] on an H100, more than the decode itself. Pass critical_sorted=True whenever you can: it skips the
    sort and promises that equal entries of a row are adjacent, i.e. ascending rows (what
    jnp.nonzero(mask, size=c, fill_value=-1)[0] gives, padding at the end) or rows without repeats.

    critical_counts: [b] number of entries of each row's critical_indices to use (a model's growing list: its
    first counts[i] entries, the rest not even read). The kernel's programs then share only the live tiles (the
    loop bound is dynamic), so a list of capacity L with 10% live costs what a list of capacity 0.1 L costs.

    backend: "triton", "tpu" (Pallas Mosaic: decode/tpu.py), "reference" (dense masked softmax, any device) or
    "auto" (triton on GPU, tpu on TPU). With "tpu" the XLA combine always merges the splits (combine="pallas"
    maps to it), num_splits defaults to 1, and num_warps / num_stages / skip_empty do not apply. Tuning:
    num_splits (programs per (row, kv head); program s takes tiles s, s + num_splits, ...; default: about
    gpu.TARGET_PROGRAMS in all), tile (slots per step, a power of two >= 16), num_warps, num_stages, skip_empty
    (see above; a branch per tile, which cost 10-15% when no tile is dead on an H100), combine ("pallas": a
    second small kernel merges the splits; "xla": the same math as XLA ops).

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
    hkv = k_cache.shape[-2]
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
    if critical_counts is not None:
        if critical_indices is None:
            raise ValueError("critical_counts given without critical_indices")
        if critical_counts.shape != (b,):
            raise ValueError(f"critical_counts {critical_counts.shape} must be [batch={b}]")
    if backend == "auto":
        backend = {"gpu": "triton", "cuda": "triton", "tpu": "tpu"}.get(jax.default_backend(), "reference")
    if backend == "reference":
        return reference.sparse_decode_attention(
            q,
            k_cache if layer is None else k_cache[layer],
            v_cache if layer is None else v_cache[layer],
            lengths,
            window=window,
            num_global=num_global,
            critical_indices=critical_indices,
            critical_counts=critical_counts,
            kv_start=kv_start,
            sm_scale=sm_scale,
        )
    if backend not in ("triton", "tpu"):
        raise ValueError(f"backend {backend!r} not in ('auto', 'triton', 'tpu', 'reference')")
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"{tile=} must be a power of two >= 16")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{num_splits=} must be >= 1")
    if combine not in ("pallas", "xla"):
        raise ValueError(f"combine {combine!r} not in ('pallas', 'xla')")
    kv_start = jnp.zeros((b,), jnp.int32) if kv_start is None else kv_start
    crit = counts = None
    if critical_indices is not None and critical_indices.shape[1] > 0:
        crit = critical_indices.astype(jnp.int32)
        if critical_counts is not None:
            counts = critical_counts.astype(jnp.int32)
            if not critical_sorted:  # the sort moves the dropped entries (-1) behind the live ones: counts still bound
                crit = jnp.where(jnp.arange(crit.shape[1])[None, :] < counts[:, None], crit, -1)
        crit = crit if critical_sorted else sort_critical(crit)
    if backend == "tpu":
        from pallas_kernels.decode import tpu

        o, lse = tpu.decode_partials(
            q, k_cache, v_cache, lengths, kv_start, crit, counts, window=window, num_global=num_global,
            sm_scale=sm_scale, num_splits=num_splits, tile=tile, layer=layer, interpret=interpret
        )
        return combine_splits(o, lse, q.shape, q.dtype, combine="xla")
    tuning = dict(num_splits=num_splits, tile=tile, num_warps=num_warps, num_stages=num_stages)
    from pallas_kernels.decode import gpu

    o, lse = gpu.decode_partials(
        q, k_cache, v_cache, lengths, kv_start, crit, counts, window=window, num_global=num_global, sm_scale=sm_scale,
        skip_empty=skip_empty, layer=layer, interpret=interpret, **tuning
    )
    return combine_splits(o, lse, q.shape, q.dtype, combine=combine, interpret=interpret)


def _combine(o, lse):  # XLA form of gpu._combine_kernel
    """Merge the splits (axis 2): weights 2^(lse_s - max); a split with nothing visible has lse = -inf, weight 0."""
    m = lse.max(axis=2, keepdims=True)
    w = jnp.where(jnp.isfinite(lse), jnp.exp2(lse - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    total = w.sum(axis=2)
    return (o * w[..., None]).sum(axis=2) / jnp.where(total > 0, total, 1.0)[..., None]


def combine_splits(o, lse, q_shape, dtype, *, combine: str = "pallas", interpret: bool = False):
    """[b, t, hq, d] output from a kernel's partials: one small Pallas (Triton) kernel, or the same math in XLA."""
    if combine == "pallas":
        from pallas_kernels.decode import gpu

        return gpu.combine_partials(o, lse, q_shape, dtype, interpret=interpret)
    b, t, hq, d = q_shape
    hkv = o.shape[1]
    out = _combine(o, lse).reshape(b, hkv, t, hq // hkv, d).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, d)
    return out.astype(dtype)
