"""Masked multi-head attention with grouped kv heads, behind one entry point: `attention(q, k, v, ..., impl=...)`.

q `[b, sq, hq, d]`, k / v `[b, sk, hkv, d]` with hkv dividing hq (GQA); output `[b, sq, hq, d]` in q's dtype.
Softmax runs in float32. A query row with no visible key (padding) returns exactly 0 with zero gradient. A
non-finite key or value reaches only the rows that can see it (`pallas_kernels.finite`), on every impl.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Shaped

from pallas_kernels.finite import VisibleRows, exclude_nonfinite_keys
from sra_jax.ops import sequence_parallel
from sra_jax.ops.masks import SRAMaskSpec

IMPLS = ("reference", "gather", "xla", "cudnn", "pallas")

# Finite fill for masked logits (as in flash-attention kernels): exp underflows to 0, never inf - inf = NaN.
_MASKED = -0.7 * float(np.finfo(np.float32).max)
# Most [b, q-chunk, k] mask elements a spec's mask-based attention builds at once (2^28: 1 GiB as int32; the whole
# mask of a 128k prefill would be 2^34).
_MASK_CHUNK_ELEMENTS = 1 << 28


def _validate(q: Array, k: Array, v: Array, mask: Array | None, spec: SRAMaskSpec | None, impl: str) -> None:
    """Every user mistake gets its own message before anything is traced."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k shape {k.shape} must equal v shape {v.shape}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    (b, sq, hq, d), (bk, sk, hkv, dk) = q.shape, k.shape
    if b != bk:
        raise ValueError(f"q batch ({b}) must equal k/v batch ({bk})")
    if d != dk:
        raise ValueError(f"q head_dim ({d}) must equal k/v head_dim ({dk})")
    if hq % hkv:
        raise ValueError(f"kv heads ({hkv}) must divide query heads ({hq})")
    if mask is not None and spec is not None:
        raise ValueError("give at most one of mask and spec")
    if mask is not None:
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be boolean, got dtype {mask.dtype}")
        allowed = [(b, sq, sk), (b, 1, sq, sk), (b, hq, sq, sk)]
        if mask.shape not in allowed:
            raise ValueError(f"mask shape {mask.shape} must be one of {allowed} (b, [heads,] sq, sk)")
    if spec is not None and spec.shape != (b, sq, sk):
        raise ValueError(f"spec describes (batch, queries, keys) = {spec.shape}, but q/k give {(b, sq, sk)}")
    if impl == "gather" and spec is None:
        raise ValueError("impl='gather' needs spec= (an SRAMaskSpec); it never builds the [q, k] mask")


def _causal_by_index(b: int, sq: int, sk: int) -> Bool[Array, "b sq sk"]:
    """Query i sits at key index i + sk - sq (the last query sees every key, as when decoding with a cache)."""
    return jnp.broadcast_to(jnp.asarray(np.tril(np.ones((sq, sk), bool), sk - sq)), (b, sq, sk))


def _masked_softmax(logits: Float[Array, "*x n"], visible: Bool[Array, "*#x n"]) -> Float[Array, "*x n"]:
    """Softmax over visible entries; a row with nothing visible gives all zeros (and zero gradient)."""
    logits = jnp.where(visible, logits, _MASKED)
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.where(visible, jnp.exp(shifted), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def _group(q: Array, hkv: int) -> Array:
    b, sq, hq, d = q.shape
    return q.reshape(b, sq, hkv, hq // hkv, d)


@partial(jax.jit, static_argnames=("sm_scale",))
def _reference(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    mask: Bool[Array, "b sq sk"] | Bool[Array, "b _h sq sk"],
    sm_scale: float,
) -> Float[Array, "b sq hq d"]:
    """Dense masked attention; the grouped query layout [b, sq, hkv, g, d] avoids repeating k/v per group."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", _group(q, hkv), k, preferred_element_type=jnp.float32) * sm_scale
    if mask.ndim == 3:
        mask = mask[:, None, None]
    else:
        mask = jnp.broadcast_to(mask, (b, hq, *mask.shape[2:])).reshape(b, hkv, hq // hkv, *mask.shape[2:])
    weights = _masked_softmax(logits, mask)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v.astype(jnp.float32))
    return out.reshape(b, sq, hq, d).astype(q.dtype)


def _gather_key_slots(spec: SRAMaskSpec, num_keys: int) -> tuple[Int[Array, "b sq c"], Bool[Array, "b sq c"]]:
    """For each query, the key slots that can be visible to it under the SRA rule, each at most once.

    Candidates: the `window` slots ending at the query's own key, the `num_global` slots holding positions
    0..num_global-1 of its sequence, and every critical key slot (at most `spec.max_critical`). This relies on
    each sequence occupying consecutive key slots with consecutive positions (self-attention, padding, packing,
    a KV cache filled in order). The SRA rule is then re-evaluated on every candidate, restricted to the set
    that found it (window, else global, else critical), so no pair is counted twice or admitted wrongly.
    """
    q_pos, k_pos = spec.q_positions, spec.k_positions
    b = q_pos.shape[0]
    if spec.keys_are_queries:
        own_slot = jnp.broadcast_to(jnp.arange(q_pos.shape[1]), q_pos.shape)
    else:
        # One sequence per row: slot of position p is p + (first valid slot - its position).
        first = jnp.argmax(k_pos >= 0, axis=1)
        offset = first - jnp.take_along_axis(k_pos, first[:, None], axis=1)[:, 0]
        own_slot = q_pos + offset[:, None]
    window_slots = own_slot[..., None] - jnp.arange(spec.window)
    global_slots = (own_slot - q_pos)[..., None] + jnp.arange(spec.num_global)
    max_critical = num_keys if spec.max_critical is None else min(spec.max_critical, num_keys)
    critical_slots = jax.vmap(lambda c: jnp.nonzero(c, size=max_critical, fill_value=num_keys)[0])(spec.k_critical)
    critical_slots = jnp.broadcast_to(critical_slots[:, None, :], (b, q_pos.shape[1], max_critical))
    slots = jnp.concatenate([window_slots, global_slots, critical_slots], axis=-1)
    in_range = (slots >= 0) & (slots < num_keys)
    slots = jnp.clip(slots, 0, num_keys - 1)

    def at_slots(per_key: Array) -> Array:
        return jax.vmap(lambda row, idx: row[idx])(per_key, slots)

    kj, qi = at_slots(k_pos), q_pos[..., None]
    visible = in_range & (kj >= 0) & (kj <= qi)
    if spec.q_segment_ids is not None:
        visible &= at_slots(spec.k_segment_ids) == spec.q_segment_ids[..., None]
    in_window = qi - kj < spec.window
    is_global = (kj < spec.num_global) & ~in_window
    is_critical = at_slots(spec.k_critical) & (spec.q_critical[..., None] | (spec.queries == "all"))
    is_critical &= ~in_window & (kj >= spec.num_global)
    which = np.repeat(np.arange(3), [spec.window, spec.num_global, max_critical])
    allowed = jnp.where(which == 0, in_window, jnp.where(which == 1, is_global, is_critical))
    return slots, visible & allowed


def _check_gather_bound(spec: SRAMaskSpec) -> None:
    """Eager (concrete flags): a row with more critical keys than spec.max_critical is a ValueError. Under jit the
    count is not known at trace time; `_gather` then returns NaN for that row instead of dropping keys."""
    if spec.max_critical is None:
        return
    try:
        most = int(jnp.max(jnp.sum(spec.k_critical, axis=1)))
    except (jax.errors.TracerIntegerConversionError, jax.errors.ConcretizationTypeError):
        return
    if most > spec.max_critical:
        raise ValueError(
            f"impl='gather': a row has {most} critical keys, more than spec.max_critical={spec.max_critical} "
            "(raise max_critical, or leave it None to bound by the number of keys)"
        )


@partial(jax.jit, static_argnames=("sm_scale",))
def _gather(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    spec: SRAMaskSpec,
    sm_scale: float,
) -> Float[Array, "b sq hq d"]:
    """Sparse reference: gathers O(window + num_global + max_critical) keys per query, never a [q, k] array.
    A row with more critical keys than spec.max_critical returns NaN (it would otherwise drop keys silently)."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    slots, visible = _gather_key_slots(spec, k.shape[1])
    take = jax.vmap(lambda x, idx: x[idx])  # [sk, h, d], [sq, c] -> [sq, c, h, d]
    k_near, v_near = take(k, slots), take(v, slots)
    logits = jnp.einsum("bqhgd,bqchd->bhgqc", _group(q, hkv), k_near, preferred_element_type=jnp.float32) * sm_scale
    weights = _masked_softmax(logits, visible[:, None, None])
    out = jnp.einsum("bhgqc,bqchd->bqhgd", weights, v_near.astype(jnp.float32)).reshape(b, sq, hq, d)
    if spec.max_critical is not None:
        overflow = jnp.sum(spec.k_critical, axis=1) > spec.max_critical
        out = jnp.where(overflow[:, None, None, None], jnp.nan, out)
    return out.astype(q.dtype)


def _check_cudnn_backend(implementation: str) -> None:
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"impl='cudnn' needs a CUDA GPU, but JAX's default backend is {jax.default_backend()!r}")


@partial(jax.jit, static_argnames=("sm_scale", "implementation"))
def _dot_product_attention(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    mask: Bool[Array, "b sq sk"] | Bool[Array, "b _h sq sk"],
    sm_scale: float,
    implementation: str,
) -> Float[Array, "b sq hq d"]:
    """jax.nn.dot_product_attention, with empty rows zeroed (it would average over masked keys there)."""
    _check_cudnn_backend(implementation)
    if mask.ndim == 3:
        mask = mask[:, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale, implementation=implementation)
    has_key = jnp.any(mask, axis=-1).transpose(0, 2, 1)[..., None]  # [b, sq, h or 1, 1]
    return jnp.where(has_key, out, 0).astype(q.dtype)


def attention(
    q: Float[Array, "..."],
    k: Float[Array, "..."],
    v: Float[Array, "..."],
    *,
    mask: Shaped[Array, "..."] | None = None,
    spec: SRAMaskSpec | None = None,
    sm_scale: float | None = None,
    impl: str = "reference",
) -> Float[Array, "..."]:
    """Attention of q `[b, sq, hq, d]` over k, v `[b, sk, hkv, d]` under `mask` (`[b, sq, sk]` or
    `[b, hq, sq, sk]`) or `spec` (an SRAMaskSpec), or causal by index when neither is given.

    impl: "reference" dense masked; "gather" sparse (needs spec); "xla" / "cudnn" jax.nn.dot_product_attention;
    "pallas" the block-sparse kernels in `sra_jax.ops.attention_pallas`. All agree where they apply.
    Inside `sequence_parallel.sequence_sharding(mesh)` a `spec` runs sequence-parallel over the mesh's sequence
    axis whatever the impl (`sequence_parallel.spec_attention`: collectives, and per shard the block-sparse
    kernels for impl="pallas" on GPU / TPU, jnp otherwise).
    (Annotations are loose on purpose: shapes are checked here, with messages that name the problem.)
    """
    _validate(q, k, v, mask, spec, impl)
    d = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if spec is not None:
        sharded = sequence_parallel.spec_attention(q, k, v, spec, sm_scale=sm_scale, impl=impl)
        if sharded is not None:
            return sharded
    if impl == "pallas":
        try:
            from sra_jax.ops.attention_pallas import pallas_attention
        except ImportError as error:
            raise ImportError(
                "impl='pallas' needs sra_jax/ops/attention_pallas.py (the block-sparse kernels), which could not be "
                f"imported: {error}"
            ) from error
        given = {"spec": spec} if spec is not None else {"mask": mask} if mask is not None else {}
        return pallas_attention(q, k, v, sm_scale=sm_scale, **given)
    if impl == "gather":
        _check_gather_bound(spec)
    attend = partial(_dense_or_gather, mask=mask, spec=spec, sm_scale=sm_scale, impl=impl)
    if impl == "gather":
        return exclude_nonfinite_keys(attend, q, k, v, sees=partial(_gather_sees, spec, hq=q.shape[2]))
    return exclude_nonfinite_keys(attend, q, k, v, _visible_rows(q.shape[1], k.shape[1], mask=mask, spec=spec))


def _gather_sees(spec: SRAMaskSpec, flagged: Bool[Array, "b sk hkv"], *, hq: int) -> Bool[Array, "b sq hq"]:
    """The rows (and query heads) that see a flagged key under impl="gather": its own key slots, never a [q, k]
    array."""
    hkv = flagged.shape[2]
    slots, visible = _gather_key_slots(spec, flagged.shape[1])
    at_slots = jax.vmap(lambda row, idx: row[idx])(flagged, slots)  # [b, sq, c, hkv]
    return jnp.repeat(jnp.any(visible[..., None] & at_slots, axis=2), hq // hkv, axis=-1)


def _visible_rows(sq: int, sk: int, *, mask: Array | None = None, spec: SRAMaskSpec | None = None) -> VisibleRows:
    """The visibility of `attention`'s arguments a block of query rows at a time, for
    `pallas_kernels.finite.exclude_nonfinite_keys`: the mask's rows, the spec's rows, or causal by index."""
    if mask is not None:
        return lambda start, size: jax.lax.dynamic_slice_in_dim(mask, start, size, axis=-2)
    if spec is not None:
        return lambda start, size: spec.query_rows(start, size).to_mask()
    return lambda start, size: ((start + jnp.arange(size) + (sk - sq))[:, None] >= jnp.arange(sk))[None]


def _dense_or_gather(q, k, v, *, mask, spec, sm_scale, impl):
    """Every impl but "pallas", on keys and values that are all finite (see `exclude_nonfinite_keys`)."""
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    if impl == "gather":
        return _gather(q, k, v, spec, sm_scale)
    if impl != "reference" and mask is None:
        # Dense causal self-attention goes to the fused causal kernel with sequence lengths (no [q, k] mask or bias
        # to read): always when no mask or spec is given, and for a dense spec when its positions are 0..n-1
        # followed by padding (checked at run time; otherwise the mask path; one branch runs).
        if spec is None and sq == sk:
            causal = jnp.broadcast_to(jnp.arange(sq, dtype=jnp.int32), (b, sq))
            return _causal_prefix(q, k, v, causal, sm_scale, impl)
        if spec is not None and _may_be_prefix_causal(spec):
            return jax.lax.cond(
                _is_prefix_causal(spec),
                lambda: _causal_prefix(q, k, v, spec.q_positions, sm_scale, impl),
                lambda: _spec_mask_attention(q, k, v, spec, sm_scale, impl),
            )
        if spec is not None:
            return _spec_mask_attention(q, k, v, spec, sm_scale, impl)
    if mask is None:
        mask = spec.to_mask() if spec is not None else _causal_by_index(b, sq, sk)
    if impl == "reference":
        return _reference(q, k, v, mask, sm_scale)
    return _dot_product_attention(q, k, v, mask, sm_scale, impl)


def _spec_mask_attention(q, k, v, spec: SRAMaskSpec, sm_scale: float, impl: str):
    """`_dot_product_attention` under `spec.to_mask()`, built and attended a block of queries at a time (`lax.map`)
    when the whole [b, q, k] mask would exceed `_MASK_CHUNK_ELEMENTS`: rows are independent, so the result is the
    same and the mask never exists at full size (also in a conditional's untaken branch, whose buffers XLA
    allocates)."""
    b, sq, sk = spec.shape
    chunk = _query_chunk(b, sq, sk)
    if chunk == sq:
        return _dot_product_attention(q, k, v, spec.to_mask(), sm_scale, impl)
    n = sq // chunk

    def one(part):
        q_part, start = part
        return _dot_product_attention(q_part, k, v, spec.query_rows(start, chunk).to_mask(), sm_scale, impl)

    q_parts = jnp.moveaxis(q.reshape(b, n, chunk, *q.shape[2:]), 1, 0)
    return jnp.moveaxis(jax.lax.map(one, (q_parts, jnp.arange(n) * chunk)), 0, 1).reshape(q.shape)


def _query_chunk(b: int, sq: int, sk: int) -> int:
    """sq when the whole mask fits `_MASK_CHUNK_ELEMENTS`, else the largest divisor of sq that does (at least 1)."""
    if b * sq * sk <= _MASK_CHUNK_ELEMENTS:
        return sq
    most = max(1, _MASK_CHUNK_ELEMENTS // (b * sk))
    return next(c for c in range(min(most, sq), 0, -1) if sq % c == 0)


def _may_be_prefix_causal(spec: SRAMaskSpec) -> bool:
    """Static part: no segments, at least as many key slots as queries, and a window that covers every pair (so
    critical and global keys add nothing and the rule is plain causal by position). Keys are the queries
    (self-attention) or a cache whose first slots the queries were just written to (prefill)."""
    _, sq, sk = spec.shape
    return (
        spec.q_segment_ids is None
        and spec.k_segment_ids is None
        and sq <= sk
        and spec.window >= sk
    )


def _is_prefix_causal(spec: SRAMaskSpec) -> Bool[Array, ""]:
    """Runtime part: every valid query position equals its index, the valid queries of each row form a prefix,
    and key slot j holds query j's position (keys beyond the queries are empty), e.g. a prefill from slot 0."""
    positions = spec.q_positions
    valid = positions >= 0
    in_order = jnp.all(jnp.where(valid, positions == jnp.arange(positions.shape[1]), True))
    ok = in_order & jnp.all(valid[:, 1:] <= valid[:, :-1])
    if spec.keys_are_queries:
        return ok
    sq = positions.shape[1]
    same = jnp.all(spec.k_positions[:, :sq] == positions) & jnp.all(spec.k_positions[:, sq:] < 0)
    return ok & same


@partial(jax.jit, static_argnames=("sm_scale", "implementation"))
def _causal_prefix(
    q: Float[Array, "b s hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    positions: Int[Array, "b s"],
    sm_scale: float,
    implementation: str,
) -> Float[Array, "b s hq d"]:
    """Causal attention over the first `lengths` tokens of each row; padding rows return 0 (zero gradient).
    With more key slots than queries (a cache), query i sees slots j <= i (top-left causal, as jax's xla and
    cuDNN paths both align it) within the row's length."""
    _check_cudnn_backend(implementation)
    valid = positions >= 0
    lengths = valid.sum(-1, dtype=jnp.int32)
    # A row of padding only gets length 1 so the kernel sees a key; its output is zeroed below.
    out = jax.nn.dot_product_attention(
        q, k, v, scale=sm_scale, is_causal=True, key_value_seq_lengths=jnp.maximum(lengths, 1),
        implementation=implementation,
    )
    return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)


def attention_flops(
    visible: Bool[Array, "*b q k"] | Float[Array, "*b"] | int | float, *, num_heads: int, head_dim: int
) -> Float[Array, "*b"]:
    """Forward attention FLOPs: 4 * head_dim per visible (query, key) pair and head (2 for q.k, 2 for p.v).

    `visible` is a mask (pairs are counted over its last two axes) or a number of visible pairs. Relative to
    dense, this is just the mask density; the absolute number lets a report add the router's FLOPs.
    """
    if isinstance(visible, jax.Array) and visible.dtype == jnp.bool_:
        visible = jnp.sum(visible, axis=(-2, -1), dtype=jnp.float32)
    return jnp.asarray(visible, jnp.float32) * (4.0 * head_dim * num_heads)
