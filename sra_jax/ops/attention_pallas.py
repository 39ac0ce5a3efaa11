"""`attention(..., impl="pallas")`: SRA specs and masks translated into the block-sparse Pallas kernels.

A `SRAMaskSpec` takes the compact path when it is cheaper (critical tokens gathered, see
`pallas_kernels.sra_compact_attention`; the bound is `max_critical`, or the counted critical tokens rounded up to
a bucket when the spec has none); otherwise it becomes a block layout built straight
from the SRA rule (window band + global blocks + blocks holding critical keys) plus the same rule evaluated per
token inside the visited blocks. Both are exact.
The kernels evaluate rules, not arbitrary tables: a bare boolean `mask` runs the dense reference instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

import pallas_kernels
from sra_jax.ops.masks import SRAMaskSpec


def _block(length: int, block: int) -> int:
    """The kernel block, shrunk (to a power of two >= 16) for short sequences so they are not padded to 128."""
    return min(block, max(16, 1 << max(length - 1, 1).bit_length()))


def pallas_attention(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    *,
    spec: SRAMaskSpec | None = None,
    mask: Bool[Array, "b sq sk"] | Bool[Array, "b hq sq sk"] | None = None,
    sm_scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    backend: str = "auto",
    interpret: bool = False,
    compact: bool | None = None,
) -> Float[Array, "b sq hq d"]:
    """Exactly one of `spec` (an `sra_jax.ops.masks.SRAMaskSpec`) or `mask`, or neither (causal by index, the
    queries being the last sq keys). backend as in `pallas_kernels.block_sparse_attention` ("auto": on sm_90+ the
    Mosaic GPU forward and backward, Triton on other GPUs, Mosaic on TPU, the dense reference elsewhere).
    compact: gather the critical tokens into a compact K/V buffer (`pallas_kernels.sra_compact_attention`: band
    kernel + K x K critical kernel, merged by log-sum-exp) instead of one block-sparse layout (True needs
    spec.max_critical; False: the plain layout). None (default) picks the cheaper path by
    `pallas_kernels.compact_is_cheaper` (compact when its estimated kernel blocks are at most half the plain
    layout's worst case, which is what scattered critical tokens cost), with the bound being spec.max_critical
    when set; otherwise the critical tokens are counted and rounded up to the first of
    `pallas_kernels.compact_bounds` (eager: that path only; under jit: a `lax.switch` over the bounds and the
    plain layout, each compiled, the branch read at run time), so the default never pays the plain layout's
    worst case where the compact path is cheaper (docs/kernels.md lists which case takes which path)."""
    if spec is not None and mask is not None:
        raise ValueError("give spec or mask, not both")
    sq, sk = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    if mask is not None:
        return pallas_kernels.reference.masked_attention(
            q, k, v, mask if mask.ndim == 4 else mask[:, None], scale
        )
    bq, bk = _block(sq, block_q), _block(sk, block_k)
    if spec is None:
        b = q.shape[0]
        q_positions = jnp.broadcast_to(jnp.arange(sk - sq, sk, dtype=jnp.int32), (b, sq))
        k_positions = jnp.broadcast_to(jnp.arange(sk, dtype=jnp.int32), (b, sk))
        layout = pallas_kernels.sra_layout(q_positions, k_positions, block_q=bq, block_k=bk)
        return pallas_kernels.block_sparse_attention(
            q,
            k,
            v,
            layout,
            q_positions=q_positions,
            k_positions=k_positions,
            sm_scale=scale,
            backend=backend,
            interpret=interpret,
        )
    # Under a trace (the spec's arrays are tracers, e.g. inside a jitted model) the spec path is a nested jit: the
    # layers of a model then share one traced and lowered program (kernels included) instead of one per layer.
    # Eager calls keep the plain function, whose concrete counts raise ValueErrors on an overflowing bound.
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(spec))
    if traced:  # layouts, bands and counts from positions at run time, not constant-folded per call (per layer)
        spec = spec.at_run_time()
    shared = functools.partial(_shared_spec_attention, platform=jax.default_backend())
    run = functools.partial(
        shared if traced else _spec_attention, q, k, v, spec, scale=scale, block_q=block_q, bq=bq, bk=bk, backend=backend,
        interpret=interpret,
    )
    if compact is False:
        return run(None)
    if spec.max_critical is not None:
        cheaper = pallas_kernels.compact_is_cheaper(
            sq, sk, window=spec.window, num_global=spec.num_global, max_critical=spec.max_critical,
            queries=spec.queries, block=block_q,
        )
        return run(spec.max_critical if cheaper or compact else None)
    if compact:
        raise ValueError("compact=True needs spec.max_critical (the static bound on critical tokens)")
    bounds = pallas_kernels.compact_bounds(
        sq, sk, window=spec.window, num_global=spec.num_global, queries=spec.queries, block=block_q
    )
    if not bounds:
        return run(None)
    need = jnp.max(
        pallas_kernels.critical_counts(
            spec.q_positions, spec.k_positions, spec.q_critical, spec.k_critical, num_global=spec.num_global,
            queries=spec.queries,
        )
    )
    branch = jnp.searchsorted(jnp.asarray(bounds), need)  # len(bounds): above every bound, the plain layout
    try:
        chosen = int(branch)  # concrete flags (an eager call): run that branch only
    except (jax.errors.TracerIntegerConversionError, jax.errors.ConcretizationTypeError):  # traced (under jit)
        return jax.lax.switch(branch, [functools.partial(run, bound) for bound in bounds] + [lambda: run(None)])
    return run(bounds[chosen] if chosen < len(bounds) else None)


@functools.partial(
    jax.jit, static_argnames=("max_critical", "scale", "block_q", "bq", "bk", "backend", "interpret", "platform")
)
def _shared_spec_attention(q, k, v, spec, max_critical, *, scale, block_q, bq, bk, backend, interpret, platform=None):
    """`_spec_attention` as one jitted program per static setting, shared by every call with the same shapes.
    `platform` only keys the cache: backend="auto" resolves by `jax.default_backend()` while tracing."""
    del platform
    return _spec_attention(q, k, v, spec, max_critical, scale=scale, block_q=block_q, bq=bq, bk=bk, backend=backend,
                           interpret=interpret)


def _spec_attention(q, k, v, spec, max_critical, *, scale, block_q, bq, bk, backend, interpret):
    """The compact path with static bound `max_critical`, or the plain SRA layout when it is None."""
    if max_critical is not None:
        return pallas_kernels.sra_compact_attention(
            q,
            k,
            v,
            q_positions=spec.q_positions,
            k_positions=spec.k_positions,
            q_critical=spec.q_critical,
            k_critical=spec.k_critical,
            window=spec.window,
            num_global=spec.num_global,
            queries=spec.queries,
            max_critical=max_critical,
            segment_ids=spec.q_segment_ids,
            k_segment_ids=spec.k_segment_ids,
            sm_scale=scale,
            backend=backend,
            block=block_q,
            interpret=interpret,
        )
    rule = kernel_rule(spec)
    q_critical = spec.q_critical if rule.has_q_critical else None
    layout = pallas_kernels.sra_layout(
        spec.q_positions, spec.k_positions, block_q=bq, block_k=bk, causal=rule.causal, window=rule.window,
        num_global=rule.num_global, k_critical=spec.k_critical, q_critical=q_critical, segment_ids=spec.q_segment_ids,
        k_segment_ids=spec.k_segment_ids,
    )
    return pallas_kernels.block_sparse_attention(
        q, k, v, layout, causal=rule.causal, window=rule.window, num_global=rule.num_global,
        q_positions=spec.q_positions, k_positions=spec.k_positions, segment_ids=spec.q_segment_ids,
        k_segment_ids=spec.k_segment_ids, q_critical=q_critical, k_critical=spec.k_critical, sm_scale=scale,
        backend=backend, interpret=interpret,
    )


def kernel_rule(spec: SRAMaskSpec) -> pallas_kernels.MaskRule:
    """The kernels' static rule for `spec`: its `SRARule` (window, num_global, queries) and which per-token inputs
    it carries (segments; critical keys always; critical queries when only they see distant critical keys). The
    block-sparse kernels evaluate exactly this rule on the spec's positions, flags and segments."""
    rule = spec.rule
    return pallas_kernels.MaskRule(
        causal=True,
        window=rule.window,
        num_global=rule.num_global,
        has_segments=spec.q_segment_ids is not None,
        has_k_critical=True,
        has_q_critical=rule.queries == "critical",
    )
