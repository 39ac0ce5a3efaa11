"""How an attention layer gets its critical set and key rule: one object per kind of layer, picked once when the
layer is built.

- `NoSelection`: SRA off. No router, no critical token; queries see every causal key.
- `RouterSelection`: an SRA layer with its own router; its selection policy (`SRAConfig.selection`) picks the set.
- `ReusedSelection`: an SRA layer that reuses an earlier layer's set (`SRAConfig.mask == "static"`).

Each answers the same questions for `SparseReasoningAttention.__call__`: the critical set of this call (`select`),
the value gate that carries the router gradient (`gate_values`), the static key rule (`rule`, `decode_rule`), what
the KV cache keeps of the set (`write_critical`) and the visible-pair statistics (`pair_counts`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from sra_jax.config import SRAConfig
from sra_jax.nn.cache import KVCache
from sra_jax.nn.router import Router
from sra_jax.nn.selection import critical_counts, forced_selection, select
from sra_jax.ops import masks
from sra_jax.ops.selection_policy import Selection, SelectionPolicy, get_selection_policy

# Larger than any position difference; a dense layer's SRA rule then reduces to causal-by-position.
UNBOUNDED_WINDOW = 2**30


@struct.dataclass
class SharedSelection:
    """What the first SRA layer hands to later ones when `SRAConfig.mask == "static"`. `max_critical` is static (not a
    pytree leaf), so it stays a Python int when the selection crosses jax.checkpoint (remat) or jit boundaries."""

    router_logits: Float[Array, "b s"]
    selection: Selection
    threshold: Float[Array, " b"] | None
    max_critical: int = struct.field(pytree_node=False)  # bound on a row's critical tokens (see critical_bound)


class LayerSelection(NamedTuple):
    """The selection step's result: router scores, the critical set, the decode threshold to store in the cache
    (None: leave the cache's), and what later static-mask layers reuse (None for a dense layer)."""

    router_logits: Float[Array, "b s"]
    selection: Selection
    threshold: Float[Array, " b"] | None
    shared: SharedSelection | None


@dataclasses.dataclass(frozen=True)
class NoSelection:
    """SRA off: exactly causal attention by position (padding and segments respected)."""

    def select(
        self,
        router: Router | None,
        x: Float[Array, "b s d"],
        valid: Bool[Array, "b s"],
        *,
        layer: int,
        key: jax.Array | None,
        critical: Bool[Array, "b s"] | None,
        shared: SharedSelection | None,
        cache: KVCache | None,
        tau: float | Float[Array, ""] | None,
        segment_ids: Int[Array, "b s"] | None,
        max_segments: int | None,
    ) -> LayerSelection:
        b, s = valid.shape
        zeros = jnp.zeros((b, s), jnp.float32)
        nothing = Selection(jnp.zeros((b, s), bool), zeros, jnp.zeros((b,), jnp.float32))
        return LayerSelection(zeros, nothing, None, None)

    def gate_values(self, v: Float[Array, "b s kv d"], chosen: LayerSelection) -> Float[Array, "b s kv d"]:
        return v

    def rule(
        self, chosen: LayerSelection, *, num_slots: int, attention_impl: str, cache: KVCache | None
    ) -> masks.SRARule:
        """The "window" covers every position a query can see (slot-based implementations scan `window` key slots,
        so there it is the number of slots), no globals, no critical keys."""
        window = num_slots if attention_impl in ("gather", "pallas") else UNBOUNDED_WINDOW
        return masks.SRARule(window=window, num_global=0, max_critical=0)

    def decode_rule(
        self, cache: KVCache, layer: int
    ) -> tuple[masks.SRARule, Int[Array, "b n"] | None, Int[Array, " b"] | None]:
        """(rule, critical slot lists, their lengths) of a decode step: every cached key, no critical slots."""
        return masks.SRARule(window=cache.max_len, num_global=0, queries="all"), None, None

    def write_critical(self, cache: KVCache, layer: int, chosen: LayerSelection) -> KVCache:
        """No critical token ever: the layer's slot lists stay empty."""
        return cache

    def pair_counts(self, spec: masks.SRAMaskSpec) -> tuple[Float[Array, " b"], Float[Array, " b"]]:
        """(causal pairs, visible pairs): every causal pair is visible."""
        causal, _ = masks.visible_pair_counts(spec)
        return causal, causal


@dataclasses.dataclass(frozen=True)
class _SparseSelection:
    """What every SRA layer shares, however it gets its set: the SRA key rule, the value gate, the cache's lists."""

    sra: SRAConfig

    def gate_values(self, v: Float[Array, "b s kv d"], chosen: LayerSelection) -> Float[Array, "b s kv d"]:
        """Identity in the forward pass; carries d loss / d gate to the router (see sra_jax.nn.selection)."""
        gate = chosen.selection.gate
        gate = gate - jax.lax.stop_gradient(gate)
        return v * (1 + gate)[:, :, None, None].astype(v.dtype)

    def rule(
        self, chosen: LayerSelection, *, num_slots: int, attention_impl: str, cache: KVCache | None
    ) -> masks.SRARule:
        """A true static bound on the critical keys of a row (the compact paths gather that many and would drop
        any beyond it): the cache's capacity when the keys are its slots, else this call's selection bound."""
        bound = chosen.shared.max_critical if cache is None else cache.capacity
        return masks.SRARule(self.sra.window, self.sra.num_global, self.sra.queries, bound)

    def decode_rule(
        self, cache: KVCache, layer: int
    ) -> tuple[masks.SRARule, Int[Array, "b n"] | None, Int[Array, " b"] | None]:
        """(rule, critical slot lists, their lengths) of a decode step: the SRA rule over the cache's lists."""
        rule = masks.SRARule(self.sra.window, self.sra.num_global, self.sra.queries)
        return rule, cache.critical_slots[layer], cache.num_critical[layer]

    def write_critical(self, cache: KVCache, layer: int, chosen: LayerSelection) -> KVCache:
        """The decode threshold, and the decode kernel's critical slot list grown with the flags (O(b * s), not a
        rebuild over max_len)."""
        if chosen.threshold is not None:
            cache = cache.replace(threshold=cache.threshold.at[layer].set(chosen.threshold))
        return cache.append_critical(layer, chosen.selection.critical)

    def pair_counts(self, spec: masks.SRAMaskSpec) -> tuple[Float[Array, " b"], Float[Array, " b"]]:
        """(causal pairs, visible pairs) from counts: no [b, q, k] array."""
        return masks.visible_pair_counts(spec)


@dataclasses.dataclass(frozen=True)
class ReusedSelection(_SparseSelection):
    """An SRA layer without a router: the critical set, scores and threshold of the first SRA layer (static masks);
    its own log-prob is 0 (the first layer's counts once)."""

    def select(self, router, x, valid, *, layer, key, critical, shared, cache, tau, segment_ids, max_segments):
        if shared is None:
            raise ValueError(f"layer {layer} reuses an earlier layer's critical set (static mask): pass shared=")
        b = valid.shape[0]
        selection = shared.selection._replace(log_prob=jnp.zeros((b,), jnp.float32))
        return LayerSelection(shared.router_logits, selection, shared.threshold, shared)


@dataclasses.dataclass(frozen=True)
class RouterSelection(_SparseSelection):
    """An SRA layer with its own router, whose scores its selection policy turns into the critical set.

    On an empty cache (prefill) the set is the policy's selection and the stored threshold its
    `threshold`; on later calls a token is critical iff the policy's `decoded_critical` says so against
    the stored threshold. `critical` overrides both. With `segment_ids` (packed rows, never with a cache) each
    segment selects its own num_critical(length) tokens. Flags past the cache's static capacity are cleared (none
    along generate's path)."""

    @property
    def policy(self) -> SelectionPolicy:
        """The selection policy registered under `sra.selection`."""
        return get_selection_policy(self.sra.selection)

    def select(self, router, x, valid, *, layer, key, critical, shared, cache, tau, segment_ids, max_segments):
        logits = router(x)
        s = logits.shape[-1]
        # k_row = num_critical(valid tokens of the row), so padding does not inflate a row's share; the padded
        # length's k is the static bound (shapes stay static) and the Bernoulli cap.
        k = self.sra.num_critical(s)
        k_rows = critical_counts(self.sra, valid)
        if critical is not None:
            chosen = forced_selection(logits, critical, k, valid=valid, sra=self.sra, tau=tau, segment_ids=segment_ids)
        else:
            chosen = select(logits, k_rows, self.sra, valid=valid, key=key, tau=tau, k_max=k, segment_ids=segment_ids)
        threshold = None
        if cache is not None:
            chosen, threshold = self._decode(
                chosen, logits, k_rows, k, valid, cache, layer, forced=critical is not None, key=key
            )
            kept = cache.within_capacity(layer, chosen.critical)
            chosen = chosen._replace(critical=kept, gate=jnp.where(kept, chosen.gate, 0.0))
        bound = critical_bound(self.sra, s, critical, segment_ids, max_segments)
        return LayerSelection(logits, chosen, threshold, SharedSelection(logits, chosen, threshold, bound))

    def _decode(self, chosen, logits, k_rows, k, valid, cache: KVCache, layer: int, *, forced: bool, key=None):
        """(the set of this call, the threshold to store): prefill keeps the selection and fixes the threshold,
        later calls read the stored threshold (read off the policy's own selection when it allows: no second
        top-k)."""
        prefill = cache.index == 0
        stored = cache.threshold[layer]
        if forced:
            return chosen, self.policy.threshold(logits, k_rows, valid=valid, k_max=k, prefill=prefill, stored=stored)
        threshold = self.policy.selected_threshold(
            logits, chosen, k_rows, valid=valid, k_max=k, key=key, prefill=prefill, stored=stored
        )
        decoded = self.policy.decoded_critical(logits, threshold) & valid
        chosen = Selection(
            critical=jnp.where(prefill, chosen.critical, decoded),
            gate=jnp.where(prefill, chosen.gate, decoded.astype(jnp.float32)),
            log_prob=jnp.where(prefill, chosen.log_prob, 0.0),
        )
        return chosen, threshold


def critical_bound(
    sra: SRAConfig,
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
    - otherwise num_critical(s): every selection policy takes at most k_row <= k tokens per row (its contract).
    """
    if critical is not None:
        if isinstance(critical, jax.core.Tracer):
            return s
        return min(s, int(jnp.max(jnp.sum(critical, axis=-1))))
    if segment_ids is not None:
        return s if max_segments is None else min(s, sra.num_critical(s) + max_segments)
    return sra.num_critical(s)
