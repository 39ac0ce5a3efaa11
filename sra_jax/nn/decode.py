"""Decode steps through the sparse decode kernel: a few new tokens read only the cache slots they can see.

With `attention_impl="pallas"`, a call with a cache and at most `MAX_DECODE_TOKENS` new tokens runs
`pallas_kernels.sparse_decode_attention` (flash-decoding over the window band, the global sinks and the critical
slots) instead of the block-sparse prefill kernel over the whole cache. The kernel reads slots, not positions: it
needs the left-padded layout that `sra_jax.generate` (and any prompt batch padded on the left) produces, where row i
holds its tokens in slots kv_start[i] .. index - 1 and slot kv_start + p holds position p. A `KVCache` checks that
layout on its positions at each call (O(batch * max_len) integer compares, no K/V reads); if it does not hold (right
padding, gaps, offset positions) the call takes the general path, so results never depend on the layout. On a GPU
that check's `lax.cond` makes the host wait for the stream once per layer; a `LeftPaddedKVCache` (as
`sra_jax.generate` and the evals build theirs) has the layout by construction and skips both.

The critical slots come from the cache's own lists (`KVCache.critical_slots` / `num_critical`: ascending, kept in
step with the flags by every call, so a decode step builds nothing over the cache length) and reach the kernel with
`critical_counts`: it reads only each row's first num_critical entries, so its work follows the number of critical
slots, not the cache capacity (the list is never truncated: a decoded token is critical whenever its router score
clears the prefill threshold, so no smaller static bound holds).
`queries="critical"`: a non-critical new token sees only window + globals, so its row gets no critical slots
(one new token: its row's count is 0; several: a second window + globals call and a per-token choice).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sra_jax.ops.masks import SRARule

# A call with a cache and at most this many new tokens is a decode step (static: decided by the call's shape).
MAX_DECODE_TOKENS = 4
# SparseReasoningAttention(decode_kernel=...): "off" keeps the general attention path for decode steps; "auto",
# "triton", "reference" are the kernel's backends; "interpret" is the Triton kernel in Pallas interpret mode (CPU
# tests).
DECODE_KERNELS = ("auto", "triton", "reference", "interpret", "off")


def check_decode_kernel(decode_kernel: str) -> None:
    if decode_kernel not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel={decode_kernel!r} must be one of {DECODE_KERNELS}")


def first_valid_slot(positions: Int[Array, "b n"]) -> Int[Array, " b"]:
    """Each row's first non-empty slot (kv_start of a left-padded row)."""
    return jnp.argmax(positions >= 0, axis=-1).astype(jnp.int32)


def left_padded_layout(
    positions: Int[Array, "b n"], lengths: Int[Array, ""]
) -> tuple[Int[Array, " b"], Bool[Array, ""]]:
    """(kv_start, ok): each row's first valid slot, and whether every row is laid out as the kernel reads it:
    slots kv_start .. lengths - 1 hold positions 0, 1, ... and every other slot is empty (-1)."""
    slots = jnp.arange(positions.shape[-1], dtype=jnp.int32)
    kv_start = first_valid_slot(positions)
    inside = (slots[None, :] >= kv_start[:, None]) & (slots[None, :] < lengths)
    expected = jnp.where(inside, slots[None, :] - kv_start[:, None], -1)
    ok = jnp.all(positions == expected) & jnp.all(kv_start < lengths)
    return kv_start, ok


def sparse_decode(
    q: Float[Array, "b t hq d"],
    k: Float[Array, "*layers b n hkv d"],
    v: Float[Array, "*layers b n hkv d"],
    *,
    layer: int | None = None,
    lengths: Int[Array, ""],
    kv_start: Int[Array, " b"],
    rule: SRARule,
    critical_slots: Int[Array, "b n"] | None,
    num_critical: Int[Array, " b"] | None,
    q_critical: Bool[Array, "b t"] | None,
    decode_kernel: str,
) -> Float[Array, "b t hq d"]:
    """SRA attention of the t new tokens (already in the cache, slots lengths - t .. lengths - 1) through the sparse
    decode kernel under `rule` (window, num_global, queries; its max_critical is unused: the lists are read up to
    their lengths). `critical_slots` / `num_critical` are the layer's ascending critical slot lists and their lengths
    (`KVCache`); None means no critical slots (dense layers pass window = cache length). `q_critical` is the new
    tokens' flags, used when rule.queries == "critical". With `layer`, k / v are the model's stacked cache
    [layers, b, n, hkv, d] and the kernel reads that layer in place."""
    import pallas_kernels

    b, t = q.shape[:2]
    backend = "triton" if decode_kernel == "interpret" else decode_kernel
    row_lengths = jnp.broadcast_to(lengths, (b,)).astype(jnp.int32)

    def run(counts):
        return pallas_kernels.sparse_decode_attention(
            q, k, v, row_lengths, window=rule.window, num_global=rule.num_global, kv_start=kv_start, layer=layer,
            backend=backend, interpret=decode_kernel == "interpret",
            critical_indices=None if counts is None else critical_slots, critical_counts=counts,
            critical_sorted=counts is not None,
        )

    if critical_slots is None:
        return run(None)
    counts = num_critical.astype(jnp.int32)
    if rule.queries == "all":
        return run(counts)
    if t == 1:
        return run(jnp.where(q_critical[:, 0], counts, 0))
    with_critical, local = run(counts), run(None)
    return jnp.where(q_critical[:, :, None, None], with_critical, local)
