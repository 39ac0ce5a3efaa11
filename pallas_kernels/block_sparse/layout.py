"""Block-sparse layouts: per (batch, layout head, query block) the kv blocks to visit, CSR-like.

A layout is computed once outside the kernels. Each row lists its visited blocks with the *full* ones
(every token pair visible, so the kernel skips token masking) first, then the *partial* ones (token masks
applied inside the kernel). The transposed lists (per kv block, the query blocks that visit it) drive the
dK/dV pass. Lists are padded to the full width with the row's last visited block, so a pipeline that
prefetches a padded slot refetches a block it already holds.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kv_indices", "kv_counts", "kv_full", "q_indices", "q_counts", "q_full"],
    meta_fields=["block_q", "block_k", "seq_q", "seq_k"],
)
@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """kv_indices [b, h, nq, w]: kv blocks visited by query block i (full first); kv_counts / kv_full [b, h, nq]:
    how many are visited / full. q_* is the same for the transposed mask [b, h, nk, w'].
    `h` is 1 (shared by all heads), the kv-head count or the query-head count."""

    # Plain annotations: jax rebuilds pytree nodes with placeholder leaves, which a shape check would reject.
    kv_indices: Any
    kv_counts: Any
    kv_full: Any
    q_indices: Any
    q_counts: Any
    q_full: Any
    block_q: int
    block_k: int
    seq_q: int
    seq_k: int

    @property
    def num_heads(self) -> int:
        return self.kv_indices.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_indices.shape[2]

    @property
    def num_k_blocks(self) -> int:
        return self.q_indices.shape[2]

    def density(self) -> Array:
        """Visited blocks / all blocks."""
        return self.kv_counts.sum() / (self.kv_counts.size * self.num_k_blocks)

    def to_block_mask(self) -> tuple[Bool[Array, "b h nq nk"], Bool[Array, "b h nq nk"]]:
        """(visited, full) block masks, rebuilt from the lists."""
        return _lists_to_mask(self.kv_indices, self.kv_counts, self.kv_full, self.num_k_blocks)

    def trim(self) -> BlockLayout:
        """Cut the lists to the longest row (needs concrete arrays); smaller layouts and shorter TPU grids."""
        wk = max(int(np.max(self.kv_counts)), 1)
        wq = max(int(np.max(self.q_counts)), 1)
        return dataclasses.replace(
            self, kv_indices=self.kv_indices[..., :wk], q_indices=self.q_indices[..., :wq]
        )


def _lists_to_mask(indices, counts, full, width):
    slot = jnp.arange(indices.shape[-1])
    hot = jax.nn.one_hot(indices, width, dtype=jnp.int32)
    visited = (hot * (slot < counts[..., None])[..., None]).sum(-2) > 0
    is_full = (hot * (slot < full[..., None])[..., None]).sum(-2) > 0
    return visited, is_full


def _csr(visited: Array, full: Array) -> tuple[Array, Array, Array]:
    """Row lists of the True columns, full ones first, padded with the last visited column."""
    width = visited.shape[-1]
    col = jnp.arange(width, dtype=jnp.int32)
    rank = jnp.where(full, 0, jnp.where(visited, 1, 2)) * width + col
    order = jnp.argsort(rank, axis=-1).astype(jnp.int32)
    counts = visited.sum(-1).astype(jnp.int32)
    n_full = full.sum(-1).astype(jnp.int32)
    # 0 <= counts - 1 < width where clamped: in bounds
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1, mode="promise_in_bounds")
    order = jnp.where(col < jnp.maximum(counts, 1)[..., None], order, last)
    return order, counts, n_full


def layout_from_block_mask(
    block_mask: Bool[Array, "b h nq nk"] | Bool[Array, "b nq nk"],
    *,
    block_q: int,
    block_k: int,
    seq_q: int | None = None,
    seq_k: int | None = None,
    full_mask: Bool[Array, "b h nq nk"] | Bool[Array, "b nq nk"] | None = None,
) -> BlockLayout:
    """Layout from a block mask ([b, nq, nk] or with a head axis). `full_mask` marks blocks whose every token
    pair is visible (no token masking); by default every visited block is partial (always correct)."""
    if block_mask.ndim == 3:
        block_mask = block_mask[:, None]
        full_mask = None if full_mask is None else full_mask[:, None]
    if block_mask.ndim != 4:
        raise ValueError(f"block_mask must be [b, nq, nk] or [b, h, nq, nk], got shape {block_mask.shape}")
    nq, nk = block_mask.shape[-2:]
    full = jnp.zeros_like(block_mask) if full_mask is None else (full_mask & block_mask)
    kv_indices, kv_counts, kv_full = _csr(block_mask, full)
    q_indices, q_counts, q_full = _csr(block_mask.swapaxes(-1, -2), full.swapaxes(-1, -2))
    return BlockLayout(
        kv_indices,
        kv_counts,
        kv_full,
        q_indices,
        q_counts,
        q_full,
        block_q=block_q,
        block_k=block_k,
        seq_q=nq * block_q if seq_q is None else seq_q,
        seq_k=nk * block_k if seq_k is None else seq_k,
    )


def _pad_blocks(x: Array, block: int, fill) -> Array:
    pad = -x.shape[-1] % block
    if not pad:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=fill)


def layout_from_token_mask(
    mask: Bool[Array, "b q k"] | Bool[Array, "b h q k"], *, block_q: int, block_k: int
) -> BlockLayout:
    """Layout from a token mask: a block is visited if any pair is visible, full if every pair is (ragged tails
    count as invisible, so tail blocks are partial)."""
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4:
        raise ValueError(f"mask must be [b, q, k] or [b, h, q, k], got shape {mask.shape}")
    b, h, sq, sk = mask.shape
    padded = _pad_blocks(_pad_blocks(mask, block_k, False).swapaxes(-1, -2), block_q, False).swapaxes(-1, -2)
    tiles = padded.reshape(b, h, padded.shape[2] // block_q, block_q, padded.shape[3] // block_k, block_k)
    return layout_from_block_mask(
        tiles.any((3, 5)), full_mask=tiles.all((3, 5)), block_q=block_q, block_k=block_k, seq_q=sq, seq_k=sk
    )


def _block_summary(x: Array, block: int, fill, reduce) -> Array:
    x = _pad_blocks(x, block, fill)
    return reduce(x.reshape(*x.shape[:-1], x.shape[-1] // block, block), axis=-1)


def sra_layout(
    q_positions: Int[Array, "b sq"],
    k_positions: Int[Array, "b sk"] | None = None,
    *,
    block_q: int,
    block_k: int,
    causal: bool = True,
    window: int | None = None,
    num_global: int = 0,
    k_critical: Bool[Array, "b sk"] | None = None,
    q_critical: Bool[Array, "b sq"] | None = None,
    segment_ids: Int[Array, "b sq"] | None = None,
    k_segment_ids: Int[Array, "b sk"] | None = None,
) -> BlockLayout:
    """Layout straight from the SRA rule (window band + global blocks + blocks holding critical keys), from
    per-block position ranges, without building the token mask. Conservative: every block holding a visible
    pair is visited; a block is marked full only when every pair is certainly visible. Arguments mean what
    they mean in `block_sparse_attention`; `q_critical=None` with `k_critical` means every query sees critical keys."""
    k_positions = q_positions if k_positions is None else k_positions
    if k_segment_ids is None:
        k_segment_ids = segment_ids
    big = jnp.iinfo(jnp.int32).max
    qvalid = q_positions >= 0
    kvalid = k_positions >= 0
    q_lo = _block_summary(jnp.where(qvalid, q_positions, big), block_q, big, jnp.min)[:, :, None]
    q_hi = _block_summary(jnp.where(qvalid, q_positions, -1), block_q, -1, jnp.max)[:, :, None]
    k_lo = _block_summary(jnp.where(kvalid, k_positions, big), block_k, big, jnp.min)[:, None, :]
    k_hi = _block_summary(jnp.where(kvalid, k_positions, -1), block_k, -1, jnp.max)[:, None, :]
    q_all_valid = _block_summary(qvalid, block_q, False, jnp.all)[:, :, None]
    k_all_valid = _block_summary(kvalid, block_k, False, jnp.all)[:, None, :]
    any_pair = (q_hi >= 0) & (k_hi >= 0)
    all_pairs = q_all_valid & k_all_valid
    if causal:
        any_pair &= k_lo <= q_hi
        all_pairs &= k_hi <= q_lo
    if segment_ids is not None:
        qs_lo = _block_summary(segment_ids, block_q, big, jnp.min)[:, :, None]
        qs_hi = _block_summary(segment_ids, block_q, -1, jnp.max)[:, :, None]
        ks_lo = _block_summary(k_segment_ids, block_k, big, jnp.min)[:, None, :]
        ks_hi = _block_summary(k_segment_ids, block_k, -1, jnp.max)[:, None, :]
        any_pair &= (qs_lo <= ks_hi) & (ks_lo <= qs_hi)
        all_pairs &= (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
    if window is not None:
        if causal:
            near_any = q_lo - k_hi < window
            near_all = q_hi - k_lo < window
        else:
            near_any = jnp.maximum(q_lo - k_hi, k_lo - q_hi) < window
            near_all = jnp.maximum(q_hi - k_lo, k_hi - q_lo) < window
        keep_any = near_any | ((q_lo <= k_hi) & (k_lo <= q_hi))  # the diagonal token pair
        keep_all = near_all
        if num_global:
            keep_any |= k_lo < num_global
            keep_all |= k_hi < num_global
        if k_critical is not None:
            k_any = _block_summary(k_critical, block_k, False, jnp.any)[:, None, :]
            k_every = _block_summary(k_critical, block_k, False, jnp.all)[:, None, :]
            if q_critical is None:
                keep_any |= k_any
                keep_all |= k_every
            else:
                keep_any |= k_any & _block_summary(q_critical, block_q, False, jnp.any)[:, :, None]
                keep_all |= k_every & _block_summary(q_critical, block_q, False, jnp.all)[:, :, None]
        any_pair &= keep_any
        all_pairs &= keep_all
    return layout_from_block_mask(
        any_pair,
        full_mask=all_pairs & any_pair,
        block_q=block_q,
        block_k=block_k,
        seq_q=q_positions.shape[1],
        seq_k=k_positions.shape[1],
    )


def causal_block_mask(num_q_blocks: int, num_k_blocks: int) -> Bool[Array, "nq nk"]:
    """Blocks on or below the diagonal (square blocks, queries and keys aligned)."""
    return jnp.arange(num_k_blocks)[None, :] <= jnp.arange(num_q_blocks)[:, None]


def random_causal_block_mask(
    key: Array, num_blocks: int, density: float, *, batch: int = 1, heads: int = 1
) -> Bool[Array, "b h n n"]:
    """Random causal block mask keeping the diagonal, with about `density` of the causal blocks."""
    causal = causal_block_mask(num_blocks, num_blocks)
    diag = jnp.eye(num_blocks, dtype=bool)
    n_causal = num_blocks * (num_blocks + 1) // 2
    # The diagonal is always kept; draw the off-diagonal blocks so the total hits the target density.
    extra = max(density * n_causal - num_blocks, 0) / max(n_causal - num_blocks, 1)
    draw = jax.random.uniform(key, (batch, heads, num_blocks, num_blocks)) < extra
    return (draw & causal) | diag
