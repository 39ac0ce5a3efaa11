"""Turning router scores into a critical set: Gumbel top-k (relaxed and straight-through), plain top-k,
the Plackett-Luce log-probability of an ordered selection (for the router's policy gradient), and sparsemax.

All math runs in float32 (or wider); results come back in the logits' dtype.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

# A finite stand-in for -inf: softmax / logsumexp over an all-masked row stay finite (no NaN in values or grads).
_MASKED = -1e30


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise ValueError(f"k must be a Python int (a static size), got {k!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k ({k}) must be in [1, n] where n ({n}) is the size of the last axis")


def _resolve_k(k, logits: Array, k_max: int | None) -> tuple[int, Array | None]:
    """(static size, per-row counts or None). A Python int k is one static size for every row; an integer array k
    (one entry per row, shape logits.shape[:-1]) is a per-row count under the static bound `k_max` (default n),
    clipped to [0, k_max] (a traced value cannot be checked)."""
    n = logits.shape[-1]
    if isinstance(k, int) and not isinstance(k, bool):
        _check_k(k, n)
        if k_max is not None and k_max != k:
            raise ValueError(f"k_max ({k_max}) is only for a per-row k array; with an int k ({k}) leave it out")
        return k, None
    if not hasattr(k, "dtype") or not jnp.issubdtype(k.dtype, jnp.integer):
        raise ValueError(f"k must be a Python int or an integer array of per-row counts, got {k!r}")
    if k.shape != logits.shape[:-1]:
        raise ValueError(f"per-row k shape {k.shape} must equal the logits' batch shape {logits.shape[:-1]}")
    bound = n if k_max is None else k_max
    _check_k(bound, n)
    return bound, jnp.clip(k, 0, bound).astype(jnp.int32)


def _valid_or_all(logits: Array, valid: Array | None) -> Array:
    if valid is None:
        return jnp.ones(logits.shape, bool)
    if valid.shape != logits.shape:
        raise ValueError(f"valid shape {valid.shape} must equal logits shape {logits.shape}")
    return valid


def indices_to_mask(indices: Int[Array, "*b k"], n: int) -> Bool[Array, "*b n"]:
    """k-hot boolean mask of `indices`, -1 entries ignored (scatter per row; O(n) memory per row, not O(n*k))."""
    flat = jnp.where(indices < 0, n, indices).reshape(-1, indices.shape[-1])
    rows = jax.vmap(lambda idx: jnp.zeros((n,), bool).at[idx].set(True, mode="drop"))(flat)
    return rows.reshape(*indices.shape[:-1], n)


def _first_k(indices: Array, k_rows: Array | None) -> Array:
    """`indices` with the entries at rank >= the row's count replaced by -1 (unchanged without per-row counts)."""
    if k_rows is None:
        return indices
    return jnp.where(jnp.arange(indices.shape[-1]) < k_rows[..., None], indices, -1)


def _masked_topk_indices(scores: Array, valid: Array, k: int) -> Array:
    """Indices of the k largest valid scores, in descending order (invalid ones only when fewer than k are valid)."""
    _, indices = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), k)
    return indices


def topk_mask(
    logits: Float[Array, "*b n"],
    k: int | Int[Array, "*b"],
    *,
    valid: Bool[Array, "*b n"] | None = None,
    k_max: int | None = None,
) -> Bool[Array, "*b n"]:
    """Deterministic top-k: True at the k largest valid logits (fewer when a row has fewer than k valid).

    `k` is an int, or an integer array with one count per row (each row keeps its own k largest; the static
    `k_max`, default n, bounds the counts so that shapes stay static)."""
    size, k_rows = _resolve_k(k, logits, k_max)
    return _topk_mask(logits, k_rows, _valid_or_all(logits, valid), size)


@partial(jax.jit, static_argnames=("size",))
def _topk_mask(logits: Array, k_rows: Array | None, valid: Array, size: int) -> Array:
    indices = _first_k(_masked_topk_indices(logits, valid, size), k_rows)
    return indices_to_mask(indices, logits.shape[-1]) & valid


def _gumbel_perturb(logits: Array, key: PRNGKeyArray) -> Array:
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return logits + jax.random.gumbel(key, logits.shape, logits.dtype)


def gumbel_perturb(logits: Float[Array, "*b n"], key: PRNGKeyArray) -> Float[Array, "*b n"]:
    """Logits (at least float32) plus standard Gumbel noise from `key`: the scores whose top-k (valid items, in
    descending order) is `gumbel_topk_indices`' draw."""
    return _gumbel_perturb(logits, key)


def gumbel_topk_indices(
    logits: Float[Array, "*b n"],
    k: int | Int[Array, "*b"],
    *,
    key: PRNGKeyArray,
    valid: Bool[Array, "*b n"] | None = None,
    k_max: int | None = None,
) -> Int[Array, "*b _"]:
    """An ordered Plackett-Luce draw of k items without replacement (Gumbel-top-k, Kool et al. 2019).

    Items come in descending perturbed score. If a row has fewer than k valid items, the tail holds invalid
    indices, which `topk_log_prob` ignores. With per-row counts (`k` an integer array, `k_max` the static bound,
    default n) the result has k_max columns and the entries after a row's own count are -1; the first k_row
    entries are exactly that row's draw of k_row items (the first draws of a Plackett-Luce ordering).
    """
    size, k_rows = _resolve_k(k, logits, k_max)
    return _gumbel_topk_indices(logits, k_rows, key, _valid_or_all(logits, valid), size)


@partial(jax.jit, static_argnames=("size",))
def _gumbel_topk_indices(logits: Array, k_rows: Array | None, key: Array, valid: Array, size: int) -> Array:
    return _first_k(_masked_topk_indices(_gumbel_perturb(logits, key), valid, size), k_rows)


def _row_reduce(x: Array, op: str) -> Array:
    """Reduce over the last axis, keeping it (size 1): the group of a token is its whole row."""
    return getattr(jnp, op)(x, axis=-1, keepdims=True)


def _relaxed_topk(scores: Array, valid: Array, k: int | Array, tau: float | Array, reduce=_row_reduce) -> Array:
    """Relaxed k-hot sigmoid((s - t) / tau), with the threshold t set so the entries sum to k (an int, or per-row
    counts with a trailing axis of 1).

    Unlike successive softmaxes (Xie & Ermon 2019), whose entries can exceed 1, this stays in [0, 1] with sum
    exactly k, and tends to the hard top-k as tau -> 0. t is found by bisection without gradient, then one
    Newton step on sum(sigmoid) = k is taken with gradient: at the root that step carries the implicit-function
    gradient dt/ds_i = sigmoid'_i / sum_j sigmoid'_j, so the relaxation's Jacobian respects the sum constraint.
    `reduce(x, op)` ("sum" / "min" / "max") gives each token the reduction over its group (default: its row;
    per packed segment see `segment_relaxed_topk`), so each group gets its own threshold.
    """
    count = reduce(valid.astype(jnp.int32), "sum")
    target = jnp.minimum(k, count).astype(scores.dtype)
    lowest = reduce(jnp.where(valid, scores, jnp.inf), "min")
    highest = reduce(jnp.where(valid, scores, -jnp.inf), "max")
    # sigmoid(+-40) is 1 / 0 in float32, so the root lies within 40 tau beyond the extreme scores.
    bounds = (lowest - 40.0 * tau, highest + 40.0 * tau)
    bounds = tuple(jnp.where(count > 0, bound, 0.0) for bound in jax.lax.stop_gradient(bounds))

    def soft_count(threshold):
        z = jnp.where(valid, (scores - threshold) / tau, -jnp.inf)
        return jax.nn.sigmoid(z), reduce(jax.nn.sigmoid(z), "sum")

    def bisect(_, interval):
        low, high = interval
        middle = 0.5 * (low + high)
        too_many = soft_count(middle)[1] > target
        return jnp.where(too_many, middle, low), jnp.where(too_many, high, middle)

    low, high = jax.lax.fori_loop(0, 60, bisect, jax.lax.stop_gradient(bounds))
    threshold = jax.lax.stop_gradient(0.5 * (low + high))
    probs, total = soft_count(threshold)
    slope = reduce(probs * (1.0 - probs), "sum") / tau
    # A flat slope means every valid entry is saturated (k >= count, handled below); dividing by 1 there keeps
    # the unused branch's gradient finite, since where() would turn its inf * 0 into NaN.
    threshold = threshold + (total - target) / jnp.where(slope > 1e-20, slope, 1.0)
    relaxed = soft_count(threshold)[0]
    # A row asked for nothing (k_row = 0) selects nothing.
    relaxed = jnp.where(target > 0, relaxed, 0.0)
    return jnp.where(target >= count, valid.astype(scores.dtype), relaxed)


def gumbel_topk(
    logits: Float[Array, "*b n"],
    k: int | Int[Array, "*b"],
    *,
    key: PRNGKeyArray,
    tau: float | Float[Array, ""] = 1.0,
    hard: bool = True,
    valid: Bool[Array, "*b n"] | None = None,
    k_max: int | None = None,
) -> Float[Array, "*b n"]:
    """Stochastic top-k selection of `logits + Gumbel noise`.

    soft (`hard=False`): a relaxed k-hot in [0, 1] summing to k (to the valid count if that is smaller).
    hard: forward is exactly the top-k of the perturbed logits among valid positions (k ones); the gradient
    is that of the soft relaxation (straight-through). Invalid positions are never selected.
    `k` is an int or an integer array of per-row counts (bounded by the static `k_max`, default n).
    """
    size, k_rows = _resolve_k(k, logits, k_max)
    if isinstance(tau, (int, float)) and not tau > 0:  # tau may also be a traced (annealed) value
        raise ValueError(f"tau ({tau}) must be > 0")
    return _gumbel_topk(logits, k_rows, key, tau, _valid_or_all(logits, valid), size, hard)


@partial(jax.jit, static_argnames=("size", "hard"))
def _gumbel_topk(logits, k_rows, key, tau, valid, size: int, hard: bool):
    scores = _gumbel_perturb(logits, key)
    soft = _relaxed_topk(scores, valid, size if k_rows is None else k_rows[..., None], tau)
    if hard:
        exact = _topk_mask(jax.lax.stop_gradient(scores), k_rows, valid, size).astype(soft.dtype)
        # Parenthesised so the forward value is exactly the 0/1 mask (soft - soft == 0, no rounding).
        soft = exact + (soft - jax.lax.stop_gradient(soft))
    return soft.astype(logits.dtype)


def topk_log_prob(
    logits: Float[Array, "*b n"],
    indices: Int[Array, "*b k"],
    *,
    valid: Bool[Array, "*b n"] | None = None,
    k: int | Int[Array, "*b"] | None = None,
) -> Float[Array, "*b"]:
    """Plackett-Luce log-probability of drawing `indices` in that order without replacement from softmax(logits)
    restricted to valid items: sum_t [logit(i_t) - logsumexp(logits of valid items not drawn before t)].

    Only the first `k` draws of each row count (`k`: an int or per-row counts; default all columns), so a
    per-row draw padded to a static width is scored as the draw of its own k_row items. Draws of invalid indices
    (the tail of a row with fewer than k valid items) and -1 entries contribute nothing.
    O(n + k): the normaliser at step t is logaddexp(items never drawn, draws t..k-1), a reverse cumulative
    logsumexp, so no subtraction of probabilities (which would cancel catastrophically) is needed.
    """
    n = logits.shape[-1]
    _check_k(indices.shape[-1], n)
    if k is not None and not isinstance(k, int):
        if not jnp.issubdtype(k.dtype, jnp.integer) or k.shape != logits.shape[:-1]:
            raise ValueError(f"k must be an int or integer counts of shape {logits.shape[:-1]}, got {k!r}")
    counts = indices.shape[-1] if k is None else k
    return _topk_log_prob(logits, indices, _valid_or_all(logits, valid), jnp.asarray(counts, jnp.int32))


@jax.jit
def _topk_log_prob(logits: Array, indices: Array, valid: Array, counts: Array) -> Array:
    n = logits.shape[-1]
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    safe = jnp.where(indices < 0, 0, indices)
    counted = jnp.arange(indices.shape[-1]) < counts[..., None]
    drawn_valid = (indices >= 0) & counted & jnp.take_along_axis(valid, safe, axis=-1)
    drawn = jnp.where(drawn_valid, jnp.take_along_axis(logits, safe, axis=-1), _MASKED)
    never_drawn = valid & ~indices_to_mask(jnp.where(drawn_valid, indices, n), n)
    rest = jax.nn.logsumexp(jnp.where(never_drawn, logits, _MASKED), axis=-1, keepdims=True)
    remaining = jnp.logaddexp(rest, jax.lax.cumlogsumexp(drawn, axis=drawn.ndim - 1, reverse=True))
    return jnp.sum(jnp.where(drawn_valid, drawn - remaining, 0.0), axis=-1)


@partial(jax.jit, static_argnames=("axis",))
def sparsemax(x: Float[Array, "*shape"], axis: int = -1) -> Float[Array, "*shape"]:
    """Sparsemax (Martins & Astudillo 2016): the Euclidean projection of x onto the simplex along `axis`.

    Sort-based closed form; autodiff through it gives the exact Jacobian diag(s) - s s^T / |S| (the support
    is chosen by comparisons, which carry no gradient, and the sort is a permutation).
    """
    dtype = x.dtype
    z = jnp.moveaxis(x.astype(jnp.promote_types(dtype, jnp.float32)), axis, -1)
    z_sorted = -jnp.sort(-z, axis=-1)
    ranks = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cumulative = jnp.cumsum(z_sorted, axis=-1)
    in_support = 1.0 + ranks * z_sorted > cumulative
    support_size = jnp.sum(in_support, axis=-1, keepdims=True)
    threshold = (jnp.take_along_axis(cumulative, support_size - 1, axis=-1) - 1.0) / support_size.astype(z.dtype)
    return jnp.moveaxis(jnp.maximum(z - threshold, 0.0), -1, axis).astype(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Bernoulli selection: the router decides how many tokens are critical (each one independently), under a static cap.
#
# Policy: token i (valid) is drawn with probability p_i = sigmoid(logit_i / tau); if more than k_max are drawn, the
# k_max with the highest logits are kept (ties broken by the lower index, as jax.lax.top_k does). The probability of
# the set S that is finally used is exact and tractable:
#   |S| <  k_max:  S was the whole draw:      prod_{i in S} p_i * prod_{j valid, not in S} (1 - p_j)
#   |S| == k_max:  the draw contained S and any extra drawn token ranked below every member of S:
#                  prod_{i in S} p_i * prod_{j valid, not in S, ranked above the lowest member of S} (1 - p_j)
# (tokens ranked below S may be drawn or not: their probabilities sum to 1). See `bernoulli_log_prob`.


def _rank_above(logits: Array, critical: Array) -> Array:
    """True where a token ranks above the lowest-ranked critical token of its row, in the order (logit descending,
    index ascending) that `jax.lax.top_k` uses; all False for a row with no critical token."""
    n = logits.shape[-1]
    index = jnp.arange(n)
    lowest = jnp.min(jnp.where(critical, logits, jnp.inf), axis=-1, keepdims=True)
    # among critical tokens tied at the lowest logit, the one with the largest index ranks last
    last_index = jnp.max(jnp.where(critical & (logits == lowest), index, -1), axis=-1, keepdims=True)
    return (logits > lowest) | ((logits == lowest) & (index < last_index))


def _cap_by_logit(drawn: Array, logits: Array, k_max: int) -> Array:
    """The `k_max` drawn tokens with the highest logits (all of them when at most k_max were drawn)."""
    n = logits.shape[-1]
    if k_max >= n:
        return drawn
    _, indices = jax.lax.top_k(jnp.where(drawn, logits, -jnp.inf), k_max)
    return indices_to_mask(indices, n) & drawn


def _check_tau(tau) -> None:
    if isinstance(tau, (int, float)) and not tau > 0:  # tau may also be a traced (annealed) value
        raise ValueError(f"tau ({tau}) must be > 0")


@partial(jax.jit, static_argnames=("k_max", "hard"))
def bernoulli_select(
    logits: Float[Array, "*b n"],
    k_max: int,
    *,
    key: PRNGKeyArray | None = None,
    tau: float | Float[Array, ""] = 1.0,
    hard: bool = True,
    valid: Bool[Array, "*b n"] | None = None,
) -> tuple[Bool[Array, "*b n"], Float[Array, "*b n"]]:
    """(critical, gate): an independent Bernoulli(sigmoid(logit / tau)) draw per valid token, capped at `k_max`.

    With a key the draw uses logistic noise L (the binary-concrete / Gumbel-sigmoid trick): a token is drawn iff
    logit / tau + L > 0, and the relaxed gate is sigmoid(logit / tau + L). `hard`: the gate's forward value is the
    capped 0/1 set and its gradient that of the relaxation (straight-through); otherwise the gate is the relaxation.
    Without a key the decision is deterministic, `logit > 0` (the mode of each Bernoulli), and the gate is the 0/1
    set (no gradient path). Invalid tokens are never critical; an empty set is allowed.
    """
    _check_k(k_max, logits.shape[-1])
    _check_tau(tau)
    valid = _valid_or_all(logits, valid)
    logits32 = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if key is None:
        critical = _cap_by_logit((logits32 > 0) & valid, logits32, k_max)
        return critical, critical.astype(logits.dtype)
    scores = logits32 / tau + jax.random.logistic(key, logits32.shape, logits32.dtype)
    critical = _cap_by_logit((jax.lax.stop_gradient(scores) > 0) & valid, logits32, k_max)
    soft = jnp.where(valid, jax.nn.sigmoid(scores), 0.0)
    if hard:
        soft = critical.astype(soft.dtype) + (soft - jax.lax.stop_gradient(soft))
    return critical, soft.astype(logits.dtype)


@partial(jax.jit, static_argnames=("k_max",))
def bernoulli_log_prob(
    logits: Float[Array, "*b n"],
    critical: Bool[Array, "*b n"],
    k_max: int,
    *,
    tau: float | Float[Array, ""] = 1.0,
    valid: Bool[Array, "*b n"] | None = None,
) -> Float[Array, "*b"]:
    """Exact log-probability that `bernoulli_select` (with a key) returns the set `critical`, given the cap k_max:
    sum of log p_i over critical tokens plus log(1 - p_j) over the non-critical valid tokens that could have displaced
    it (all of them when fewer than k_max are critical; those ranked above the lowest critical one when k_max are).
    Differentiable in the logits; invalid tokens contribute nothing. A set of more than k_max tokens is impossible
    under this policy; the formula then still returns the |S| == k_max expression (callers never pass one)."""
    _check_k(k_max, logits.shape[-1])
    _check_tau(tau)
    valid = _valid_or_all(logits, valid)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    critical = critical & valid
    log_p = jax.nn.log_sigmoid(logits / tau)
    log_not_p = jax.nn.log_sigmoid(-logits / tau)
    full = critical.sum(-1, keepdims=True) < k_max
    counted = valid & ~critical & (full | _rank_above(logits, critical))
    return jnp.sum(jnp.where(critical, log_p, 0.0) + jnp.where(counted, log_not_p, 0.0), axis=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Per-segment selection (sequence packing): a row holds several examples told apart by segment ids; each segment g
# selects counts[len_g] of its own valid tokens, ranked only against them, exactly as if it were alone in its row.
#
# Design: one stable sort of each row by (invalid last, segment id, ranking score descending, index ascending) puts
# every segment's tokens next to each other in the order `jax.lax.top_k` would draw them alone (it breaks ties by the
# lower index); a token's rank within its segment is its sorted position minus its segment's first position. Group
# reductions (sizes, the relaxed top-k's threshold, min / max) are segment sums over that first position, and the
# Plackett-Luce normalisers are a reverse cumulative logsumexp that restarts at each segment. O(n log n) per row and
# no static bound on the number of segments (ids may be any integers; a segment need not be contiguous).


class _Layout(NamedTuple):
    order: Array  # [*b, n] sorted position -> token index
    inverse: Array  # [*b, n] token index -> sorted position
    first: Array  # [*b, n] (sorted layout) position of the first token of the same group; groups are segments
    group: Array  # [*b, n] (token layout) group slot in [0, n) of a valid token, n for an invalid one


def _segment_layout(rank_by: Array, valid: Array, segment_ids: Array, drawn_first: Array | None = None) -> _Layout:
    """Sort each row by (invalid last, segment id, not drawn (when given), rank_by descending, index)."""
    n = rank_by.shape[-1]
    index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), rank_by.shape)
    invalid = (~valid).astype(jnp.int32)
    keys = [invalid, segment_ids.astype(jnp.int32)]
    if drawn_first is not None:
        keys.append((~drawn_first).astype(jnp.int32))
    keys += [-rank_by, index]
    order = jax.lax.sort(tuple(keys), dimension=-1, num_keys=len(keys))[-1]
    inverse = jnp.argsort(order, axis=-1)
    sorted_invalid = jnp.take_along_axis(invalid, order, axis=-1)
    sorted_segment = jnp.take_along_axis(segment_ids, order, axis=-1)
    changes = (sorted_invalid[..., 1:] != sorted_invalid[..., :-1]) | (sorted_segment[..., 1:] != sorted_segment[..., :-1])
    starts = jnp.concatenate([jnp.ones_like(changes[..., :1]), changes], axis=-1)
    position = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), rank_by.shape)
    first = jax.lax.cummax(jnp.where(starts, position, 0), axis=position.ndim - 1)
    group = jnp.where(valid, jnp.take_along_axis(first, inverse, axis=-1), n)
    return _Layout(order, inverse, first, group)


def _group_reduce(group: Array):
    """`reduce(x, op)` for `_relaxed_topk`: each token gets the op-reduction of x over its group (slot n = invalid)."""
    n = group.shape[-1]
    flat_group = group.reshape(-1, n)
    ops = dict(sum=jax.ops.segment_sum, min=jax.ops.segment_min, max=jax.ops.segment_max)

    def reduce(x: Array, op: str) -> Array:
        per_group = jax.vmap(lambda v, g: ops[op](v, g, num_segments=n + 1))(x.reshape(-1, n), flat_group)
        return jnp.take_along_axis(per_group, flat_group, axis=-1).reshape(x.shape)

    return reduce


def _check_segments(logits: Array, segment_ids: Array, counts: Array) -> None:
    if segment_ids.shape != logits.shape:
        raise ValueError(f"segment_ids shape {segment_ids.shape} must equal logits shape {logits.shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integers, got dtype {segment_ids.dtype}")
    if counts.ndim != 1 or counts.shape[0] != logits.shape[-1] + 1 or not jnp.issubdtype(counts.dtype, jnp.integer):
        raise ValueError(f"counts must be integers of shape ({logits.shape[-1] + 1},) (the count of a segment of "
                         f"each length 0..n), got shape {counts.shape} dtype {counts.dtype}")


def _segment_counts(layout: _Layout, valid: Array, counts: Array) -> Array:
    """counts[valid length of the token's segment], per token (token layout)."""
    length = _group_reduce(layout.group)(valid.astype(jnp.int32), "sum")
    return counts[length]


def segment_topk_mask(
    scores: Float[Array, "*b n"],
    segment_ids: Int[Array, "*b n"],
    counts: Int[Array, " m"],
    *,
    valid: Bool[Array, "*b n"] | None = None,
) -> Bool[Array, "*b n"]:
    """Per-segment top-k: True at the counts[len_g] largest valid scores of each segment g (len_g its valid tokens),
    ties broken by the lower index as `jax.lax.top_k` does, i.e. `topk_mask` of each segment run alone in its row.
    `counts` has n + 1 entries (the count for each segment length 0..n). Pass Gumbel-perturbed scores for a draw."""
    _check_segments(scores, segment_ids, counts)
    return _segment_topk_mask(scores, segment_ids, counts, _valid_or_all(scores, valid))


@jax.jit
def _segment_topk_mask(scores: Array, segment_ids: Array, counts: Array, valid: Array) -> Array:
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    layout = _segment_layout(scores, valid, segment_ids)
    n = scores.shape[-1]
    rank = jnp.take_along_axis(jnp.arange(n) - layout.first, layout.inverse, axis=-1)
    return valid & (rank < _segment_counts(layout, valid, counts))


def segment_relaxed_topk(
    scores: Float[Array, "*b n"],
    segment_ids: Int[Array, "*b n"],
    counts: Int[Array, " m"],
    *,
    tau: float | Float[Array, ""] = 1.0,
    valid: Bool[Array, "*b n"] | None = None,
) -> Float[Array, "*b n"]:
    """The relaxed k-hot of `relaxed_topk` per segment: each segment g gets its own threshold, its entries sum to
    counts[len_g], and values and gradients equal those of the segment run alone in its row."""
    _check_segments(scores, segment_ids, counts)
    _check_tau(tau)
    return _segment_relaxed_topk(scores, segment_ids, counts, tau, _valid_or_all(scores, valid))


@jax.jit
def _segment_relaxed_topk(scores, segment_ids, counts, tau, valid):
    dtype = scores.dtype
    scores = scores.astype(jnp.promote_types(dtype, jnp.float32))
    layout = _segment_layout(jax.lax.stop_gradient(scores), valid, segment_ids)
    k = _segment_counts(layout, valid, counts)
    return _relaxed_topk(scores, valid, k, tau, reduce=_group_reduce(layout.group)).astype(dtype)


def relaxed_topk(
    scores: Float[Array, "*b n"],
    k: int | Int[Array, "*b"],
    *,
    tau: float | Float[Array, ""] = 1.0,
    valid: Bool[Array, "*b n"] | None = None,
) -> Float[Array, "*b n"]:
    """The soft relaxation `gumbel_topk(hard=False)` computes, of given (already perturbed) scores: values in [0, 1]
    summing to k per row (to the valid count if smaller). `k` an int or per-row counts."""
    _check_tau(tau)
    size, k_rows = _resolve_k(k, scores, None)
    valid = _valid_or_all(scores, valid)
    dtype = scores.dtype
    scores = scores.astype(jnp.promote_types(dtype, jnp.float32))
    return _relaxed_topk(scores, valid, size if k_rows is None else k_rows[..., None], tau).astype(dtype)


def segment_topk_log_prob(
    logits: Float[Array, "*b n"],
    drawn: Bool[Array, "*b n"],
    segment_ids: Int[Array, "*b n"],
    *,
    order: Float[Array, "*b n"] | None = None,
    valid: Bool[Array, "*b n"] | None = None,
) -> Float[Array, "*b"]:
    """Sum over segments of the Plackett-Luce log-probability (`topk_log_prob`) of drawing the segment's `drawn`
    tokens, in descending `order` (default: the logits; for a Gumbel draw its perturbed scores, ties by the lower
    index), from softmax(logits) over the segment's valid tokens: the log-prob of independent per-segment draws.
    Invalid tokens are never drawn and never in a normaliser."""
    counts = jnp.zeros((logits.shape[-1] + 1,), jnp.int32)
    _check_segments(logits, segment_ids, counts)
    valid = _valid_or_all(logits, valid)
    order = logits if order is None else order
    if order.shape != logits.shape:
        raise ValueError(f"order shape {order.shape} must equal logits shape {logits.shape}")
    return _segment_topk_log_prob(logits, drawn & valid, segment_ids, order, valid)


@jax.jit
def _segment_topk_log_prob(logits, drawn, segment_ids, order, valid):
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    order = jax.lax.stop_gradient(order.astype(logits.dtype))
    layout = _segment_layout(order, valid, segment_ids, drawn_first=drawn)
    sorted_logits = jnp.take_along_axis(jnp.where(valid, logits, _MASKED), layout.order, axis=-1)
    sorted_drawn = jnp.take_along_axis(drawn, layout.order, axis=-1)
    # Position p is the last of its segment iff p + 1 starts another one (or p is the row's last position).
    last = jnp.concatenate([layout.first[..., 1:] != layout.first[..., :-1], jnp.ones_like(drawn[..., :1])], axis=-1)

    def combine(later, earlier):  # reverse scan: `later` accumulates positions above `earlier`
        later_value, later_flag = later
        value, flag = earlier
        return jnp.where(flag, value, jnp.logaddexp(later_value, value)), later_flag | flag

    # At drawn position p the tokens not yet drawn are exactly those at positions >= p of its segment.
    remaining, _ = jax.lax.associative_scan(combine, (sorted_logits, last), reverse=True, axis=logits.ndim - 1)
    return jnp.sum(jnp.where(sorted_drawn, sorted_logits - remaining, 0.0), axis=-1)


def decode_threshold(
    logits: Float[Array, "b s"], k: int | Int[Array, " b"], *, valid: Bool[Array, "b s"], k_max: int | None = None
) -> Float[Array, " b"]:
    """Score cut-off fixed at prefill: the k_row-th largest valid router score of each row (`k` an int or per-row
    counts under the static bound `k_max`, default s; the min(k_row, valid)-th when a row has fewer valid tokens;
    +inf for an all-padding row or k_row = 0), so a later token is critical iff score >= it."""
    size = static_bound(k, logits.shape[-1], k_max)
    top = jax.lax.top_k(jnp.where(valid, logits, -jnp.inf), size)[0]
    num_valid = valid.sum(-1)
    count = jnp.minimum(k, num_valid)
    kth = jnp.clip(count - 1, 0, size - 1)
    threshold = jnp.take_along_axis(top, kth[:, None], axis=-1)[:, 0]
    return jnp.where(count > 0, threshold, jnp.inf)


def static_bound(k: int | Int[Array, " b"], n: int, k_max: int | None) -> int:
    """Static selection width: k itself for an int k, else k_max (default n)."""
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    return n if k_max is None else k_max
