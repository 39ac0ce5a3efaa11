"""Turning router scores into a critical set: Gumbel top-k (relaxed and straight-through), plain top-k,
the Plackett-Luce log-probability of an ordered selection (for the router's policy gradient), and sparsemax.

All math runs in float32 (or wider); results come back in the logits' dtype.
"""

from __future__ import annotations

from functools import partial

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


def _indices_to_mask(indices: Int[Array, "*b k"], n: int) -> Bool[Array, "*b n"]:
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
    return _indices_to_mask(indices, logits.shape[-1]) & valid


def _gumbel_perturb(logits: Array, key: PRNGKeyArray) -> Array:
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return logits + jax.random.gumbel(key, logits.shape, logits.dtype)


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


def _relaxed_topk(scores: Array, valid: Array, k: int | Array, tau: float | Array) -> Array:
    """Relaxed k-hot sigmoid((s - t) / tau), with the threshold t set so the entries sum to k (an int, or per-row
    counts with a trailing axis of 1).

    Unlike successive softmaxes (Xie & Ermon 2019), whose entries can exceed 1, this stays in [0, 1] with sum
    exactly k, and tends to the hard top-k as tau -> 0. t is found by bisection without gradient, then one
    Newton step on sum(sigmoid) = k is taken with gradient: at the root that step carries the implicit-function
    gradient dt/ds_i = sigmoid'_i / sum_j sigmoid'_j, so the relaxation's Jacobian respects the sum constraint.
    """
    count = jnp.sum(valid, axis=-1, keepdims=True)
    target = jnp.minimum(k, count).astype(scores.dtype)
    lowest = jnp.min(jnp.where(valid, scores, jnp.inf), axis=-1, keepdims=True)
    highest = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=-1, keepdims=True)
    # sigmoid(+-40) is 1 / 0 in float32, so the root lies within 40 tau beyond the extreme scores.
    bounds = (lowest - 40.0 * tau, highest + 40.0 * tau)
    bounds = tuple(jnp.where(count > 0, bound, 0.0) for bound in jax.lax.stop_gradient(bounds))

    def soft_count(threshold):
        z = jnp.where(valid, (scores - threshold) / tau, -jnp.inf)
        return jax.nn.sigmoid(z), jnp.sum(jax.nn.sigmoid(z), axis=-1, keepdims=True)

    def bisect(_, interval):
        low, high = interval
        middle = 0.5 * (low + high)
        too_many = soft_count(middle)[1] > target
        return jnp.where(too_many, middle, low), jnp.where(too_many, high, middle)

    low, high = jax.lax.fori_loop(0, 60, bisect, jax.lax.stop_gradient(bounds))
    threshold = jax.lax.stop_gradient(0.5 * (low + high))
    probs, total = soft_count(threshold)
    slope = jnp.sum(probs * (1.0 - probs), axis=-1, keepdims=True) / tau
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
    never_drawn = valid & ~_indices_to_mask(jnp.where(drawn_valid, indices, n), n)
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
    return _indices_to_mask(indices, n) & drawn


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
