"""Sequence-parallel SRA: every row's positions split into contiguous chunks over one mesh axis ("sequence").

A query needs only its window (its own chunk plus a halo of the previous `window - 1` keys, sent by `ppermute`
from the shard(s) before it), the global tokens and the critical keys. The globals and critical keys that some
query sees from outside its window are assembled, with their positions, flags and segment ids, into one compact
buffer of a static `max_gathered` slots (the row's bound, e.g. alpha * N + globals), each shard writing its own
at an offset given by an all-gather of the per-shard counts, then a `psum`. A layer so moves
O(window + max_gathered) keys per device, whatever the number of shards S and however the keys are spread over
them, instead of the N keys of ring / all-gather context parallelism. `jax.grad` through it returns the gradient of
halo and gathered keys to their owners (the transposes of `ppermute` and `psum`).

Also here: the plain top-k of router scores with the sequence sharded (`sharded_topk_indices`, local top-k then a
global merge, identical to `selection.topk_mask` / `selection.gumbel_topk_indices`), its Plackett-Luce log-prob
(`sharded_topk_log_prob`, a logsumexp over the sharded axis), and decoding over a sequence-sharded KV cache
(`sharded_cache_attention`, per-shard partial softmaxes merged by log-sum-exp).

Layout contract (the same one `attention(impl="gather")` relies on): each sequence of a row occupies consecutive
slots with consecutive positions (padding is position -1 anywhere; packed segments follow each other). Then every
key within the window of a query lies within `window - 1` slots before it, so the halo is exact.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

import pallas_kernels
from pallas_kernels.block_sparse.compact import compact_block
from pallas_kernels.finite import exclude_nonfinite_keys
from sra_jax.ops.attention_pallas import pallas_attention
from sra_jax.ops.masks import SRAMaskSpec
from sra_jax.ops.selection import topk_mask

# A finite stand-in for -inf (as in `selection`): logsumexp over nothing stays finite, no NaN in values or grads.
_MASKED = -1e30

# Per-shard attention compute: "jnp" (one query block at a time, any backend), "pallas" (the block-sparse kernels
# over the shard's whole key set), "auto" (pallas on GPU / TPU, jnp elsewhere).
IMPLS = ("auto", "jnp", "pallas")


def resolve_impl(impl: str) -> str:
    """The per-shard compute that `impl` ("auto", "jnp" or "pallas") runs on the current default backend."""
    if impl not in IMPLS:
        raise ValueError(f"impl ({impl!r}) must be one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "jnp"
    return impl


def _kernel_backend(interpret: bool) -> str:
    """The block-sparse backend of the per-shard kernels: by platform, or in interpret mode (CPU tests) the Triton
    kernels (the Mosaic TPU ones on a TPU)."""
    if not interpret:
        return "auto"
    return "tpu" if jax.default_backend() == "tpu" else "triton"


def _num_shards(mesh: Mesh | AbstractMesh | None, axis: str, shards: int | None) -> int:
    if mesh is None:
        if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
            raise ValueError(f"without a mesh, shards ({shards!r}) must be an integer >= 1 (the shards to simulate)")
        return shards
    if axis not in mesh.shape:
        raise ValueError(f"axis ({axis!r}) is not an axis of the mesh (axes {tuple(mesh.shape)})")
    if shards is not None and shards != mesh.shape[axis]:
        raise ValueError(f"shards ({shards!r}) must be left out or equal the mesh's {axis!r} size ({mesh.shape[axis]})")
    if any(kind != jax.sharding.AxisType.Auto for kind in mesh.axis_types):
        raise ValueError(f"mesh axis types {mesh.axis_types} must all be AxisType.Auto (as "
                         "sra_jax.train.sharding.make_mesh makes them); the inputs are resharded by the compiler")
    return mesh.shape[axis]


def _check_batch_axis(mesh: Mesh | AbstractMesh | None, batch_axis: str | tuple[str, ...] | None, axis: str) -> None:
    """batch_axis: None, a mesh axis other than `axis`, or a tuple of such axes (the batch split over all of them)."""
    names = (batch_axis,) if isinstance(batch_axis, str) else batch_axis
    if batch_axis is not None and (mesh is None or not isinstance(names, tuple) or not names
                                   or any(name not in mesh.shape or name == axis for name in names)):
        raise ValueError(f"batch_axis ({batch_axis!r}) must be None or a mesh axis other than {axis!r}")


def _over_shards(body, args: tuple, sharded: tuple[bool, ...], out_sharded: bool, *, mesh, shards: int, axis: str,
                 batch_axis: str | tuple[str, ...] | None, check_vma: bool = True, finish=None):
    """`body` on every shard; `sharded[i]` says whether args[i] is split along axis 1 (else replicated). With a mesh:
    `jax.shard_map`. With mesh=None: `jax.vmap` over `shards` simulated shards on one device (the collectives act
    across the mapped axis), to time or test the sharded program where only one device exists.
    `finish` (collective-free, row-wise; sharded output): `finish(*body(...))` per shard. Without a mesh it runs once
    outside the vmap on the shards folded into the batch (`[S * b, ...]`), so a Pallas kernel there is not batched
    by vmap and sees the same shapes as on a device."""
    if mesh is not None:
        rows, replicated = PartitionSpec(batch_axis, axis), PartitionSpec(batch_axis)
        in_specs = tuple(None if x is None else rows if split else replicated for x, split in zip(args, sharded))
        run = body if finish is None else (lambda *a: finish(*body(*a)))
        # a pallas_call's outputs carry no varying-axes type, which shard_map's check would demand
        check_vma = check_vma and finish is None
        return jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=rows if out_sharded else replicated,
                             check_vma=check_vma)(*args)

    def split(x):  # [b, n, ...] -> [shards, b, n / shards, ...]
        return jnp.moveaxis(x.reshape(x.shape[0], shards, -1, *x.shape[2:]), 1, 0)

    in_axes = tuple(0 if x is not None and cut else None for x, cut in zip(args, sharded))
    args = tuple(split(x) if axes == 0 else x for x, axes in zip(args, in_axes))
    out = jax.vmap(body, in_axes=in_axes, axis_name=axis, axis_size=shards)(*args)
    if finish is not None:  # [S, b, ...] -> [S * b, ...], finish, -> [S, b, ...]
        fold = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)
        out = finish(*fold)
        out = out.reshape(shards, -1, *out.shape[1:])
    if not out_sharded:
        return out[0]
    return jnp.moveaxis(out, 0, 1).reshape(out.shape[1], -1, *out.shape[3:])


def _chunk(length: int, shards: int, name: str) -> int:
    if length % shards:
        raise ValueError(f"{name} length ({length}) must be divisible by the {shards} shards of the sequence axis")
    return length // shards


# ------------------------------------------------------------------------------------------------------------------
# Prefill / training: SRA self-attention with the sequence sharded.


def _neighbours(x: Array, count: int, chunk: int, shards: int, axis: str, fill, cyclic: bool, ahead: bool) -> Array:
    """The `count` slots just before this shard's chunk (axis 1), or with `ahead` just after it, gathered from the
    `ceil(count / chunk)` neighbouring shards by one `ppermute` each, each sending only the slots its receiver
    needs; `fill` where there is no shard. `cyclic`: the edge shards also send around the ring (copies discarded),
    since `vmap` needs a full permutation; across devices only the useful messages are sent."""
    index = jax.lax.axis_index(axis)
    pieces = []
    for shift in range(1, min(-(-count // chunk), shards - 1) + 1):
        need = min(chunk, count - (shift - 1) * chunk)
        if ahead:  # shard i + shift sends its first `need` slots to shard i
            pairs = [((i + shift) % shards, i) for i in range(shards if cyclic else shards - shift)]
            sent = jax.lax.ppermute(x[:, :need], axis, pairs)
            pieces.append(jnp.where(index + shift < shards, sent, jnp.asarray(fill, x.dtype)))
        else:  # shard i sends its last `need` slots to shard i + shift
            pairs = [(i, (i + shift) % shards) for i in range(shards if cyclic else shards - shift)]
            sent = jax.lax.ppermute(x[:, chunk - need :], axis, pairs)
            pieces.insert(0, jnp.where(index >= shift, sent, jnp.asarray(fill, x.dtype)))
    missing = count - sum(piece.shape[1] for piece in pieces)  # the slots lie beyond the first / last shard
    if missing:
        pad = jnp.full((x.shape[0], missing, *x.shape[2:]), fill, x.dtype)
        pieces = [*pieces, pad] if ahead else [pad, *pieces]
    return jnp.concatenate(pieces, axis=1)


def _gather_far(wanted: Bool[Array, "b c"], size: int, axis: str, shards: int, k: Array, v: Array,
                meta: Int[Array, "b c m"]) -> tuple[Array, Array, Array, Bool[Array, "b c"]]:
    """(k, v, meta) of the first `size` wanted slots of the whole row in slot order, on every shard, unused slots
    at zero (k, v) and meta at -1; and which of this shard's slots are among them (`kept`). An all-gather of the S
    per-shard counts gives each shard its offset into a compact buffer of `size` slots; each shard fills its own
    slots of a zero buffer and a `psum` assembles it: ~2 * size slots received per device whatever S and however
    the wanted keys are spread (one shard may own them all). Its transpose, in the backward pass, is a psum of the
    buffer's cotangent, which each owner gathers back. When that would move more than all-gathering every slot
    (2 * size >= the row length), every slot is all-gathered instead (meta -1 where not kept)."""
    chunk = wanted.shape[1]
    counts = jax.lax.all_gather(jnp.sum(wanted, axis=1, dtype=jnp.int32), axis, axis=1)  # [b, S]
    offset = jnp.sum(jnp.where(jnp.arange(shards) < jax.lax.axis_index(axis), counts, 0), axis=1)  # [b]
    kept = wanted & (offset[:, None] + jnp.cumsum(wanted, axis=1) <= size)
    if 2 * size >= shards * chunk:
        meta = jnp.where(kept[..., None], meta, -1)
        return (*(jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v, meta)), kept)
    local = min(chunk, size)
    slots = jax.vmap(lambda row: jnp.nonzero(row, size=local, fill_value=0)[0])(wanted)  # [b, local]
    rank = jnp.arange(size) - offset[:, None]  # [b, size]: this shard's rank of each buffer slot
    mine = (rank >= 0) & (rank < jnp.minimum(jnp.sum(wanted, axis=1), local)[:, None])
    source = jnp.take_along_axis(slots, jnp.clip(rank, 0, local - 1), axis=1)  # [b, size] slots of this chunk

    def place(x, fill):
        taken = jax.vmap(lambda row, idx: row[idx])(x, source)
        return jnp.where(mine.reshape(*mine.shape, *(1,) * (x.ndim - 2)), taken, jnp.asarray(fill, x.dtype))

    k, v, meta = jax.lax.psum((place(k, 0), place(v, 0), place(meta + 1, 0)), axis)
    return k, v, meta - 1, kept


class _SoftmaxParts(NamedTuple):
    """A softmax over one set of keys, kept unnormalised so that sets can be merged by log-sum-exp:
    weighted values sum_j e^(l_j - top) v_j `[..., q, hkv, g, d]`, and `top` / `total` `[..., q, hkv, g, 1]`."""

    weighted: Array
    top: Array
    total: Array


def _softmax_parts(q: Array, k: Array, v: Array, visible: Array, sm_scale: float) -> _SoftmaxParts:
    """q `[B, sq, hq, d]` over k, v `[B, sk, hkv, d]` where `visible` `[B, sq, sk]`; float32, grouped query heads."""
    batch, sq, hq, d = q.shape
    hkv = k.shape[2]
    grouped = q.reshape(batch, sq, hkv, hq // hkv, d)
    logits = jnp.einsum("bqhgd,bkhd->bqhgk", grouped, k, preferred_element_type=jnp.float32) * sm_scale
    visible = visible[:, :, None, None, :]
    logits = jnp.where(visible, logits, _MASKED)
    # the shift carries no gradient: any common shift gives the same softmax
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.where(visible, jnp.exp(logits - top), 0.0)
    weighted = jnp.einsum("bqhgk,bkhd->bqhgd", weights, v.astype(jnp.float32))
    return _SoftmaxParts(weighted, top, jnp.sum(weights, axis=-1, keepdims=True))


def _rescaled(parts: _SoftmaxParts, top: Array) -> tuple[Array, Array]:
    scale = jnp.exp(parts.top - top)
    return parts.weighted * scale, parts.total * scale


def _normalise(weighted: Array, total: Array, dtype) -> Array:
    """Weighted values / total, 0 for a query that sees nothing (padding): `[..., q, hkv, g, d]` -> `[..., q, hq, d]`
    in `dtype`."""
    out = weighted / jnp.where(total > 0, total, 1.0)
    return out.reshape(*out.shape[:-3], -1, out.shape[-1]).astype(dtype)


def _band_blocks(x: Array, block: int, halo: int) -> Array:
    """`[b, halo + c, ...]` -> `[b, c / block, block + halo, ...]`: the keys each block of `block` queries can see
    by the window rule (its own slots and the `halo` before them)."""
    blocks = (x.shape[1] - halo) // block
    return x[:, jnp.arange(blocks)[:, None] * block + jnp.arange(block + halo)]


class _ShardKeys(NamedTuple):
    """One shard's keys: the window band ([halo | own chunk], `window - 1 + c` slots) and the gathered far keys
    (`max_gathered` slots), each as (k, v, positions, critical, segment ids); `far_slots`: the far keys' slots in
    the row (None unless asked for)."""

    band: tuple[Array, ...]
    far: tuple[Array, ...]
    far_slots: Array | None


def _shard_keys(k, v, positions, critical, segment_ids, *, window, num_global, max_gathered, shards, axis, cyclic,
                far_slots=False) -> _ShardKeys:
    """The halo (`ppermute` from the previous shard(s)) and the compact gather of the far keys: the valid critical
    or global keys that some query sees from outside the window, i.e. whose sequence goes on for at least `window`
    more positions (under the layout contract: slot i + window holds position p + window); the positions of the
    `window` slots after the chunk come from the next shard(s). A band key that had to be gathered but did not fit
    in `max_gathered` loses its critical flag (no query sees it from beyond the window, as with the jnp rule)."""
    b, chunk = positions.shape
    halo = window - 1
    near_of = partial(_neighbours, chunk=chunk, shards=shards, axis=axis, cyclic=cyclic)
    later = jnp.concatenate([positions, near_of(positions, window, fill=-1, ahead=True)], axis=1)[:, window:]
    wanted = (positions >= 0) & (critical | (positions < num_global)) & (later == positions + window)
    columns = [positions, critical.astype(positions.dtype), segment_ids]
    if far_slots:
        slots = jax.lax.axis_index(axis) * chunk + jnp.arange(chunk, dtype=positions.dtype)
        columns.append(jnp.broadcast_to(slots, positions.shape))
    k_far, v_far, meta, kept = _gather_far(wanted, max_gathered, axis, shards, k, v, jnp.stack(columns, axis=-1))
    critical = critical & ~(wanted & ~kept)
    band = tuple(jnp.concatenate([near_of(x, halo, fill=fill, ahead=False), x], axis=1) if halo else x
                 for x, fill in ((k, 0), (v, 0), (positions, -1), (critical, False), (segment_ids, 0)))
    far = (k_far, v_far, meta[..., 0], meta[..., 1] > 0, meta[..., 2])
    return _ShardKeys(band, far, meta[..., 3] if far_slots else None)


def _sra_shard(q, k, v, positions, critical, segment_ids, *, window, num_global, queries, max_gathered, shards,
               axis, sm_scale, block_q, cyclic):
    """One shard's queries, `block_q` at a time, against [halo | own chunk] under the window rule (a block reads
    `block_q + window - 1` keys) and against the gathered globals / critical keys (`_shard_keys`) under the global
    or critical rule outside the window: disjoint key sets whose union is the SRA-visible set, merged by
    log-sum-exp. Scores exist for one block at a time: O(block_q * (block_q + window + max_gathered)) per head."""
    b, chunk = positions.shape
    has_segments = segment_ids is not None
    if not has_segments:
        segment_ids = jnp.zeros_like(positions)
    halo = window - 1
    keys = _shard_keys(k, v, positions, critical, segment_ids, window=window, num_global=num_global,
                       max_gathered=max_gathered, shards=shards, axis=axis, cyclic=cyclic)
    band, (k_far, v_far, *far_keys) = keys.band, keys.far

    def rule(q_pos, q_crit, q_seg, k_pos, k_crit, k_seg, in_window):
        spec = SRAMaskSpec.create(
            q_pos, q_crit, window=window, num_global=num_global, queries=queries,
            segment_ids=q_seg if has_segments else None, k_positions=k_pos, k_critical=k_crit,
            k_segment_ids=k_seg if has_segments else None)
        near = q_pos[:, :, None] - k_pos[:, None, :] < window
        return spec.to_mask() & (near if in_window else ~near)

    def by_block(x):  # [b, c, ...] -> [c / block_q, b, block_q, ...]
        return jnp.moveaxis(x.reshape(b, -1, block_q, *x.shape[2:]), 1, 0)

    query_blocks = [by_block(x) for x in (q, positions, critical, segment_ids)]
    band_blocks = [jnp.moveaxis(_band_blocks(x, block_q, halo), 1, 0) for x in band]

    @jax.checkpoint  # the backward pass recomputes one block's scores rather than keeping every block's
    def attend(blocks):
        (q_block, *query_keys), (k_block, v_block, *band_keys) = blocks
        near = _softmax_parts(q_block, k_block, v_block, rule(*query_keys, *band_keys, True), sm_scale)
        far = _softmax_parts(q_block, k_far, v_far, rule(*query_keys, *far_keys, False), sm_scale)
        top = jnp.maximum(near.top, far.top)
        (near_weighted, near_total), (far_weighted, far_total) = _rescaled(near, top), _rescaled(far, top)
        return _normalise(near_weighted + far_weighted, near_total + far_total, q.dtype)

    out = jax.lax.map(attend, (query_blocks, band_blocks))  # [c / block_q, b, block_q, hq, d]
    return jnp.moveaxis(out, 0, 1).reshape(q.shape)


def _sra_shard_key_set(q, k, v, positions, critical, segment_ids, *, window, num_global, max_gathered, shards,
                       axis, cyclic):
    """One shard's queries and its whole key set for the kernel: [halo | own chunk | gathered far keys] with their
    positions, critical flags and segment ids. Under the full SRA rule this set shows every query exactly its
    SRA-visible keys: a far key whose slot lies in the band range (`window - 1` slots before the chunk up to its
    end) is already there (its position is set to -1 in the far part), and every other far key lies at least
    `window` slots before each query of the chunk (so only the global / critical rule can show it) or after it."""
    chunk = positions.shape[1]
    has_segments = segment_ids is not None
    keys = _shard_keys(k, v, positions, critical, segment_ids if has_segments else jnp.zeros_like(positions),
                       window=window, num_global=num_global, max_gathered=max_gathered, shards=shards, axis=axis,
                       cyclic=cyclic, far_slots=True)
    start = jax.lax.axis_index(axis) * chunk
    in_band = (keys.far_slots >= start - (window - 1)) & (keys.far_slots < start + chunk)
    k_far, v_far, far_positions, far_critical, far_segments = keys.far
    far = (k_far, v_far, jnp.where(in_band, -1, far_positions), far_critical, far_segments)
    k_all, v_all, k_positions, k_critical, k_segments = (jnp.concatenate(pair, axis=1) for pair in zip(keys.band, far))
    return (q, positions, critical, segment_ids, k_all, v_all, k_positions, k_critical,
            k_segments if has_segments else None)


def _sra_shard_kernel(q, positions, critical, segment_ids, k, v, k_positions, k_critical, k_segment_ids, *, window,
                      num_global, queries, max_critical, compact, sm_scale, interpret):
    """The shard's queries over its key set (`_sra_shard_key_set`) through the block-sparse kernels
    (`attention_pallas.pallas_attention(spec=...)`). Without `max_critical`: the plain SRA layout, which visits the
    band blocks near each query block and the blocks holding its visible global / critical keys, and skips the rest.
    With it (the row's bound on critical keys, which also bounds the key set's and the chunk's, since both hold
    distinct keys of the row): the compact kernels where `pallas_kernels.compact_is_cheaper` says so (band, globals,
    and critical queries x critical keys; otherwise every query block visits every block of gathered keys when
    queries == "critical"), else the plain layout; `compact` True / False forces one (as in `pallas_attention`)."""
    bound = None if max_critical is None else min(max_critical, k.shape[1])
    spec = SRAMaskSpec.create(positions, critical, window=window, num_global=num_global, queries=queries,
                              segment_ids=segment_ids, k_positions=k_positions, k_critical=k_critical,
                              k_segment_ids=k_segment_ids, max_critical=bound)
    return pallas_attention(q, k, v, spec=spec, sm_scale=sm_scale, compact=False if bound is None else compact,
                            backend=_kernel_backend(interpret), interpret=interpret)


def _default_block_q(chunk: int, window: int) -> int:
    """The smallest divisor of the chunk that is at least max(window - 1, 128) (the chunk if none): each block then
    reads at most twice its own keys."""
    target = min(chunk, max(window - 1, 128))
    return next(size for size in range(target, chunk + 1) if chunk % size == 0)


def sra_attention_sequence_parallel(
    q: Float[Array, "b n hq d"],
    k: Float[Array, "b n hkv d"],
    v: Float[Array, "b n hkv d"],
    positions: Int[Array, "b n"],
    critical: Bool[Array, "b n"],
    segment_ids: Int[Array, "b n"] | None = None,
    *,
    window: int,
    num_global: int,
    queries: str = "critical",
    mesh: Mesh | AbstractMesh | None = None,
    shards: int | None = None,
    axis: str = "sequence",
    batch_axis: str | tuple[str, ...] | None = None,
    max_gathered: int | None = None,
    sm_scale: float | None = None,
    block_q: int | None = None,
    impl: str = "auto",
    interpret: bool = False,
    max_critical: int | None = None,
    compact: bool | None = None,
) -> Float[Array, "b n hq d"]:
    """SRA self-attention (the rule of `sra_jax.ops.masks`) with the sequence split over mesh axis `axis`.

    Equals `attention(q, k, v, spec=SRAMaskSpec.create(positions, critical, ...), impl="reference")` under the
    layout contract (module docstring) when no row holds more than `max_gathered` keys that must be gathered
    (`gathered_per_row`: valid, critical or global, seen from outside the window); beyond that a row keeps its
    first `max_gathered` in slot order, as `impl="gather"` does with `max_critical`. Default: the row length (always
    exact). The gathered keys travel in a compact buffer of `max_gathered` slots (`_gather_far`), whatever the
    number of shards and however the keys are spread over them. `batch_axis` (a mesh axis, or a tuple of them)
    optionally shards the batch too. `block_q` (a divisor of the chunk; default `_default_block_q`) sets how many
    queries share one window block of the jnp path, which bounds the band's memory.

    impl: the per-shard compute (`resolve_impl`): "jnp" (one query block at a time), "pallas" (the block-sparse
    kernels over the shard's key set [halo | chunk | gathered keys], empty blocks skipped; `interpret=True` runs
    them in interpret mode, for CPU tests), "auto" (pallas on GPU / TPU, jnp elsewhere). The collectives are the
    same. Beyond the bound the pallas path drops the same critical keys, but a global key that did not fit stays
    visible to the queries whose band (`window - 1` slots before their chunk, and the chunk) holds it.
    `max_critical` (pallas only): a bound on each row's critical keys (`SRAMaskSpec.max_critical`), which lets each
    shard take the compact kernels (critical queries x critical keys) where they are cheaper; a row with more gives
    NaN rows, as `impl="pallas"` does unsharded. `compact` (pallas, with `max_critical`): True / False forces the
    compact / the plain kernels per shard; None picks the cheaper (`pallas_kernels.compact_is_cheaper`).
    """
    shards = _num_shards(mesh, axis, shards)
    _check_batch_axis(mesh, batch_axis, axis)
    SRAMaskSpec.create(positions, critical, window=window, num_global=num_global, queries=queries,
                       segment_ids=segment_ids)  # validates window, num_global, queries and the shapes
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q [b, n, hq, d] and k, v [b, n, hkv, d] must share b and n, got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if positions.shape != q.shape[:2]:
        raise ValueError(f"positions shape {positions.shape} must be (batch, length) = {q.shape[:2]}")
    n = q.shape[1]
    chunk = _chunk(n, shards, "sequence")
    if max_gathered is None:
        max_gathered = n
    if not isinstance(max_gathered, int) or isinstance(max_gathered, bool) or not 1 <= max_gathered <= n:
        raise ValueError(f"max_gathered ({max_gathered!r}) must be an integer in [1, row length {n}]")
    block_q = _default_block_q(chunk, window) if block_q is None else block_q
    if not isinstance(block_q, int) or isinstance(block_q, bool) or block_q < 1 or chunk % block_q:
        raise ValueError(f"block_q ({block_q!r}) must be a positive divisor of the chunk length ({chunk})")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]})")
    if max_critical is not None and (not isinstance(max_critical, int) or isinstance(max_critical, bool)
                                     or max_critical < 0):
        raise ValueError(f"max_critical ({max_critical!r}) must be None or an integer >= 0")
    if compact and max_critical is None:
        raise ValueError("compact=True needs max_critical (the bound on each row's critical keys)")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _sra_sequence_parallel(q, k, v, positions, critical, segment_ids, window=window, num_global=num_global,
                                  queries=queries, mesh=mesh, shards=shards, axis=axis, batch_axis=batch_axis,
                                  max_gathered=max_gathered, sm_scale=sm_scale, block_q=block_q,
                                  impl=resolve_impl(impl), interpret=bool(interpret), max_critical=max_critical,
                                  compact=compact)


@partial(jax.jit, static_argnames=("window", "num_global", "queries", "mesh", "shards", "axis", "batch_axis",
                                   "max_gathered", "sm_scale", "block_q", "impl", "interpret", "max_critical",
                                   "compact"))
def _sra_sequence_parallel(q, k, v, positions, critical, segment_ids, *, window, num_global, queries, mesh, shards,
                           axis, batch_axis, max_gathered, sm_scale, block_q, impl="jnp", interpret=False,
                           max_critical=None, compact=None):
    args = (q, k, v, positions, critical, segment_ids)
    placement = dict(mesh=mesh, shards=shards, axis=axis, batch_axis=batch_axis)
    if impl == "pallas":
        body = partial(_sra_shard_key_set, window=window, num_global=num_global, max_gathered=max_gathered,
                       shards=shards, axis=axis, cyclic=mesh is None)
        finish = partial(_sra_shard_kernel, window=window, num_global=num_global, queries=queries,
                         max_critical=max_critical, compact=compact, sm_scale=sm_scale, interpret=interpret)
        return _over_shards(body, args, (True,) * 6, True, finish=finish, **placement)
    body = partial(_sra_shard, window=window, num_global=num_global, queries=queries, max_gathered=max_gathered,
                   shards=shards, axis=axis, sm_scale=sm_scale, block_q=block_q, cyclic=mesh is None)
    return _over_shards(body, args, (True,) * 6, True, **placement)


def gathered_per_row(
    positions: Int[Array, "b n"], critical: Bool[Array, "b n"], *, window: int, num_global: int
) -> Int[Array, " b"]:
    """How many keys each row must gather (valid, critical or global, and seen by a query of their sequence from
    outside the window: slot i + window holds position p + window): the smallest exact `max_gathered` is the
    maximum of this; a smaller bound drops keys. Meant for checks and statistics, outside the hot path."""
    later = jnp.pad(positions[:, window:], ((0, 0), (0, min(window, positions.shape[1]))), constant_values=-1)
    wanted = (positions >= 0) & (critical | (positions < num_global)) & (later == positions + window)
    return jnp.sum(wanted, axis=1, dtype=jnp.int32)


def gather_bound(spec: SRAMaskSpec, length: int) -> int:
    """A static `max_gathered` that is exact for `spec` over `length` keys: its critical bound plus the globals of
    every sequence longer than the window (one sequence in an unpacked row; at most length // (window + 1) packed
    sequences are longer); the row length without a critical bound."""
    if spec.max_critical is None:
        return length
    sequences = length // (spec.window + 1)
    if spec.q_segment_ids is None:
        sequences = min(1, sequences)
    return max(1, min(length, spec.max_critical + spec.num_global * sequences))


# ------------------------------------------------------------------------------------------------------------------
# Router selection with the sequence sharded.


def _local_topk(scores, valid, size, axis):
    """This shard's `size` best (score, global index) pairs, invalid scores at -inf, as `jax.lax.top_k` ranks them."""
    chunk = scores.shape[-1]
    values, local = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), min(size, chunk))
    return values, local + jax.lax.axis_index(axis) * chunk


def _merged_topk(scores, valid, k_rows, *, size, axis):
    """Local top-k, all-gather of the candidates in shard order, global top-k: ties go to the lower global index,
    since candidates sit in (shard, local rank) order and both `top_k`s prefer the earlier entry."""
    values, indices = _local_topk(scores, valid, size, axis)
    values = jax.lax.all_gather(values, axis, axis=1, tiled=True)
    indices = jax.lax.all_gather(indices, axis, axis=1, tiled=True)
    _, best = jax.lax.top_k(values, size)
    indices = jnp.take_along_axis(indices, best, axis=-1)
    if k_rows is not None:
        indices = jnp.where(jnp.arange(size) < k_rows[:, None], indices, -1)
    return indices


def sharded_topk_indices(
    scores: Float[Array, "b n"],
    k: int | Int[Array, " b"],
    *,
    valid: Bool[Array, "b n"] | None = None,
    k_max: int | None = None,
    mesh: Mesh | AbstractMesh | None = None,
    shards: int | None = None,
    axis: str = "sequence",
    batch_axis: str | tuple[str, ...] | None = None,
) -> Int[Array, "b _"]:
    """The k best valid scores' indices in descending order, with the last axis sharded over `axis`: equal to
    `selection.gumbel_topk_indices` for perturbed scores (and so to `selection.topk_mask` through
    `sharded_topk_mask`), per-row k (-1 after a row's count) and ties included. Replicated over `axis`."""
    shards = _num_shards(mesh, axis, shards)
    _check_batch_axis(mesh, batch_axis, axis)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [batch, length], got shape {scores.shape}")
    _chunk(scores.shape[1], shards, "scores")
    # `topk_mask`'s own checks of k, k_max and valid (traced abstractly: no compute)
    counts = None if isinstance(k, int) else k
    jax.eval_shape(lambda x, valid, counts: topk_mask(x, k if counts is None else counts, valid=valid, k_max=k_max),
                   scores, valid, counts)
    valid = jnp.ones(scores.shape, bool) if valid is None else valid
    if isinstance(k, int):
        size, k_rows = k, None
    else:
        size = scores.shape[1] if k_max is None else k_max
        k_rows = jnp.clip(k, 0, size).astype(jnp.int32)
    return _sharded_topk(scores, valid, k_rows, size=size, mesh=mesh, shards=shards, axis=axis,
                         batch_axis=batch_axis)


@partial(jax.jit, static_argnames=("size", "mesh", "shards", "axis", "batch_axis"))
def _sharded_topk(scores, valid, k_rows, *, size, mesh, shards, axis, batch_axis):
    body = partial(_merged_topk, size=size, axis=axis)
    # the merged indices are the same on every shard of `axis` (all-gathered inputs), which check_vma cannot see
    return _over_shards(body, (scores, valid, k_rows), (True, True, False), False, mesh=mesh, shards=shards,
                        axis=axis, batch_axis=batch_axis, check_vma=False)


def sharded_topk_mask(
    indices: Int[Array, "b k"], n: int, *, valid: Bool[Array, "b n"] | None = None
) -> Bool[Array, "b n"]:
    """k-hot mask of `sharded_topk_indices` (-1 ignored) among valid positions: `selection.topk_mask`'s value."""
    mask = jnp.any((indices[:, :, None] == jnp.arange(n)) & (indices[:, :, None] >= 0), axis=1)
    return mask if valid is None else mask & valid


def _log_prob_shard(logits, valid, indices, counts, *, axis):
    chunk = logits.shape[-1]
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    local = indices - jax.lax.axis_index(axis) * chunk
    here = (indices >= 0) & (local >= 0) & (local < chunk)
    safe = jnp.clip(local, 0, chunk - 1)
    # each drawn index lives on one shard: a psum of the owner's value (zeros elsewhere) replicates it
    drawn_logit = jax.lax.psum(jnp.where(here, jnp.take_along_axis(logits, safe, axis=-1), 0.0), axis)
    drawn_ok = jax.lax.psum((here & jnp.take_along_axis(valid, safe, axis=-1)).astype(jnp.int32), axis) > 0
    drawn_ok &= jnp.arange(indices.shape[-1]) < counts[:, None]
    drawn = jnp.where(drawn_ok, drawn_logit, _MASKED)
    taken = jnp.any((local[:, :, None] == jnp.arange(chunk)) & (here & drawn_ok)[:, :, None], axis=1)
    never_drawn = valid & ~taken
    # logsumexp over the sharded axis: a shared max shift (no gradient), then a psum of the shifted exp-sums
    shift = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(jnp.where(never_drawn, logits, _MASKED), axis=-1)), axis)
    # the shift replaces excluded logits before exp, so no exp overflows (an inf there would make a NaN gradient)
    shifted = jnp.where(never_drawn, logits, shift[:, None]) - shift[:, None]
    total = jax.lax.psum(jnp.sum(jnp.where(never_drawn, jnp.exp(shifted), 0.0), axis=-1), axis)
    rest = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + shift, _MASKED)
    remaining = jnp.logaddexp(rest[:, None], jax.lax.cumlogsumexp(drawn, axis=1, reverse=True))
    return jnp.sum(jnp.where(drawn_ok, drawn - remaining, 0.0), axis=-1)


def sharded_topk_log_prob(
    logits: Float[Array, "b n"],
    indices: Int[Array, "b k"],
    *,
    valid: Bool[Array, "b n"] | None = None,
    k: int | Int[Array, " b"] | None = None,
    mesh: Mesh | AbstractMesh | None = None,
    shards: int | None = None,
    axis: str = "sequence",
    batch_axis: str | tuple[str, ...] | None = None,
) -> Float[Array, " b"]:
    """`selection.topk_log_prob` (Plackett-Luce log-prob of the ordered draw `indices`, global indices, -1 ignored,
    first k per row) with the logits sharded over `axis`; differentiable in the logits."""
    shards = _num_shards(mesh, axis, shards)
    _check_batch_axis(mesh, batch_axis, axis)
    if logits.ndim != 2 or indices.ndim != 2 or indices.shape[0] != logits.shape[0]:
        raise ValueError(f"logits [b, n] and indices [b, k] must share b, got {logits.shape}, {indices.shape}")
    _chunk(logits.shape[1], shards, "logits")
    valid = jnp.ones(logits.shape, bool) if valid is None else valid
    if valid.shape != logits.shape:
        raise ValueError(f"valid shape {valid.shape} must equal logits shape {logits.shape}")
    counts = jnp.broadcast_to(jnp.asarray(indices.shape[1] if k is None else k, jnp.int32), logits.shape[:1])
    return _sharded_log_prob(logits, valid, indices, counts, mesh=mesh, shards=shards, axis=axis,
                             batch_axis=batch_axis)


@partial(jax.jit, static_argnames=("mesh", "shards", "axis", "batch_axis"))
def _sharded_log_prob(logits, valid, indices, counts, *, mesh, shards, axis, batch_axis):
    args, sharded = (logits, valid, indices, counts), (True, True, False, False)
    return _over_shards(partial(_log_prob_shard, axis=axis), args, sharded, False, mesh=mesh, shards=shards, axis=axis,
                        batch_axis=batch_axis)


# ------------------------------------------------------------------------------------------------------------------
# Decoding with a sequence-sharded KV cache.


def _cache_shard(q, k, v, q_positions, q_critical, k_positions, k_critical, *, window, num_global, queries, axis,
                 sm_scale):
    """This shard's slots as an unnormalised softmax, merged across shards by log-sum-exp (a pmax, two psums)."""
    spec = SRAMaskSpec.create(q_positions, q_critical, window=window, num_global=num_global, queries=queries,
                              k_positions=k_positions, k_critical=k_critical)
    parts = _softmax_parts(q, k, v, spec.to_mask(), sm_scale)
    weighted, total = _rescaled(parts, jax.lax.pmax(parts.top, axis))
    return _normalise(jax.lax.psum(weighted, axis), jax.lax.psum(total, axis), q.dtype)


def sharded_cache_attention(
    q: Float[Array, "b sq hq d"],
    k_cache: Float[Array, "b t hkv d"],
    v_cache: Float[Array, "b t hkv d"],
    q_positions: Int[Array, "b sq"],
    q_critical: Bool[Array, "b sq"],
    k_positions: Int[Array, "b t"],
    k_critical: Bool[Array, "b t"],
    *,
    window: int,
    num_global: int,
    queries: str = "critical",
    mesh: Mesh | AbstractMesh | None = None,
    shards: int | None = None,
    axis: str = "sequence",
    batch_axis: str | tuple[str, ...] | None = None,
    sm_scale: float | None = None,
) -> Float[Array, "b sq hq d"]:
    """Decode-step SRA attention of replicated queries over a KV cache whose slots are sharded over `axis`: each
    shard attends to its slots and the partial softmaxes are merged by log-sum-exp (a pmax and two psums of
    `[b, sq, hq, d]`-sized partials). Equals `attention(q, k_cache, v_cache, spec=SRAMaskSpec.create(q_positions,
    q_critical, k_positions=..., k_critical=..., ...), impl="reference")`; slots may be filled in any order."""
    shards = _num_shards(mesh, axis, shards)
    _check_batch_axis(mesh, batch_axis, axis)
    SRAMaskSpec.create(q_positions, q_critical, window=window, num_global=num_global, queries=queries,
                       k_positions=k_positions, k_critical=k_critical)
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != k_positions.shape or q.shape[:2] != q_positions.shape:
        raise ValueError(f"caches {k_cache.shape} / {v_cache.shape} must match k_positions {k_positions.shape} and "
                         f"q {q.shape} must match q_positions {q_positions.shape}")
    if q.shape[2] % k_cache.shape[2]:
        raise ValueError(f"kv heads ({k_cache.shape[2]}) must divide query heads ({q.shape[2]})")
    _chunk(k_cache.shape[1], shards, "cache")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _sharded_cache(q, k_cache, v_cache, q_positions, q_critical, k_positions, k_critical, window=window,
                          num_global=num_global, queries=queries, mesh=mesh, shards=shards, axis=axis,
                          batch_axis=batch_axis, sm_scale=sm_scale)


@partial(jax.jit, static_argnames=("window", "num_global", "queries", "mesh", "shards", "axis", "batch_axis",
                                   "sm_scale"))
def _sharded_cache(q, k, v, q_positions, q_critical, k_positions, k_critical, *, window, num_global, queries, mesh,
                   shards, axis, batch_axis, sm_scale):
    body = partial(_cache_shard, window=window, num_global=num_global, queries=queries, axis=axis, sm_scale=sm_scale)
    args = (q, k, v, q_positions, q_critical, k_positions, k_critical)
    sharded = (False, True, True, False, False, True, True)
    return _over_shards(body, args, sharded, False, mesh=mesh, shards=shards, axis=axis, batch_axis=batch_axis)


# ------------------------------------------------------------------------------------------------------------------
# Dense (causal) layers with the sequence sharded: all-gather context parallelism.


def _dense_shard(q, k, v, positions, segment_ids, *, axis, sm_scale, block_q):
    """This shard's queries, `block_q` at a time, against every key of the row (all-gathered over `axis`) under the
    causal-by-position rule within each segment (`SRAMaskSpec.dense_mask`)."""
    b = positions.shape[0]
    has_segments = segment_ids is not None
    k_all, v_all, k_positions = (jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v, positions))
    k_segments = jax.lax.all_gather(segment_ids, axis, axis=1, tiled=True) if has_segments else None
    if not has_segments:
        segment_ids = jnp.zeros_like(positions)

    def by_block(x):  # [b, c, ...] -> [c / block_q, b, block_q, ...]
        return jnp.moveaxis(x.reshape(b, -1, block_q, *x.shape[2:]), 1, 0)

    @jax.checkpoint  # the backward pass recomputes one block's scores rather than keeping every block's
    def attend(blocks):
        q_block, q_positions, q_segments = blocks
        spec = SRAMaskSpec.create(
            q_positions, jnp.zeros(q_positions.shape, bool), window=1, num_global=0,
            segment_ids=q_segments if has_segments else None, k_positions=k_positions,
            k_critical=jnp.zeros(k_positions.shape, bool), k_segment_ids=k_segments)
        parts = _softmax_parts(q_block, k_all, v_all, spec.dense_mask(), sm_scale)
        return _normalise(parts.weighted, parts.total, q.dtype)

    out = jax.lax.map(attend, tuple(by_block(x) for x in (q, positions, segment_ids)))
    return jnp.moveaxis(out, 0, 1).reshape(q.shape)


def _dense_shard_key_set(q, k, v, positions, segment_ids, *, axis):
    """One shard's queries and the whole row's keys (all-gathered over `axis`) with positions and segment ids."""
    gathered = [jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v, positions)]
    k_segments = None if segment_ids is None else jax.lax.all_gather(segment_ids, axis, axis=1, tiled=True)
    return (q, positions, segment_ids, *gathered, k_segments)


def _dense_shard_kernel(q, positions, segment_ids, k, v, k_positions, k_segment_ids, *, sm_scale, interpret):
    """Causal-by-position attention within segments through the block-sparse kernels: the causal blocks (and,
    packed, those whose segment ranges meet) of `pallas_kernels.sra_layout`, the rule evaluated per token inside."""
    block_q, block_k = (compact_block(x.shape[1]) for x in (q, k))
    layout = pallas_kernels.sra_layout(positions, k_positions, block_q=block_q, block_k=block_k,
                                       segment_ids=segment_ids, k_segment_ids=k_segment_ids)
    return pallas_kernels.block_sparse_attention(
        q, k, v, layout, q_positions=positions, k_positions=k_positions, segment_ids=segment_ids,
        k_segment_ids=k_segment_ids, sm_scale=sm_scale, backend=_kernel_backend(interpret), interpret=interpret)


def dense_attention_sequence_parallel(
    q: Float[Array, "b n hq d"],
    k: Float[Array, "b n hkv d"],
    v: Float[Array, "b n hkv d"],
    positions: Int[Array, "b n"],
    segment_ids: Int[Array, "b n"] | None = None,
    *,
    mesh: Mesh | AbstractMesh | None = None,
    shards: int | None = None,
    axis: str = "sequence",
    batch_axis: str | tuple[str, ...] | None = None,
    sm_scale: float | None = None,
    block_q: int | None = None,
    impl: str = "auto",
    interpret: bool = False,
) -> Float[Array, "b n hq d"]:
    """Causal self-attention by position (within segments; padding at position -1 sees and is seen by nothing) with
    the sequence split over mesh axis `axis`: all-gather context parallelism, each shard's queries against the
    whole row's keys (N keys moved per device, what a dense layer needs). Equals `attention(q, k, v,
    spec=SRAMaskSpec.create(...).dense_mask() as mask, impl="reference")`. `block_q` (a divisor of the chunk,
    default `_default_block_q(chunk, 1)`) bounds the jnp path's score block to `[block_q, n]` per head. `impl` /
    `interpret` as in `sra_attention_sequence_parallel` (pallas: the causal block layout over the gathered row)."""
    shards = _num_shards(mesh, axis, shards)
    _check_batch_axis(mesh, batch_axis, axis)
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q [b, n, hq, d] and k, v [b, n, hkv, d] must share b and n, got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if positions.shape != q.shape[:2] or (segment_ids is not None and segment_ids.shape != positions.shape):
        raise ValueError(f"positions {positions.shape} and segment_ids "
                         f"{None if segment_ids is None else segment_ids.shape} must be (batch, length) = {q.shape[:2]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]})")
    chunk = _chunk(q.shape[1], shards, "sequence")
    block_q = _default_block_q(chunk, 1) if block_q is None else block_q
    if not isinstance(block_q, int) or isinstance(block_q, bool) or block_q < 1 or chunk % block_q:
        raise ValueError(f"block_q ({block_q!r}) must be a positive divisor of the chunk length ({chunk})")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _dense_sequence_parallel(q, k, v, positions, segment_ids, mesh=mesh, shards=shards, axis=axis,
                                    batch_axis=batch_axis, sm_scale=sm_scale, block_q=block_q,
                                    impl=resolve_impl(impl), interpret=bool(interpret))


@partial(jax.jit, static_argnames=("mesh", "shards", "axis", "batch_axis", "sm_scale", "block_q", "impl",
                                   "interpret"))
def _dense_sequence_parallel(q, k, v, positions, segment_ids, *, mesh, shards, axis, batch_axis, sm_scale, block_q,
                             impl="jnp", interpret=False):
    args = (q, k, v, positions, segment_ids)
    placement = dict(mesh=mesh, shards=shards, axis=axis, batch_axis=batch_axis)
    if impl == "pallas":
        finish = partial(_dense_shard_kernel, sm_scale=sm_scale, interpret=interpret)
        return _over_shards(partial(_dense_shard_key_set, axis=axis), args, (True,) * 5, True, finish=finish,
                            **placement)
    body = partial(_dense_shard, axis=axis, sm_scale=sm_scale, block_q=block_q)
    return _over_shards(body, args, (True,) * 5, True, **placement)


# ------------------------------------------------------------------------------------------------------------------
# Model-level wiring: a trace-time context that routes `ops.attention.attention(spec=...)` and the router's top-k
# through the functions above, so a model runs sequence-sharded without being told.


class SequenceSharding(NamedTuple):
    """The active context: the mesh (None: `shards` simulated on one device under vmap), its sequence axis, the
    number of shards, the mesh axes the batch is split over, and the per-shard compute of self-attention (`impl`:
    None follows each attention call's impl, see `spec_attention`; `interpret`: kernels in interpret mode)."""

    mesh: Mesh | None
    axis: str
    shards: int
    batch_axes: tuple[str, ...]
    impl: str | None = None
    interpret: bool = False

    def per_shard(self, attention_impl: str) -> str:
        """The per-shard compute for an `ops.attention.attention(impl=attention_impl)` call: the context's `impl`
        when set, else "auto" (kernels on GPU / TPU) for impl="pallas" and "jnp" for every other impl."""
        if self.impl is not None:
            return self.impl
        return "auto" if attention_impl == "pallas" else "jnp"

    def batch_axis(self, batch: int) -> tuple[str, ...] | None:
        """The batch axes of size > 1 when they divide `batch` (the shard_map then splits rows too), else None."""
        if self.mesh is None:
            return None
        axes = tuple(name for name in self.batch_axes if self.mesh.shape[name] > 1)
        if not axes or batch % math.prod(self.mesh.shape[name] for name in axes):
            return None
        return axes

    def placement(self, batch: int) -> dict:
        """The keyword arguments (mesh, shards, axis, batch_axis) of this module's sharded functions."""
        return dict(mesh=self.mesh, shards=self.shards, axis=self.axis, batch_axis=self.batch_axis(batch))


_ACTIVE: contextvars.ContextVar[SequenceSharding | None] = contextvars.ContextVar("sequence_sharding", default=None)


@contextlib.contextmanager
def sequence_sharding(
    mesh: Mesh | None, *, axis: str = "sequence", batch_axes: tuple[str, ...] = (), shards: int | None = None,
    impl: str | None = None, interpret: bool = False,
) -> Iterator[SequenceSharding | None]:
    """While a model is traced inside this context, self-attention through `ops.attention.attention(spec=...)`
    runs sequence-parallel over mesh axis `axis` (SRA layers: `sra_attention_sequence_parallel`; dense layers:
    `dense_attention_sequence_parallel`), attention over a KV cache runs `sharded_cache_attention`, and the
    router's top-k and Plackett-Luce log-prob run `sharded_topk_indices` / `sharded_topk_log_prob`. Without a
    mesh (and without `shards`), or when the mesh has no `axis` or it has size 1, nothing changes (the context is
    cleared). Lengths that the shards do not divide (e.g. a single decoded token's router scores) keep the
    unsharded path. `batch_axes`: mesh axes the batch is split over (used by the shard_maps when they divide the
    batch). `mesh=None, shards=S > 1`: S shards simulated on one device (vmap; the collectives act across the
    mapped axis), to time the sharded program where one device exists. Enter it where the model is traced (the
    context is not part of any jit cache key: a function jitted inside it must not be called with the same
    arguments outside it, or the reverse). `impl` ("auto", "jnp", "pallas"; None: follow each attention call's
    impl) and `interpret` choose the per-shard compute of self-attention (`sra_attention_sequence_parallel`)."""
    if impl is not None:
        resolve_impl(impl)  # names a bad value here
    if mesh is None:
        count = 1 if shards is None else _num_shards(None, axis, shards)
        active = SequenceSharding(None, axis, count, (), impl, bool(interpret)) if count > 1 else None
    elif axis not in mesh.shape or mesh.shape[axis] == 1:
        active = None
    else:
        count = _num_shards(mesh, axis, shards)  # axis types, shards == the axis size
        batch_axes = tuple(batch_axes)
        if batch_axes:
            _check_batch_axis(mesh, batch_axes, axis)
        active = SequenceSharding(mesh, axis, count, batch_axes, impl, bool(interpret))
    token = _ACTIVE.set(active)
    try:
        yield active
    finally:
        _ACTIVE.reset(token)


def active_sequence_sharding() -> SequenceSharding | None:
    """The innermost `sequence_sharding` context's settings (None outside one, or when it shards nothing)."""
    return _ACTIVE.get()


def _is_dense(spec: SRAMaskSpec, num_keys: int) -> bool:
    """A spec that reduces to causal attention: no globals, no critical keys, a window spanning every key."""
    return spec.num_global == 0 and spec.max_critical == 0 and spec.window >= num_keys


def spec_attention(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    spec: SRAMaskSpec,
    *,
    sm_scale: float | None = None,
    impl: str = "reference",
) -> Float[Array, "b sq hq d"] | None:
    """`attention(q, k, v, spec=spec, impl=impl)` sequence-parallel under the active `sequence_sharding` context, or
    None when there is none or the lengths do not divide into its shards (the caller then runs its unsharded path).

    Self-attention (`spec.keys_are_queries`): a dense spec (`_is_dense`) runs all-gather context parallelism; an SRA
    spec the halo + gathered-critical path with `max_gathered = gather_bound(spec, n)` (exact).
    Keys of a KV cache (not the queries): `sharded_cache_attention` over the cache's slots, the queries replicated.
    The per-shard compute of self-attention is `active.per_shard(impl)`: the block-sparse kernels for
    impl="pallas" on GPU / TPU (or as the context says), the jnp code otherwise; decode over a cache stays jnp.
    A key or value that is not finite reaches only the rows that can see it (`pallas_kernels.finite`), as on the
    unsharded paths of `ops.attention.attention`.
    """
    active = active_sequence_sharding()
    if active is None:
        return None
    shards = active.shards
    common = dict(**active.placement(q.shape[0]), sm_scale=sm_scale)
    if not spec.keys_are_queries:
        if spec.q_segment_ids is not None or k.shape[1] % shards:
            return None
        attend = partial(sharded_cache_attention, q_positions=spec.q_positions, q_critical=spec.q_critical,
                         k_positions=spec.k_positions, k_critical=spec.k_critical, window=spec.window,
                         num_global=spec.num_global, queries=spec.queries, **common)
    elif q.shape[1] % shards:
        return None
    elif _is_dense(spec, q.shape[1]):
        attend = partial(dense_attention_sequence_parallel, positions=spec.q_positions,
                         segment_ids=spec.q_segment_ids, impl=active.per_shard(impl), interpret=active.interpret,
                         **common)
    else:
        attend = partial(sra_attention_sequence_parallel, positions=spec.q_positions, critical=spec.q_critical,
                         segment_ids=spec.q_segment_ids, window=spec.window, num_global=spec.num_global,
                         queries=spec.queries, max_gathered=gather_bound(spec, q.shape[1]),
                         max_critical=spec.max_critical, impl=active.per_shard(impl), interpret=active.interpret,
                         **common)
    # as on every other path: a non-finite key reaches exactly the rows that can see it (pallas_kernels.finite)
    return exclude_nonfinite_keys(attend, q, k, v, lambda start, size: spec.query_rows(start, size).to_mask())
