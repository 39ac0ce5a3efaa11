"""`SparseReasoningAttention`: GQA self-attention with RoPE, an optional SRA router, and KV-cache decoding."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn import decode
from sra_jax.nn.cache import KVCache
from sra_jax.nn.layers import attention_projections, project_qkv
from sra_jax.nn.router import Router, Selection, critical_counts, decode_threshold, forced_selection, select
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


@struct.dataclass
class SharedSelection:
    """What the first SRA layer hands to later ones when `SRAConfig.mask == "static"`. `max_critical` is static (not a
    pytree leaf), so it stays a Python int when the selection crosses jax.checkpoint (remat) or jit boundaries."""

    router_logits: Float[Array, "b s"]
    selection: Selection
    threshold: Float[Array, " b"] | None
    max_critical: int = struct.field(pytree_node=False)  # bound on a row's critical tokens (see _critical_bound)


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
        hidden = config.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(config, **kw)
        if self.sra is not None and selects:
            self.router = Router(hidden, self.sra.router_hidden, param_dtype=param_dtype, rngs=rngs)
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
        the critical-key bound of packed rows num_critical(s) + max_segments instead of s (see _critical_bound)."""
        cfg = self.config
        b, s, _ = x.shape
        hq, hd = cfg.num_attention_heads, cfg.head_dim
        q, k, v = project_qkv(cfg, self.q_proj, self.k_proj, self.v_proj, x, positions)
        valid = positions >= 0

        if self.sra is None:
            router_logits = jnp.zeros((b, s), jnp.float32)
            chosen = Selection(jnp.zeros((b, s), bool), jnp.zeros((b, s), jnp.float32), jnp.zeros((b,), jnp.float32))
            threshold, shared_out = None, None
        elif self.router is None:
            if shared is None:
                raise ValueError(f"layer {self.layer} reuses an earlier layer's critical set (static mask): pass shared=")
            router_logits, threshold = shared.router_logits, shared.threshold
            chosen = shared.selection._replace(log_prob=jnp.zeros((b,), jnp.float32))
            shared_out = shared
        else:
            router_logits = self.router(x)
            chosen, threshold = self._select(
                router_logits, valid, key=key, critical=critical, cache=cache, tau=tau, segment_ids=segment_ids
            )
            if cache is not None:  # flags past the cache's static capacity are cleared (none along generate's path)
                kept = cache.within_capacity(self.layer, chosen.critical)
                chosen = chosen._replace(critical=kept, gate=jnp.where(kept, chosen.gate, 0.0))
            bound = self._critical_bound(s, critical, segment_ids, max_segments)
            shared_out = SharedSelection(router_logits, chosen, threshold, bound)
        if self.sra is not None:
            # Identity in the forward pass; carries d loss / d gate to the router (see sra_jax.nn.router).
            gate = chosen.gate - jax.lax.stop_gradient(chosen.gate)
            v = v * (1 + gate)[:, :, None, None].astype(v.dtype)

        if self.sra is None:
            # Causal attention by position: the "window" covers every position a query can see (slot-based
            # implementations scan `window` key slots, so there it is the number of slots), no critical keys.
            num_slots = s if cache is None else cache.max_len
            window = num_slots if self.attention_impl in ("gather", "pallas") else _UNBOUNDED_WINDOW
            rule = dict(window=window, num_global=0, max_critical=0)
        else:
            # A true static bound on the critical keys of a row (the compact paths gather that many and would drop
            # any beyond it): the cache's capacity when the keys are its slots, else this call's selection bound.
            rule = dict(
                window=self.sra.window,
                num_global=self.sra.num_global,
                queries=self.sra.queries,
                max_critical=shared_out.max_critical if cache is None else cache.capacity,
            )
        if cache is None:
            spec = masks.SRAMaskSpec.create(positions, chosen.critical, segment_ids=segment_ids, **rule)
        else:
            cache = self._write_cache(cache, k, v, chosen.critical, threshold)
            k_critical = cache.critical[self.layer]
            if cache.capacity < cache.max_len:
                # Only written slots count (a reused cache may hold stale flags past them): at most num_critical
                # (<= capacity, enforced above) critical keys.
                written = jnp.arange(cache.max_len) < cache.index + s
                k_critical = k_critical & written
            spec = masks.SRAMaskSpec.create(
                positions, chosen.critical, k_positions=cache.positions, k_critical=k_critical, **rule
            )
        if self._uses_decode_kernel(s, cache):
            out = self._decode_attention(q, spec, cache, chosen.critical)
        else:
            if cache is not None:  # this layer's keys: a slice of the stacked cache (the decode kernel needs none)
                k, v = cache.k[self.layer].astype(q.dtype), cache.v[self.layer].astype(q.dtype)
            out = attention_ops.attention(q, k, v, spec=spec, impl=self.attention_impl)
        out = self.o_proj(out.reshape(b, s, hq * hd))

        causal, visible = masks.visible_pair_counts(spec)  # from counts: no [b, q, k] array
        if self.sra is None:
            visible = causal
        num_valid = jnp.maximum(valid.sum(-1), 1).astype(jnp.float32)
        stats = LayerStats(
            router_logits=router_logits,
            critical=chosen.critical,
            selection_log_prob=chosen.log_prob,
            selected_fraction=chosen.critical.sum(-1).astype(jnp.float32) / num_valid,
            visible_pairs=visible,
            causal_pairs=causal,
        )
        return out, stats, shared_out, cache

    def _critical_bound(
        self,
        s: int,
        critical: Bool[Array, "b s"] | None,
        segment_ids: Int[Array, "b s"] | None,
        max_segments: int | None,
    ) -> int:
        """Static upper bound on the critical tokens a row of this call selects (keys = this call's tokens).

        - forced `critical`: its largest row count when concrete, else s.
        - packed rows: segment g of valid length L_g takes c_g = clamp(ceil(f * L_g - 1e-9), 1, L_g) tokens (f the
          critical fraction). c_g <= max(1, ceil(f * L_g)) < f * L_g + 1, so with G segments sum_g c_g < f * s + G
          <= num_critical(s) + 1e-9 + G (num_critical(s) >= f * s - 1e-9); both sides are integers, so
          sum_g c_g <= num_critical(s) + G. G <= max_segments when given; without it the bound is s.
        - otherwise num_critical(s): top-k and Gumbel top-k take k_row <= k, sparsemax a subset of the top-k,
          Bernoulli is capped at k.
        """
        if critical is not None:
            if isinstance(critical, jax.core.Tracer):
                return s
            return min(s, int(jnp.max(jnp.sum(critical, axis=-1))))
        if segment_ids is not None:
            return s if max_segments is None else min(s, self.sra.num_critical(s) + max_segments)
        return self.sra.num_critical(s)

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
        """The sparse decode kernel when the cache has the left-padded layout it reads (checked at run time on the
        positions, or declared by `cache.layout == "left_padded"`), else the general path (see sra_jax.nn.decode).
        The general path slices this layer's K/V and critical flags inside its branch, so a step that takes the
        kernel copies none of them."""
        if cache.layout == "left_padded":  # declared: no check, no cond (a GPU cond waits on the host)
            return self._decode_kernel(q, cache, q_critical, decode.first_valid_slot(cache.positions))
        kv_start, ok = decode.left_padded_layout(cache.positions, cache.index + q.shape[1])

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
        if self.sra is None:
            rule = dict(window=cache.max_len, num_global=0, critical_slots=None, num_critical=None, queries="all")
        else:
            rule = dict(
                window=self.sra.window,
                num_global=self.sra.num_global,
                critical_slots=cache.critical_slots[self.layer],
                num_critical=cache.num_critical[self.layer],
                queries=self.sra.queries,
            )
        if cache.k.dtype == q.dtype:
            k, v, layer = cache.k, cache.v, self.layer
        else:  # the kernel's dots want one dtype: convert (and copy) this layer
            k, v, layer = cache.k[self.layer].astype(q.dtype), cache.v[self.layer].astype(q.dtype), None
        return decode.sparse_decode(
            q, k, v, layer=layer, lengths=cache.index + q.shape[1], kv_start=kv_start, q_critical=q_critical,
            decode_kernel=self.decode_kernel, **rule,
        )

    def _select(
        self,
        router_logits: Float[Array, "b s"],
        valid: Bool[Array, "b s"],
        *,
        key: jax.Array | None,
        critical: Bool[Array, "b s"] | None,
        cache: KVCache | None,
        tau: float | Float[Array, ""] | None = None,
        segment_ids: Int[Array, "b s"] | None = None,
    ) -> tuple[Selection, Float[Array, " b"] | None]:
        """The critical set of this call's tokens and, with a cache, the decode threshold.

        On an empty cache (prefill) the set is the router's top-k selection and the threshold becomes its k-th largest
        score; on later calls a token is critical iff its score >= the stored threshold. `critical` overrides both.
        With `segment_ids` (packed rows, never with a cache) each segment selects its own num_critical(length) tokens.
        In the "bernoulli" mode the cut is fixed, not taken from the prompt: a decoded token is critical iff its
        score > 0 (the stored threshold is 0), the rule prefill itself applies without a key (there capped at k).
        """
        # k_row = num_critical(valid tokens of the row), so padding does not inflate a row's share; the padded
        # length's k is the static bound (shapes stay static) and the Bernoulli cap.
        k = self.sra.num_critical(router_logits.shape[-1])
        k_rows = critical_counts(self.sra, valid)
        if critical is not None:
            chosen = forced_selection(
                router_logits, critical, k, valid=valid, sra=self.sra, tau=tau, segment_ids=segment_ids
            )
        else:
            chosen = select(
                router_logits, k_rows, self.sra, valid=valid, key=key, tau=tau, k_max=k, segment_ids=segment_ids
            )
        if cache is None:
            return chosen, None
        prefill = cache.index == 0
        bernoulli = self.sra.selection == "bernoulli"
        if bernoulli:
            threshold = jnp.zeros(router_logits.shape[:1], jnp.float32)
        else:
            threshold = jnp.where(
                prefill, decode_threshold(router_logits, k_rows, valid=valid, k_max=k), cache.threshold[self.layer]
            )
        if critical is None:
            above = router_logits > threshold[:, None] if bernoulli else router_logits >= threshold[:, None]
            decoded = above & valid
            chosen = Selection(
                critical=jnp.where(prefill, chosen.critical, decoded),
                gate=jnp.where(prefill, chosen.gate, decoded.astype(jnp.float32)),
                log_prob=jnp.where(prefill, chosen.log_prob, 0.0),
            )
        return chosen, threshold

    def _write_cache(
        self,
        cache: KVCache,
        k: Float[Array, "b s kv d"],
        v: Float[Array, "b s kv d"],
        critical: Bool[Array, "b s"],
        threshold: Float[Array, " b"] | None,
    ) -> KVCache:
        start = (jnp.int32(self.layer), jnp.int32(0), cache.index.astype(jnp.int32))
        update = dict(
            k=jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), (*start, 0, 0)),
            v=jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), (*start, 0, 0)),
            critical=jax.lax.dynamic_update_slice(cache.critical, critical[None], start),
        )
        if threshold is not None:
            update["threshold"] = cache.threshold.at[self.layer].set(threshold)
        if self.sra is None:  # no critical token ever: the layer's slot lists stay empty
            return cache.replace(**update)
        # The decode kernel's critical slot list grows with the flags (O(b * s), not a rebuild over max_len).
        return cache.append_critical(self.layer, critical).replace(**update)


# Larger than any position difference; a dense layer's SRA spec then reduces to causal-by-position.
_UNBOUNDED_WINDOW = 2**30
