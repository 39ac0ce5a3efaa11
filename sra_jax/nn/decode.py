"""Decode steps through the sparse decode kernel: a few new tokens read only the cache slots they can see.

With `attention_impl="pallas"`, a call with a cache and at most `MAX_DECODE_TOKENS` new tokens runs
`pallas_kernels.sparse_decode_attention` (flash-decoding over the window band, the global sinks and the critical
slots) instead of the block-sparse prefill kernel over the whole cache. The kernel reads slots, not positions: it
needs the left-padded layout that `sra_jax.generate` (and any prompt batch padded on the left) produces, where row i
holds its tokens in slots kv_start[i] .. index - 1 and slot kv_start + p holds position p. Each call checks that
layout on the cache's positions (O(batch * max_len) integer compares, no K/V reads); if it does not hold (right
padding, gaps, offset positions) the call takes the general path, so results never depend on the layout.

The critical slot list is `jnp.nonzero(cache.critical[layer], size=max_len, fill_value=-1)`: ascending, no
repeats, and never truncated (a decoded token is critical whenever its router score clears the prefill threshold,
so no smaller static bound holds); the kernel skips the -1 tail without reading K/V for it.
`queries="critical"`: a non-critical new token sees only window + globals, so its row gets no critical slots
(one new token: its row's list is blanked; several: a second window + globals call and a per-token choice).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

# A call with a cache and at most this many new tokens is a decode step (static: decided by the call's shape).
MAX_DECODE_TOKENS = 4
# SparseReasoningAttention(decode_kernel=...): "off" keeps the general attention path for decode steps; "auto",
# "triton", "reference" are the kernel's backends; "interpret" is the Triton kernel in Pallas interpret mode (CPU
# tests).
DECODE_KERNELS = ("auto", "triton", "reference", "interpret", "off")


def check_decode_kernel(decode_kernel: str) -> None:
    if decode_kernel not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel={decode_kernel!r} must be one of {DECODE_KERNELS}")


def left_padded_layout(
    positions: Int[Array, "b n"], lengths: Int[Array, ""]
) -> tuple[Int[Array, " b"], Bool[Array, ""]]:
    """(kv_start, ok): each row's first valid slot, and whether every row is laid out as the kernel reads it:
    slots kv_start .. lengths - 1 hold positions 0, 1, ... and every other slot is empty (-1)."""
    slots = jnp.arange(positions.shape[-1], dtype=jnp.int32)
    kv_start = jnp.argmax(positions >= 0, axis=-1).astype(jnp.int32)
    inside = (slots[None, :] >= kv_start[:, None]) & (slots[None, :] < lengths)
    expected = jnp.where(inside, slots[None, :] - kv_start[:, None], -1)
    ok = jnp.all(positions == expected) & jnp.all(kv_start < lengths)
    return kv_start, ok


def critical_slots(critical: Bool[Array, "b n"]) -> Int[Array, "b n"]:
    """Ascending critical slot indices of each row, padded with -1 to the cache length (never truncated)."""
    n = critical.shape[-1]
    return jax.vmap(lambda row: jnp.nonzero(row, size=n, fill_value=-1)[0].astype(jnp.int32))(critical)


def sparse_decode(
    q: Float[Array, "b t hq d"],
    k: Float[Array, "*layers b n hkv d"],
    v: Float[Array, "*layers b n hkv d"],
    *,
    layer: int | None = None,
    lengths: Int[Array, ""],
    kv_start: Int[Array, " b"],
    window: int,
    num_global: int,
    k_critical: Bool[Array, "b n"] | None,
    q_critical: Bool[Array, "b t"] | None,
    queries: str,
    decode_kernel: str,
) -> Float[Array, "b t hq d"]:
    """SRA attention of the t new tokens (already in the cache, slots lengths - t .. lengths - 1) through the sparse
    decode kernel. `k_critical` None means no critical slots (dense layers pass window = cache length);
    `q_critical` is the new tokens' flags, used when queries == "critical". With `layer`, k / v are the model's
    stacked cache [layers, b, n, hkv, d] and the kernel reads that layer in place."""
    import pallas_kernels

    b, t = q.shape[:2]
    backend = "triton" if decode_kernel == "interpret" else decode_kernel
    kw = dict(
        window=window,
        num_global=num_global,
        kv_start=kv_start,
        layer=layer,
        backend=backend,
        interpret=decode_kernel == "interpret",
    )
    row_lengths = jnp.broadcast_to(lengths, (b,)).astype(jnp.int32)

    def run(indices):
        extra = {} if indices is None else dict(critical_indices=indices, critical_sorted=True)
        return pallas_kernels.sparse_decode_attention(q, k, v, row_lengths, **kw, **extra)

    if k_critical is None:
        return run(None)
    indices = critical_slots(k_critical)
    if queries == "all":
        return run(indices)
    if t == 1:
        return run(jnp.where(q_critical[:, :1], indices, -1))
    with_critical, local = run(indices), run(None)
    return jnp.where(q_critical[:, :, None, None], with_critical, local)
