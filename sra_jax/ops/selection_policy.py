"""Selection policies: how a layer's router scores become its critical set, one object per `SRAConfig.selection`
mode, looked up by name (`get_selection_policy`; add a mode with `register_selection_policy`).

A policy owns everything that depends on the mode: the selection of a call (`select`, and `segment_select` for
packed rows when `supports_segments`), the log-probability of a caller-given set (`log_prob`, `segment_log_prob`),
and the decode rule (`threshold`, fixed at prefill and kept in the KV cache, and `decoded_critical`, which flags
each later token against it). The math lives in `sra_jax.ops.selection`; policies are thin, stateless objects over it.

Contract of `select` (every policy, built-in or registered): only valid tokens are critical and a row holds at most
its k_row tokens (at most the static `k_max`); the SRA layer's static critical-key bound, the KV cache's capacity
and the compact attention path all rely on it. `decoded_critical` flags at most the token itself.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sra_jax.ops import selection as sel
from sra_jax.ops import sequence_parallel


class Selection(NamedTuple):
    """A layer's critical set: `critical` (what the mask uses), `gate` (forward value == critical, carries the
    router gradient), `log_prob` (log-probability of the draw that produced it, for the router's policy gradient)."""

    critical: Bool[Array, "b s"]
    gate: Float[Array, "b s"]
    log_prob: Float[Array, " b"]


def _sequence_sharding(n: int) -> sequence_parallel.SequenceSharding | None:
    """The active sequence-parallel context when it splits a row of `n` scores evenly (else the unsharded path)."""
    active = sequence_parallel.active_sequence_sharding()
    return None if active is None or n % active.shards else active


def _top_indices(logits: Float[Array, "b n"], k: int, valid: Bool[Array, "b n"]) -> Int[Array, "b k"]:
    active = _sequence_sharding(logits.shape[-1])
    if active is not None:  # local top-k per shard, then a global merge: the same indices
        return sequence_parallel.sharded_topk_indices(logits, k, valid=valid, **active.placement(logits.shape[0]))
    return jax.lax.top_k(jnp.where(valid, logits, -jnp.inf), k)[1]


def _gumbel_top_indices(logits, k, *, key, valid, **bound) -> Int[Array, "b _"]:
    """`ops.selection.gumbel_topk_indices`, sequence-parallel under an active `sequence_sharding` context."""
    active = _sequence_sharding(logits.shape[-1])
    if active is not None:
        return sequence_parallel.sharded_topk_indices(sel.gumbel_perturb(logits, key), k, valid=valid, **bound,
                                                      **active.placement(logits.shape[0]))
    return sel.gumbel_topk_indices(logits, k, key=key, valid=valid, **bound)


def _topk_log_prob(logits: Float[Array, "b n"], indices: Int[Array, "b k"], valid: Bool[Array, "b n"]):
    """`ops.selection.topk_log_prob`, sequence-parallel under an active `sequence_sharding` context."""
    active = _sequence_sharding(logits.shape[-1])
    if active is not None:
        return sequence_parallel.sharded_topk_log_prob(logits, indices, valid=valid,
                                                       **active.placement(logits.shape[0]))
    return sel.topk_log_prob(logits, indices, valid=valid)


@dataclasses.dataclass(frozen=True)
class SelectionPolicy:
    """Deterministic top-k (the base of every fixed-k mode): row r takes its k_row highest valid scores, with a
    constant gate (no straight-through path: train it with the policy gradient on the log-prob), its Plackett-Luce
    log-prob, per-segment top-k on packed rows, and the decode rule "score >= the k_row-th largest prompt score".

    Subclass and override what differs; frozen dataclasses, so a policy is hashable and can sit in a module's
    static attributes. `k` is an int (one size for every row) or per-row counts [b] under the static bound `k_max`
    (default s). `tau` may be traced (annealing it does not recompile)."""

    @property
    def supports_segments(self) -> bool:
        """Whether packed rows (segment ids) can select per segment: each segment takes num_critical(its length) of
        its own tokens, ranked only against them, as if its example ran alone in its row."""
        return True

    def select(
        self,
        logits: Float[Array, "b s"],
        k: int | Int[Array, " b"],
        *,
        valid: Bool[Array, "b s"],
        key: jax.Array | None = None,
        tau: float | Float[Array, ""] = 1.0,
        hard: bool = True,
        k_max: int | None = None,
    ) -> Selection:
        """The critical set of this call's rows from router `logits` (only `valid` tokens can be chosen)."""
        indices, critical = self._top_k(logits, k, valid=valid, k_max=k_max)
        gate = critical.astype(jnp.float32)
        return Selection(critical, gate, _topk_log_prob(logits, indices, valid))

    def _top_k(self, logits, k, *, valid, k_max):
        """(indices [b, size] with -1 past each row's k_row, k-hot mask) of each row's top-k_row valid scores."""
        n = logits.shape[-1]
        size = sel.static_bound(k, n, k_max)
        indices = _top_indices(logits, size, valid)
        if not isinstance(k, int):
            indices = jnp.where(jnp.arange(size) < k[:, None], indices, -1)
        return indices, sel.indices_to_mask(indices, n) & valid

    def segment_select(
        self,
        logits: Float[Array, "b s"],
        segment_ids: Int[Array, "b s"],
        counts: Int[Array, " m"],
        *,
        valid: Bool[Array, "b s"],
        key: jax.Array | None = None,
        tau: float | Float[Array, ""] = 1.0,
        hard: bool = True,
    ) -> Selection:
        """Packed rows: segment g takes counts[its valid length] of its own tokens (`counts` indexed by length);
        the log-prob of a row is the sum over its segments. Only called when `supports_segments`."""
        critical = sel.segment_topk_mask(logits, segment_ids, counts, valid=valid)
        log_prob = sel.segment_topk_log_prob(logits, critical, segment_ids, valid=valid)
        return Selection(critical, critical.astype(jnp.float32), log_prob)

    def log_prob(
        self,
        logits: Float[Array, "b s"],
        critical: Bool[Array, "b s"],
        k: int,
        *,
        valid: Bool[Array, "b s"],
        tau: float | Float[Array, ""] = 1.0,
    ) -> Float[Array, " b"]:
        """Log-prob of a caller-given set (static masks, RL replay, tests): the Plackett-Luce log-prob of the set
        ordered by the current logits, over each row's own set size (at most k draws): exact for the draw when the
        set was drawn in descending-logit order."""
        indices = jax.lax.top_k(jnp.where(critical, logits, -jnp.inf), k)[1]
        counts = jnp.minimum(critical.sum(-1), k).astype(jnp.int32)
        return sel.topk_log_prob(logits, indices, valid=valid, k=counts)

    def segment_log_prob(
        self,
        logits: Float[Array, "b s"],
        critical: Bool[Array, "b s"],
        segment_ids: Int[Array, "b s"],
        *,
        valid: Bool[Array, "b s"],
    ) -> Float[Array, " b"]:
        """Log-prob of a caller-given set on packed rows: the sum over segments of each one's own log-prob."""
        return sel.segment_topk_log_prob(logits, critical, segment_ids, valid=valid)

    def threshold(
        self,
        logits: Float[Array, "b s"],
        k: int | Int[Array, " b"],
        *,
        valid: Bool[Array, "b s"],
        k_max: int | None = None,
        prefill: Bool[Array, ""],
        stored: Float[Array, " b"],
    ) -> Float[Array, " b"]:
        """The score cut-off a KV cache keeps for later tokens: fixed at prefill (`prefill`, the call at index 0)
        as each row's k_row-th largest valid score (`ops.selection.decode_threshold`), else the `stored` one."""
        return jnp.where(prefill, sel.decode_threshold(logits, k, valid=valid, k_max=k_max), stored)

    def selected_threshold(
        self,
        logits: Float[Array, "b s"],
        selection: Selection,
        k: int | Int[Array, " b"],
        *,
        valid: Bool[Array, "b s"],
        k_max: int | None = None,
        key: jax.Array | None = None,
        prefill: Bool[Array, ""],
        stored: Float[Array, " b"],
    ) -> Float[Array, " b"]:
        """`threshold` of a call whose critical set `select(logits, k, valid=valid, key=key, k_max=k_max)` just
        gave (`selection`). When that set is the deterministic top-k, its k_row-th largest valid score is the lowest
        selected score (+inf for an empty set), read with one masked min instead of a second top-k (same value);
        otherwise `threshold`."""
        if self._threshold_is_lowest_selected(key):
            lowest = jnp.min(jnp.where(selection.critical, logits, jnp.inf), axis=-1)
            return jnp.where(prefill, lowest, stored)
        return self.threshold(logits, k, valid=valid, k_max=k_max, prefill=prefill, stored=stored)

    def _threshold_is_lowest_selected(self, key: jax.Array | None) -> bool:
        """Whether `select` (with this key) is this class's deterministic top-k and `threshold` its k_row-th
        largest score (a subclass overriding either falls back to `threshold`)."""
        cls = type(self)
        return cls.select is SelectionPolicy.select and cls.threshold is SelectionPolicy.threshold

    def decoded_critical(self, logits: Float[Array, "b s"], threshold: Float[Array, " b"]) -> Bool[Array, "b s"]:
        """Which tokens after the prefill are critical: score >= the stored threshold."""
        return logits >= threshold[:, None]


@dataclasses.dataclass(frozen=True)
class GumbelTopK(SelectionPolicy):
    """With a key: a Plackett-Luce sample (Gumbel top-k), gate = `ops.selection.gumbel_topk` (straight-through
    when hard); packed rows draw each segment independently. Without a key: deterministic top-k."""

    def select(self, logits, k, *, valid, key=None, tau=1.0, hard=True, k_max=None) -> Selection:
        if key is None:
            return super().select(logits, k, valid=valid, tau=tau, hard=hard, k_max=k_max)
        bound = {} if isinstance(k, int) else dict(k_max=sel.static_bound(k, logits.shape[-1], k_max))
        indices = _gumbel_top_indices(logits, k, key=key, valid=valid, **bound)
        critical = sel.indices_to_mask(indices, logits.shape[-1]) & valid
        gate = sel.gumbel_topk(logits, k, key=key, tau=tau, hard=hard, valid=valid, **bound).astype(jnp.float32)
        return Selection(critical, gate, _topk_log_prob(logits, indices, valid))

    def segment_select(self, logits, segment_ids, counts, *, valid, key=None, tau=1.0, hard=True) -> Selection:
        """Each segment's critical set, straight-through gate and Plackett-Luce log-prob are those of `select` on
        the segment alone, given the same per-token Gumbel noise."""
        if key is None:
            return super().segment_select(logits, segment_ids, counts, valid=valid, tau=tau, hard=hard)
        scores = sel.gumbel_perturb(logits, key)  # the same noise `select` draws for the row
        critical = sel.segment_topk_mask(jax.lax.stop_gradient(scores), segment_ids, counts, valid=valid)
        gate = sel.segment_relaxed_topk(scores, segment_ids, counts, tau=tau, valid=valid)
        if hard:
            gate = critical.astype(gate.dtype) + (gate - jax.lax.stop_gradient(gate))
        log_prob = sel.segment_topk_log_prob(logits, critical, segment_ids, order=scores, valid=valid)
        return Selection(critical, gate.astype(jnp.float32), log_prob)

    def _threshold_is_lowest_selected(self, key: jax.Array | None) -> bool:
        """Without a key `select` is the deterministic top-k."""
        cls = type(self)
        return key is None and cls.select is GumbelTopK.select and cls.threshold is SelectionPolicy.threshold


@dataclasses.dataclass(frozen=True)
class Sparsemax(SelectionPolicy):
    """The top-k of sparsemax(logits / tau) restricted to its support, gate = the hard set plus sparsemax's
    gradient. No packed rows (sparsemax normalises over a whole row)."""

    @property
    def supports_segments(self) -> bool:
        return False

    def select(self, logits, k, *, valid, key=None, tau=1.0, hard=True, k_max=None) -> Selection:
        indices, critical = self._top_k(logits, k, valid=valid, k_max=k_max)
        # Invalid tokens get a large finite negative score (not -inf) so sparsemax stays finite.
        probs = sel.sparsemax(jnp.where(valid, logits / tau, -1e9), axis=-1)
        critical = critical & (probs > 0)
        gate = critical.astype(jnp.float32) + probs - jax.lax.stop_gradient(probs)
        return Selection(critical, gate, _topk_log_prob(logits, indices, valid))


@dataclasses.dataclass(frozen=True)
class Bernoulli(SelectionPolicy):
    """Each valid token is critical with probability sigmoid(logit / tau), at most k kept (the highest logits; the
    cap is the static bound), gate = binary-concrete straight-through; without a key the cut logit > 0. Its exact
    capped-Bernoulli log-prob. Decoding keeps the fixed cut: a decoded token is critical iff its score > 0 (the
    stored threshold is 0). No packed rows (the cap is per row)."""

    @property
    def supports_segments(self) -> bool:
        return False

    def select(self, logits, k, *, valid, key=None, tau=1.0, hard=True, k_max=None) -> Selection:
        size = sel.static_bound(k, logits.shape[-1], k_max)
        critical, gate = sel.bernoulli_select(logits, size, key=key, tau=tau, hard=hard, valid=valid)
        log_prob = sel.bernoulli_log_prob(logits, critical, size, tau=tau, valid=valid)
        return Selection(critical, gate.astype(jnp.float32), log_prob)

    def log_prob(self, logits, critical, k, *, valid, tau=1.0) -> Float[Array, " b"]:
        return sel.bernoulli_log_prob(logits, critical, k, tau=tau, valid=valid)

    def threshold(self, logits, k, *, valid, k_max=None, prefill, stored) -> Float[Array, " b"]:
        """The fixed cut 0 at every call, not taken from the prompt."""
        return jnp.zeros(logits.shape[:1], jnp.float32)

    def decoded_critical(self, logits, threshold) -> Bool[Array, "b s"]:
        return logits > threshold[:, None]


_POLICIES: dict[str, SelectionPolicy] = {}


def register_selection_policy(name: str, policy: object, *, replace: bool = False) -> SelectionPolicy:
    """Make `policy` (a `SelectionPolicy`) the one `SRAConfig(selection=name)` uses (register before building the
    config). A name already taken is a ValueError unless `replace=True`. Returns the policy. (`policy` is typed
    loosely so the runtime type checker lets the check below give the clearer error.)"""
    if not isinstance(name, str) or not name:
        raise ValueError(f"selection policy name {name!r} must be a non-empty string")
    if not isinstance(policy, SelectionPolicy):
        raise ValueError(f"selection policy {name!r} must be a SelectionPolicy instance, got {type(policy).__name__}")
    if name in _POLICIES and not replace:
        raise ValueError(f"selection policy {name!r} is already registered; pass replace=True to replace it")
    _POLICIES[name] = policy
    return policy


def selection_policy_names() -> tuple[str, ...]:
    """Every registered selection mode, sorted."""
    return tuple(sorted(_POLICIES))


def get_selection_policy(name: str) -> SelectionPolicy:
    """The policy registered under `name`; ValueError listing the known names otherwise."""
    if name not in _POLICIES:
        raise ValueError(f"unknown selection policy {name!r}; known: {', '.join(map(repr, selection_policy_names()))}")
    return _POLICIES[name]


def check_segment_support(name: str, what: str) -> None:
    """ValueError when the policy `name` cannot select per segment (packed rows); `what` opens the message."""
    if not get_selection_policy(name).supports_segments:
        able = [n for n in selection_policy_names() if get_selection_policy(n).supports_segments]
        raise ValueError(
            f"{what}: packed rows select per segment (each example takes num_critical(its length) of its own tokens, "
            f"as if alone in its row), which the selection modes {', '.join(map(repr, able))} do, not {name!r}; use "
            f"one of those, or one example per row"
        )


register_selection_policy("topk", SelectionPolicy())
register_selection_policy("gumbel_topk", GumbelTopK())
register_selection_policy("sparsemax", Sparsemax())
register_selection_policy("bernoulli", Bernoulli())
