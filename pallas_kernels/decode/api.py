"""Sparse decode: the new tokens read only the slots they can see, gathered inside the kernel.

The slot list per sequence is the window band (contiguous) followed by the sticky slots (global sinks and
critical indices not already in the band), each part padded to whole tiles with -1. The list is split over
programs (flash-decoding) so one long sequence fills the GPU; each program gathers its K/V rows straight from
the cache (no compact copy in HBM), the query heads of a kv group share those loads as rows of one tile, and a
logsumexp-weighted combine merges the splits.
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


def decode_slots(lengths, *, num_new: int, window: int, num_global: int, critical_indices, tile: int):
    """([b, n] int32 slot list with -1 padding, number of window-band tiles). Static sizes only."""
    band = window + num_new - 1
    band_pad = -(-band // tile) * tile
    start = lengths[:, None] - num_new - window + 1
    window_slots = start + jnp.arange(band_pad)[None, :]
    window_slots = jnp.where(
        (jnp.arange(band_pad)[None, :] < band) & (window_slots >= 0) & (window_slots < lengths[:, None]),
        window_slots,
        -1,
    )
    sticky = [jnp.broadcast_to(jnp.arange(num_global), (lengths.shape[0], num_global))]
    if critical_indices is not None:
        sticky.append(critical_indices.astype(jnp.int32))
    sticky = jnp.concatenate(sticky, axis=1).astype(jnp.int32)
    # A sticky slot can leave the sticky list only when the window of every new token that can see it covers it,
    # i.e. when it lies in the last new token's window; the band tiles then show it. Others stay sticky, and the
    # kernel hides a sticky slot from a query whose own window already shows it, so nothing is counted twice.
    in_band = sticky >= (lengths - window)[:, None]
    is_critical = jnp.arange(sticky.shape[1])[None, :] >= num_global
    # A critical index among the sinks is already listed once; critical indices themselves must be unique.
    sticky = jnp.where(
        (sticky >= 0) & (sticky < lengths[:, None]) & ~in_band & ~(is_critical & (sticky < num_global)),
        sticky,
        -1,
    )
    sticky_pad = max(-(-sticky.shape[1] // tile) * tile, 0)
    sticky = jnp.pad(sticky, ((0, 0), (0, sticky_pad - sticky.shape[1])), constant_values=-1)
    return jnp.concatenate([window_slots.astype(jnp.int32), sticky], axis=1), band_pad // tile


def _decode_kernel(
    slots_ref,
    qpos_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    *,
    scale,
    tile,
    tiles_per_split,
    num_tiles,
    window_tiles,
    window,
    dot_kw,
):
    split = pl.program_id(2)
    q = q_ref[...]
    q_pos = qpos_ref[...]
    rows, d = q.shape
    first = split * tiles_per_split
    last = jnp.minimum(first + tiles_per_split, num_tiles)

    def visit(j, carry):
        m, l, acc = carry
        slots = slots_ref[pl.ds(pl.multiple_of(j * tile, tile), tile)]
        valid = slots >= 0
        safe = jnp.where(valid, slots, 0)
        k = k_ref[safe, :]
        v = v_ref[safe, :]
        s = plgpu.dot(q, k, trans_b=True, **dot_kw) * scale
        vis = valid[None, :] & (slots[None, :] <= q_pos[:, None])
        in_window = q_pos[:, None] - slots[None, :] < window
        vis = vis & jnp.where(j < window_tiles, in_window, ~in_window)
        s = jnp.where(vis, s, NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(vis, jnp.exp2(s - m_new[:, None]), 0.0)
        l = l * alpha + p.sum(axis=-1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, **dot_kw)
        return m_new, l, acc

    carry = (
        jnp.full((rows,), NEG, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, d), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(first, last, visit, carry)
    nonempty = l > 0
    o_ref[...] = acc / jnp.where(nonempty, l, 1.0)[:, None]
    lse_ref[...] = jnp.where(nonempty, m + jnp.log2(jnp.where(nonempty, l, 1.0)), -jnp.inf)


def sparse_decode_attention(
    q: Float[Array, "b t hq d"],
    k_cache: Float[Array, "b L hkv d"],
    v_cache: Float[Array, "b L hkv d"],
    lengths: Int[Array, " b"],
    *,
    window: int,
    num_global: int = 0,
    critical_indices: Int[Array, "b c"] | None = None,
    sm_scale: float | None = None,
    backend: str = "auto",
    num_splits: int | None = None,
    tile: int = 64,
    interpret: bool = False,
) -> Float[Array, "b t hq d"]:
    """The t new tokens of each sequence sit at positions lengths - t .. lengths - 1 (already written to the
    cache); each sees cache slot j <= its position iff it is within `window`, j < num_global, or j is in
    `critical_indices` (unique per row; -1 entries are ignored; sorted rows gather with better locality). Flash-decoding over the slot list; backend "triton", "reference"
    or "auto" (triton on GPU, else the reference)."""
    b, t, hq, d = q.shape
    L, hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache {k_cache.shape} / v_cache {v_cache.shape} do not fit q {q.shape}")
    if hq % hkv:
        raise ValueError(f"kv heads ({hkv}) must divide query heads ({hq})")
    if window < 1:
        raise ValueError(f"{window=} must be >= 1")
    if backend == "auto":
        backend = "triton" if jax.default_backend() in ("gpu", "cuda") else "reference"
    if backend == "reference":
        from pallas_kernels import reference

        return reference.sparse_decode_attention(
            q,
            k_cache,
            v_cache,
            lengths,
            window=window,
            num_global=num_global,
            critical_indices=critical_indices,
            sm_scale=sm_scale,
        )
    if backend != "triton":
        raise ValueError(f"backend {backend!r} not in ('auto', 'triton', 'reference')")
    scale = (d**-0.5 if sm_scale is None else sm_scale) * LOG2E
    group = hq // hkv
    rows = max(16, pl.next_power_of_2(t * group))
    slots, window_tiles = decode_slots(
        lengths, num_new=t, window=window, num_global=num_global, critical_indices=critical_indices, tile=tile
    )
    num_tiles = slots.shape[1] // tile
    if num_splits is None:  # about two programs per SM of an H100 (132 SMs)
        num_splits = max(1, min(num_tiles, -(-264 // (b * hkv))))
    tiles_per_split = -(-num_tiles // num_splits)
    num_splits = -(-num_tiles // tiles_per_split)
    # Rows of one kv head's tile: token-major, then the query heads of the group; padding rows see nothing.
    q_rows = q.reshape(b, t, hkv, group, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * group, d)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - t * group), (0, 0)))
    q_pos = lengths[:, None] - t + jnp.arange(rows)[None, :] // group
    q_pos = jnp.where(jnp.arange(rows)[None, :] < t * group, q_pos, -1).astype(jnp.int32)
    kernel = functools.partial(
        _decode_kernel,
        scale=scale,
        tile=tile,
        tiles_per_split=tiles_per_split,
        num_tiles=num_tiles,
        window_tiles=window_tiles,
        window=window,
        dot_kw={"allow_tf32": False} if q.dtype == jnp.float32 else {},
    )
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        in_specs=[
            pl.BlockSpec((None, slots.shape[1]), lambda bi, h, s: (bi, 0)),
            pl.BlockSpec((None, rows), lambda bi, h, s: (bi, 0)),
            pl.BlockSpec((None, None, rows, d), lambda bi, h, s: (bi, h, 0, 0)),
            pl.BlockSpec((None, L, None, d), lambda bi, h, s: (bi, 0, h, 0)),
            pl.BlockSpec((None, L, None, d), lambda bi, h, s: (bi, 0, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda bi, h, s: (bi, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda bi, h, s: (bi, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, num_splits, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, num_splits, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="sparse_decode",
    )(slots, q_pos, q_rows, k_cache, v_cache)
    # Combine the splits: weights 2^(lse_s - max); splits with nothing visible have lse = -inf and weight 0.
    m = lse.max(axis=2, keepdims=True)
    w = jnp.where(jnp.isfinite(lse), jnp.exp2(lse - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    total = w.sum(axis=2)
    out = (o * w[..., None]).sum(axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
    out = out[:, :, : t * group].reshape(b, hkv, t, group, d).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, d)
    return out.astype(q.dtype)
