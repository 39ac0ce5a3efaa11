"""`SparseReasoningAttention`: GQA self-attention with RoPE, an optional SRA router, and KV-cache decoding.

A call reads as its three seams: the layer's selector (`sra_jax.nn.selector`: dense, own router + selection
policy, or reused set) picks the critical set and the static key rule (`ops.masks.SRARule`, carried by the
`SRAMaskSpec`); attention runs through `ops.attention(impl=...)`, or for a decode step through the sparse decode
kernel, as the cache's type allows (`KVCache` checks the left-padded layout, `LeftPaddedKVCache` has it).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn import decode
from sra_jax.nn.cache import KVCache
from sra_jax.nn.layers import attention_projections, project_qkv
from sra_jax.nn.router import Router
from sra_jax.nn.selector import (  # noqa: F401  (SharedSelection: part of this module's interface)
    LayerSelection,
    NoSelection,
    ReusedSelection,
    RouterSelection,
    SharedSelection,
)
from sra_jax.ops import attention as attention_ops
from sra_jax.ops import masks


class LayerStats(NamedTuple):
    """Per-layer aux (rows of `ModelAux`)."""

    router_logits: Float[Array, "b s"]
    critical: Bool[Array, "b s"]
    selection_log_prob: Float[Array, " b"]
    selected_fraction: Float[Array, " b"]
    visible_pairs: Float[Array, " b"]
    causal_pairs: Float[Array, " b"]
    selection_pairs: Float[Array, " b"]  # selection work inside visible_pairs (see sra_jax.nn.per_query)


class SparseReasoningAttention(nnx.Module):
    """Llama self-attention (GQA, RoPE); with `sra` applying to `layer` the keys a query sees follow the SRA rule.

    With SRA off this is exactly causal attention (by position, padding and segments respected). `selects=False`
    makes an SRA layer reuse the critical set of an earlier layer (static masks) and gives it no router.
    `decode_kernel` (with attention_impl="pallas"): decode steps run `pallas_kernels.sparse_decode_attention` with
    this backend ("auto", "triton", "reference", or "interpret" for CPU tests); "off" keeps the block-sparse kernel
    over the whole cache. It is a plain attribute: set it on a built model to switch (see sra_jax.nn.decode).
    """

    def __init__(
        self,
        config: LlamaConfig,
        sra: SRAConfig | None = None,
        *,
        layer: int = 0,
        selects: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: str = "reference",
        decode_kernel: str = "auto",
        rngs: nnx.Rngs,
    ):
        decode.check_decode_kernel(decode_kernel)
        self.config = config
        self.decode_kernel = decode_kernel
        self.sra = sra if sra is not None and sra.applies_to(layer) else None
        self.layer = layer
        self.dtype = dtype
        self.attention_impl = attention_impl
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(config, **kw)
        if self.sra is None:
            self.selector = NoSelection()
        elif selects:
            self.selector = RouterSelection(self.sra)
        else:
            self.selector = ReusedSelection(self.sra)
        if isinstance(self.selector, RouterSelection):
            self.router = Router(config.hidden_size, self.sra.router_hidden, param_dtype=param_dtype, rngs=rngs)
        else:
            self.router = None

    def __call__(
        self,
        x: Float[Array, "b s d"],
        positions: Int[Array, "b s"],
        *,
        segment_ids: Int[Array, "b s"] | None = None,
        key: jax.Array | None = None,
        critical: Bool[Array, "b s"] | None = None,
        shared: SharedSelection | None = None,
        cache: KVCache | None = None,
        tau: float | Float[Array, ""] | None = None,
        max_segments: int | None = None,
    ) -> tuple[Float[Array, "b s d"], LayerStats, SharedSelection | None, KVCache | None]:
        """x is the RMS-normed layer input. With a cache, `cache.positions` must already hold this call's positions
        (the model writes them once for all layers); this layer writes its keys, values and critical flags.
        `tau` is the selection temperature of this call (default sra.tau; a traced value does not recompile).
        `max_segments` (static, packed rows): at most this many segments with valid tokens in any row; it makes
        the critical-key bound of packed rows num_critical(s) + max_segments instead of s (see
        `sra_jax.nn.selector.critical_bound`)."""
        b, s, _ = x.shape
        q, k, v = project_qkv(self.config, self.q_proj, self.k_proj, self.v_proj, x, positions)
        # At run time (`masks.at_run_time`): the counts of valid tokens (selection, statistics) would otherwise be
        # constant-folded in every layer of a prefill whose positions are compile-time constants.
        valid = masks.at_run_time(positions) >= 0
        chosen = self.selector.select(
            self.router, x, valid, layer=self.layer, key=key, critical=critical, shared=shared, cache=cache, tau=tau,
            segment_ids=segment_ids, max_segments=max_segments,
        )
        v = self.selector.gate_values(v, chosen)
        num_slots = s if cache is None else cache.max_len
        rule = self.selector.rule(chosen, num_slots=num_slots, attention_impl=self.attention_impl, cache=cache)
        if cache is not None:
            cache = self._write_cache(cache, k, v, chosen)
        spec = self._spec(rule, positions, chosen.selection.critical, segment_ids, cache, s)
        out = self._attend(q, k, v, spec, cache, chosen.selection.critical)
        out = self.o_proj(out.reshape(b, s, -1))
        return out, self._stats(spec, chosen, valid), chosen.shared, cache

    def _spec(
        self,
        rule: masks.SRARule,
        positions: Int[Array, "b s"],
        critical: Bool[Array, "b s"],
        segment_ids: Int[Array, "b s"] | None,
        cache: KVCache | None,
        s: int,
    ) -> masks.SRAMaskSpec:
        """The call's mask spec: keys are this call's tokens, or the cache's slots (this call's already written)."""
        if cache is None:
            return masks.SRAMaskSpec.create(positions, critical, segment_ids=segment_ids, rule=rule)
        k_critical = cache.critical[self.layer]
        if cache.capacity < cache.max_len:
            # Only written slots count (a reused cache may hold stale flags past them): at most num_critical
            # (<= capacity, enforced by the selection) critical keys.
            written = jnp.arange(cache.max_len) < cache.index + s
            k_critical = k_critical & written
        return masks.SRAMaskSpec.create(positions, critical, k_positions=cache.positions, k_critical=k_critical,
                                        rule=rule)

    def _attend(
        self,
        q: Float[Array, "b s h d"],
        k: Float[Array, "b s kv d"],
        v: Float[Array, "b s kv d"],
        spec: masks.SRAMaskSpec,
        cache: KVCache | None,
        q_critical: Bool[Array, "b s"],
    ) -> Float[Array, "b s h d"]:
        """Attention of this call's queries: over its own keys, a decode step through the sparse decode kernel, or
        over the cache's slots."""
        if self._uses_decode_kernel(q.shape[1], cache):
            return self._decode_attention(q, spec, cache, q_critical)
        if cache is not None:  # this layer's keys: a slice of the stacked cache (the decode kernel needs none)
            k, v = cache.k[self.layer].astype(q.dtype), cache.v[self.layer].astype(q.dtype)
        return attention_ops.attention(q, k, v, spec=spec, impl=self.attention_impl)

    def _stats(self, spec: masks.SRAMaskSpec, chosen: LayerSelection, valid: Bool[Array, "b s"]) -> LayerStats:
        causal, visible = self.selector.pair_counts(spec)  # from counts: no [b, q, k] array
        num_valid = jnp.maximum(valid.sum(-1), 1).astype(jnp.float32)
        critical = chosen.selection.critical
        return LayerStats(
            router_logits=chosen.router_logits,
            critical=critical,
            selection_log_prob=chosen.selection.log_prob,
            selected_fraction=critical.sum(-1).astype(jnp.float32) / num_valid,
            visible_pairs=visible,
            causal_pairs=causal,
            selection_pairs=jnp.zeros_like(visible),
        )

    def _uses_decode_kernel(self, s: int, cache: KVCache | None) -> bool:
        """Static: a decode step (cache given, at most MAX_DECODE_TOKENS new tokens) of a "pallas" layer."""
        return (
            cache is not None
            and self.attention_impl == "pallas"
            and self.decode_kernel != "off"
            and s <= decode.MAX_DECODE_TOKENS
        )

    def _decode_attention(
        self,
        q: Float[Array, "b s h d"],
        spec: masks.SRAMaskSpec,
        cache: KVCache,
        q_critical: Bool[Array, "b s"],
    ) -> Float[Array, "b s h d"]:
        """The sparse decode kernel when the cache has the left-padded layout it reads: always for a
        `LeftPaddedKVCache` (by construction: no check, no cond, which on a GPU would make the host wait), else
        checked at run time on the positions, with the general path behind a `lax.cond` (see sra_jax.nn.decode).
        The general path slices this layer's K/V and critical flags inside its branch, so a step that takes the
        kernel copies none of them."""
        kv_start, ok = cache.kernel_layout(cache.index + q.shape[1])
        if ok is None:
            return self._decode_kernel(q, cache, q_critical, kv_start)

        def general():
            k, v = cache.k[self.layer].astype(q.dtype), cache.v[self.layer].astype(q.dtype)
            layer_spec = dataclasses.replace(spec, k_critical=cache.critical[self.layer])
            return attention_ops.attention(q, k, v, spec=layer_spec, impl=self.attention_impl)

        return jax.lax.cond(ok, lambda: self._decode_kernel(q, cache, q_critical, kv_start), general)

    def _decode_kernel(
        self,
        q: Float[Array, "b s h d"],
        cache: KVCache,
        q_critical: Bool[Array, "b s"],
        kv_start: Int[Array, " b"],
    ) -> Float[Array, "b s h d"]:
        """The sparse decode kernel on a left-padded cache whose rows start at `kv_start`: this layer read straight
        from the stacked cache (no per-step copy of its K/V), its critical slots from the cache's list."""
        rule, critical_slots, num_critical = self.selector.decode_rule(cache, self.layer)
        if cache.k.dtype == q.dtype:
            k, v, layer = cache.k, cache.v, self.layer
        else:  # the kernel's dots want one dtype: convert (and copy) this layer
            k, v, layer = cache.k[self.layer].astype(q.dtype), cache.v[self.layer].astype(q.dtype), None
        return decode.sparse_decode(
            q, k, v, layer=layer, lengths=cache.index + q.shape[1], kv_start=kv_start, rule=rule,
            critical_slots=critical_slots, num_critical=num_critical, q_critical=q_critical,
            decode_kernel=self.decode_kernel,
        )

    def _write_cache(
        self,
        cache: KVCache,
        k: Float[Array, "b s kv d"],
        v: Float[Array, "b s kv d"],
        chosen: LayerSelection,
    ) -> KVCache:
        """This call's keys, values and critical flags at slot `index`; the selector adds what it keeps."""
        start = (jnp.int32(self.layer), jnp.int32(0), cache.index.astype(jnp.int32))
        cache = cache.replace(
            k=jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), (*start, 0, 0)),
            v=jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), (*start, 0, 0)),
            critical=jax.lax.dynamic_update_slice(cache.critical, chosen.selection.critical[None], start),
        )
        return self.selector.write_critical(cache, self.layer, chosen)
