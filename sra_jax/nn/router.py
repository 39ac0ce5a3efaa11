"""`Router`: scores every token; `select` turns the scores into the critical set of an SRA layer.

How the router gets a gradient: the attention mask is boolean, so the selection cannot reach the loss through it.
Instead each SRA layer multiplies the values of its current tokens by `1 + gate - stop_gradient(gate)`, where `gate`
is the (straight-through) selection value of that token. The factor is exactly 1 in the forward pass (outputs are
bit-identical to the ungated model), and d loss / d gate_j = sum_i,h attn[h, i, j] * <d loss / d out[h, i], v[h, j]>:
how much the layer output would change if key j contributed more. Through the straight-through estimator of
`gumbel_topk` (or sparsemax's Jacobian) this reaches the router logits. Plain top-k has no such path (its gate is a
constant 0/1); train it with the policy gradient on `ModelAux.selection_log_prob` instead. The Bernoulli mode's
gate is the binary-concrete relaxation sigmoid(logit / tau + logistic noise) with the same straight-through trick.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from sra_jax.config import SRAConfig
from sra_jax.nn.layers import linear
from sra_jax.ops import selection as sel
from sra_jax.ops import sequence_parallel


class Router(nnx.Module):
    """Token scorer: Linear(hidden, router_hidden) -> silu -> Linear(router_hidden, 1), or one Linear if router_hidden=0.

    It reads the layer's RMS-normed input and always computes in float32, so that top-k ties and the decode threshold
    do not depend on the model's compute dtype. Parameters: `hidden.kernel` [hidden, router_hidden]
    ("embed", "router_hidden"), `hidden.bias` [router_hidden] ("router_hidden",), `score.kernel` [router_hidden, 1]
    ("router_hidden", None); with router_hidden=0 only `score.kernel` [hidden, 1] ("embed", None).
    """

    def __init__(self, hidden_size: int, router_hidden: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.hidden_size = hidden_size
        self.router_hidden = router_hidden
        kw = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        if router_hidden:
            self.hidden = linear(hidden_size, router_hidden, ("embed", "router_hidden"), use_bias=True, **kw)
            self.score = linear(router_hidden, 1, ("router_hidden", None), **kw)
        else:
            self.hidden = None
            self.score = linear(hidden_size, 1, ("embed", None), **kw)

    def __call__(self, x: Float[Array, "b s d"]) -> Float[Array, "b s"]:
        h = x.astype(jnp.float32)
        if self.hidden is not None:
            h = jax.nn.silu(self.hidden(h))
        return self.score(h)[..., 0]

    def flops_per_token(self) -> int:
        """Multiply-adds counted as 2 FLOPs, plus the bias add and activation of the hidden layer."""
        if self.router_hidden:
            return 2 * self.hidden_size * self.router_hidden + 2 * self.router_hidden + 2 * self.router_hidden
        return 2 * self.hidden_size


class Selection(NamedTuple):
    """A layer's critical set: `critical` (what the mask uses), `gate` (forward value == critical, carries the
    router gradient), `log_prob` (Plackett-Luce log-probability of the ordered draw that produced it)."""

    critical: Bool[Array, "b s"]
    gate: Float[Array, "b s"]
    log_prob: Float[Array, " b"]


def critical_counts(sra: SRAConfig, valid: Bool[Array, "b s"]) -> Int[Array, " b"]:
    """k_row of each row: `sra.num_critical(valid tokens of the row)` (ceil(critical_fraction * valid), clamped to
    [1, valid]), 0 for a row with no valid token. Padding never inflates k. Exactly SRAConfig.num_critical's rounding:
    a table of it over 0..s (float64, as the config computes) is indexed by the valid count."""
    return count_table(sra, valid.shape[-1])[valid.sum(-1)]


def count_table(sra: SRAConfig, n: int) -> Int[Array, " m"]:
    """`sra.num_critical(length)` for every length 0..n (0 for length 0): the count of a row or packed segment."""
    counts = np.arange(n + 1)
    # Same float64 arithmetic as SRAConfig.num_critical (the tests compare the two on every count).
    table = np.clip(np.ceil(sra.critical_fraction * counts - 1e-9), 1, np.maximum(counts, 1)).astype(np.int32)
    table[0] = 0
    return jnp.asarray(table)


def _indices_to_mask(indices: Int[Array, "b k"], n: int) -> Bool[Array, "b n"]:
    """k-hot mask of `indices`; -1 entries (past a row's own count) select nothing."""
    return jnp.any(indices[..., :, None] == jnp.arange(n), axis=-2)


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


def _static_bound(k, n: int, k_max: int | None) -> int:
    """Static top-k width: k itself for an int k, else k_max (default n)."""
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    return n if k_max is None else k_max


def select(
    logits: Float[Array, "b s"],
    k: int | Int[Array, " b"],
    sra: SRAConfig,
    *,
    valid: Bool[Array, "b s"],
    key: jax.Array | None = None,
    tau: float | Float[Array, ""] | None = None,
    k_max: int | None = None,
    segment_ids: Int[Array, "b s"] | None = None,
) -> Selection:
    """Critical set of k tokens per row from router `logits` (only `valid` tokens can be chosen). `k` is an int, or
    per-row counts (e.g. `critical_counts(sra, valid)`) under the static bound `k_max` (default s); the log-prob then
    counts only each row's own k_row draws.

    gumbel_topk with a key: a Plackett-Luce sample (Gumbel top-k), gate = ops.selection.gumbel_topk (straight-through
    when sra.hard). sparsemax: the top-k of sparsemax(logits / tau) restricted to its support, gate = the hard set plus
    sparsemax's gradient. bernoulli: each valid token is critical with probability sigmoid(logit / tau), at most k
    kept (the highest logits; the cap is the static bound), gate = binary-concrete straight-through; without a key the
    cut logit > 0. Otherwise (topk, or gumbel_topk without a key): deterministic top-k, constant gate. `tau` (may be
    traced, so annealing it does not recompile) defaults to sra.tau.

    `segment_ids` (packed rows): each segment selects num_critical(its valid tokens) of its own tokens instead (`k`
    and `k_max` are then unused), see `segment_select`.
    """
    n = logits.shape[-1]
    tau = sra.tau if tau is None else tau
    if segment_ids is not None:
        return segment_select(logits, segment_ids, sra, valid=valid, key=key, tau=tau)
    size = _static_bound(k, n, k_max)
    if sra.selection == "bernoulli":
        critical, gate = sel.bernoulli_select(logits, size, key=key, tau=tau, hard=sra.hard, valid=valid)
        log_prob = sel.bernoulli_log_prob(logits, critical, size, tau=tau, valid=valid)
        return Selection(critical, gate.astype(jnp.float32), log_prob)
    per_row = not isinstance(k, int)
    bound = dict(k_max=size) if per_row else {}
    if sra.selection == "gumbel_topk" and key is not None:
        indices = _gumbel_top_indices(logits, k, key=key, valid=valid, **bound)
        critical = _indices_to_mask(indices, n) & valid
        relaxed = sel.gumbel_topk(logits, k, key=key, tau=tau, hard=sra.hard, valid=valid, **bound)
        gate = relaxed.astype(jnp.float32)
    else:
        indices = _top_indices(logits, size, valid)
        if per_row:
            indices = jnp.where(jnp.arange(size) < k[:, None], indices, -1)
        critical = _indices_to_mask(indices, n) & valid
        gate = critical.astype(jnp.float32)
        if sra.selection == "sparsemax":
            # Invalid tokens get a large finite negative score (not -inf) so sparsemax stays finite.
            probs = sel.sparsemax(jnp.where(valid, logits / tau, -1e9), axis=-1)
            critical = critical & (probs > 0)
            gate = critical.astype(jnp.float32) + probs - jax.lax.stop_gradient(probs)
    log_prob = _topk_log_prob(logits, indices, valid)
    return Selection(critical, gate, log_prob)


def _check_segment_mode(sra: SRAConfig) -> None:
    if sra.selection not in ("topk", "gumbel_topk"):
        raise ValueError(f"per-segment selection (packed rows, segment_ids given) supports sra.selection 'topk' and "
                         f"'gumbel_topk', not {sra.selection!r}: its set is not a per-segment top-k (bernoulli caps "
                         f"a row, sparsemax normalises over a row); use one example per row")


def segment_select(
    logits: Float[Array, "b s"],
    segment_ids: Int[Array, "b s"],
    sra: SRAConfig,
    *,
    valid: Bool[Array, "b s"],
    key: jax.Array | None = None,
    tau: float | Float[Array, ""] | None = None,
) -> Selection:
    """Per-segment selection for packed rows: segment g of a row selects k_g = sra.num_critical(its valid tokens) of
    its own tokens, ranked only against them, exactly as if its example ran alone in its row: gumbel_topk with a key
    draws each segment independently (critical set, straight-through gate and Plackett-Luce log-prob those of
    `select` on the segment alone, given the same per-token Gumbel noise); topk (or no key) takes each segment's
    top-k_g. The log-prob of a row is the sum over its segments. topk and gumbel_topk only (others raise)."""
    _check_segment_mode(sra)
    tau = sra.tau if tau is None else tau
    counts = count_table(sra, logits.shape[-1])
    if sra.selection == "gumbel_topk" and key is not None:
        scores = logits + jax.random.gumbel(key, logits.shape, jnp.float32)
        critical = sel.segment_topk_mask(jax.lax.stop_gradient(scores), segment_ids, counts, valid=valid)
        gate = sel.segment_relaxed_topk(scores, segment_ids, counts, tau=tau, valid=valid)
        if sra.hard:
            gate = critical.astype(gate.dtype) + (gate - jax.lax.stop_gradient(gate))
        log_prob = sel.segment_topk_log_prob(logits, critical, segment_ids, order=scores, valid=valid)
        return Selection(critical, gate.astype(jnp.float32), log_prob)
    critical = sel.segment_topk_mask(logits, segment_ids, counts, valid=valid)
    log_prob = sel.segment_topk_log_prob(logits, critical, segment_ids, valid=valid)
    return Selection(critical, critical.astype(jnp.float32), log_prob)


def forced_selection(
    logits: Float[Array, "b s"],
    critical: Bool[Array, "b s"],
    k: int,
    *,
    valid: Bool[Array, "b s"],
    sra: SRAConfig | None = None,
    tau: float | Float[Array, ""] | None = None,
    segment_ids: Int[Array, "b s"] | None = None,
) -> Selection:
    """A caller-given critical set (static masks, RL replay, tests). Its log-prob: for sra.selection == "bernoulli"
    the exact Bernoulli log-prob with cap k (`ops.selection.bernoulli_log_prob`); otherwise the Plackett-Luce
    log-prob of the set ordered by the current logits, over each row's own set size (at most k draws): exact for the
    draw when the set was drawn in descending-logit order. With `segment_ids` (packed rows): the sum over segments of
    each segment's own Plackett-Luce log-prob (topk / gumbel_topk only)."""
    critical = critical & valid
    if segment_ids is not None:
        if sra is not None:
            _check_segment_mode(sra)
        log_prob = sel.segment_topk_log_prob(logits, critical, segment_ids, valid=valid)
        return Selection(critical, critical.astype(jnp.float32), log_prob)
    k = min(k, logits.shape[-1])
    if sra is not None and sra.selection == "bernoulli":
        tau = sra.tau if tau is None else tau
        log_prob = sel.bernoulli_log_prob(logits, critical, k, tau=tau, valid=valid)
        return Selection(critical, critical.astype(jnp.float32), log_prob)
    indices = jax.lax.top_k(jnp.where(critical, logits, -jnp.inf), k)[1]
    log_prob = sel.topk_log_prob(logits, indices, valid=valid, k=jnp.minimum(critical.sum(-1), k).astype(jnp.int32))
    return Selection(critical, critical.astype(jnp.float32), log_prob)


def decode_threshold(
    logits: Float[Array, "b s"], k: int | Int[Array, " b"], *, valid: Bool[Array, "b s"], k_max: int | None = None
) -> Float[Array, " b"]:
    """Score cut-off fixed at prefill: the k_row-th largest valid router score of each row (`k` an int or per-row
    counts under the static bound `k_max`, default s; the min(k_row, valid)-th when a row has fewer valid tokens;
    +inf for an all-padding row or k_row = 0), so a later token is critical iff score >= it."""
    size = _static_bound(k, logits.shape[-1], k_max)
    top = jax.lax.top_k(jnp.where(valid, logits, -jnp.inf), size)[0]
    num_valid = valid.sum(-1)
    count = jnp.minimum(k, num_valid)
    kth = jnp.clip(count - 1, 0, size - 1)
    threshold = jnp.take_along_axis(top, kth[:, None], axis=-1)[:, 0]
    return jnp.where(count > 0, threshold, jnp.inf)
