"""Specs for sra_jax.ops.selection: Gumbel top-k, plain top-k, Plackett-Luce log-prob, sparsemax."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from jaxtyping import TypeCheckError

from sra_jax.ops.selection import (gumbel_topk, gumbel_topk_indices, relaxed_topk, segment_relaxed_topk,
                                   segment_topk_log_prob, segment_topk_mask, sparsemax, topk_log_prob, topk_mask)


def _logits(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """Random logits from numpy: jax.random would compile once per shape."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 2.0, jnp.float32)


@st.composite
def rows_with_padding(draw):
    """(logits [b, n], valid [b, n], k) with at least k valid positions in every row."""
    # Few distinct shapes: each new shape costs a compile.
    b, n = 3, draw(st.sampled_from([5, 12]))
    k = draw(st.sampled_from([1, 4]))
    seed = draw(st.integers(0, 2**16))
    valid = np.random.default_rng(seed).random((b, n)) < 0.7
    for row in valid:  # force k valid positions per row
        if row.sum() < k:
            row[np.flatnonzero(~row)[: k - row.sum()]] = True
    return _logits(seed, (b, n)), jnp.asarray(valid), k, seed


@settings(max_examples=10)  # each (b, n, k) is a compile
@given(rows_with_padding())
def test_hard_gumbel_topk_has_exactly_k_ones_and_never_picks_invalid(case):
    logits, valid, k, seed = case
    hard = gumbel_topk(logits, k, key=jax.random.key(seed), valid=valid)
    assert set(np.unique(np.asarray(hard))) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(hard).sum(-1), k)
    assert not np.any(np.asarray(hard)[~np.asarray(valid)])


@settings(max_examples=10)  # each (b, n, k) is a compile
@given(rows_with_padding())
def test_soft_gumbel_topk_is_in_unit_interval_and_sums_to_k(case):
    logits, valid, k, seed = case
    soft = np.asarray(gumbel_topk(logits, k, key=jax.random.key(seed), valid=valid, hard=False, tau=0.5))
    assert np.all((soft >= 0) & (soft <= 1))
    # float32 sum of <= 12 entries after a Newton-refined threshold: 1e-4 is ~100 ulps of k.
    np.testing.assert_allclose(soft.sum(-1), k, atol=1e-4)
    assert not np.any(soft[~np.asarray(valid)])


def test_hard_gumbel_topk_equals_topk_of_perturbed_logits_for_the_same_key():
    logits, key = _logits(0, (4, 16)), jax.random.key(7)
    order = gumbel_topk_indices(logits, 5, key=key)
    hard = gumbel_topk(logits, 5, key=key)
    expected = np.zeros((4, 16))
    np.put_along_axis(expected, np.asarray(order), 1.0, axis=-1)
    np.testing.assert_array_equal(hard, expected)


@pytest.mark.parametrize("hard", [True, False])
def test_gumbel_topk_gradients_reach_the_logits_and_are_finite(hard):
    logits, valid = _logits(1, (3, 10)), jnp.arange(10) < 8
    weights = jnp.arange(10.0)

    def loss(x):
        return jnp.sum(gumbel_topk(x, 3, key=jax.random.key(2), valid=jnp.broadcast_to(valid, x.shape), hard=hard) * weights)

    grad = np.asarray(jax.grad(loss)(logits))
    assert np.all(np.isfinite(grad))
    assert np.all(np.abs(grad[:, :8]).sum(-1) > 0)
    np.testing.assert_array_equal(grad[:, 8:], 0.0)  # padding gets no gradient


def test_gumbel_topk_gradients_are_finite_when_k_saturates_the_valid_count():
    valid = jnp.broadcast_to(jnp.arange(6) < 2, (2, 6))
    grad = jax.grad(lambda x: jnp.sum(gumbel_topk(x, 3, key=jax.random.key(0), valid=valid) ** 2))(_logits(3, (2, 6)))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_soft_gumbel_topk_approaches_hard_as_tau_goes_to_zero():
    logits, key = _logits(4, (8, 20)), jax.random.key(5)
    hard = np.asarray(gumbel_topk(logits, 6, key=key))
    errors = [np.abs(np.asarray(gumbel_topk(logits, 6, key=key, tau=tau, hard=False)) - hard).max() for tau in (1.0, 0.1, 1e-4)]
    assert errors[0] > errors[1] > errors[2]
    # With tau = 1e-4 an entry differs from 0/1 only if its score is within ~1e-3 of the threshold.
    assert errors[2] < 1e-2


def test_topk_mask_picks_the_largest_valid_logits():
    logits = jnp.array([[0.1, 3.0, 2.0, 5.0, -1.0]])
    valid = jnp.array([[True, True, True, False, True]])
    np.testing.assert_array_equal(topk_mask(logits, 2, valid=valid), [[False, True, True, False, False]])


@pytest.mark.parametrize("k", [0, 6])
def test_k_outside_one_to_n_is_rejected(k):
    with pytest.raises(ValueError, match=r"k \(\d\) must be in \[1, n\]"):
        gumbel_topk(jnp.zeros((2, 5)), k, key=jax.random.key(0))
    with pytest.raises(ValueError, match="must be in"):
        topk_mask(jnp.zeros((2, 5)), k)


def _brute_force_log_prob(logits: np.ndarray, order: tuple[int, ...], valid: np.ndarray) -> float:
    """prod_t p(order_t | not drawn yet), written as a plain product of probabilities."""
    weights, prob = np.exp(logits.astype(np.float64)) * valid, 1.0
    for item in order:
        prob *= weights[item] / weights.sum()
        weights[item] = 0.0
    return math.log(prob)


@pytest.mark.parametrize("n,k", [(1, 1), (3, 2), (4, 4), (5, 2), (6, 3)])
def test_plackett_luce_probabilities_of_all_ordered_draws_sum_to_one(n, k):
    logits = _logits(n * 10 + k, (n,))
    draws = jnp.asarray(list(itertools.permutations(range(n), k)))
    log_probs = topk_log_prob(jnp.broadcast_to(logits, (len(draws), n)), draws)
    # float32 logsumexp per term; summing <= 120 probabilities keeps the error ~1e-6.
    np.testing.assert_allclose(np.exp(np.asarray(log_probs, np.float64)).sum(), 1.0, rtol=1e-5)
    expected = [_brute_force_log_prob(np.asarray(logits), tuple(d), np.ones(n)) for d in np.asarray(draws)]
    np.testing.assert_allclose(log_probs, expected, rtol=1e-5, atol=1e-5)


def test_plackett_luce_over_valid_items_only_sums_to_one_and_ignores_invalid_draws():
    n, k = 6, 2
    logits, valid = _logits(9, (n,)), np.array([True, False, True, True, False, True])
    draws = jnp.asarray(list(itertools.permutations(np.flatnonzero(valid), k)))
    log_probs = topk_log_prob(jnp.broadcast_to(logits, (len(draws), n)), draws, valid=jnp.broadcast_to(valid, (len(draws), n)))
    np.testing.assert_allclose(np.exp(np.asarray(log_probs, np.float64)).sum(), 1.0, rtol=1e-5)
    # A tail draw of an invalid index (fewer valid items than k) contributes nothing.
    only = jnp.array([[True, False, False]])
    np.testing.assert_allclose(topk_log_prob(jnp.array([[0.3, 1.0, 2.0]]), jnp.array([[0, 1]]), valid=only), [0.0], atol=1e-6)


def test_plackett_luce_log_prob_is_stable_for_extreme_logits():
    logits = jnp.array([[200.0, 0.0, -200.0, 100.0]])
    log_prob = topk_log_prob(logits, jnp.array([[0, 3, 1]]))
    # The exact value is -log(1 + e^-100 + ...) - log(1 + e^-100 + ...) - log(1 + e^-200) ~ -e^-100: 0 in float32.
    np.testing.assert_allclose(log_prob, [0.0], atol=1e-6)
    grad = jax.grad(lambda x: topk_log_prob(x, jnp.array([[2, 1, 0]])).sum())(logits)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_gumbel_topk_indices_are_distinct_valid_and_ordered_by_perturbed_score():
    logits, valid = _logits(11, (5, 9)), np.random.default_rng(3).random((5, 9)) < 0.8
    valid[:, :3] = True
    indices = np.asarray(gumbel_topk_indices(logits, 3, key=jax.random.key(4), valid=jnp.asarray(valid)))
    for row, row_valid in zip(indices, valid):
        assert len(set(row)) == 3 and row_valid[row].all()


def test_sparsemax_matches_the_closed_form_on_known_inputs():
    # z = (1, 2, 0.1): support {2} since 1 + 2 * 1 = 3 > 3 fails, so p = (0, 1, 0).
    np.testing.assert_allclose(sparsemax(jnp.array([1.0, 2.0, 0.1])), [0.0, 1.0, 0.0])
    # z = (0.5, 0.4, -1): support {0, 1}, tau = (0.9 - 1) / 2 = -0.05, p = (0.55, 0.45, 0).
    np.testing.assert_allclose(sparsemax(jnp.array([0.5, 0.4, -1.0])), [0.55, 0.45, 0.0], rtol=1e-6)
    # Equal inputs: uniform.
    np.testing.assert_allclose(sparsemax(jnp.zeros(4)), [0.25] * 4)


@settings(max_examples=10)
@given(st.integers(0, 2**16), st.sampled_from([2, 7]), st.sampled_from([0, 1]))
def test_sparsemax_sums_to_one_and_is_sparse(seed, n, axis):
    x = _logits(seed, (3, n) if axis == 1 else (n, 3)) * 3
    p = np.asarray(sparsemax(x, axis=axis))
    x = np.asarray(x)
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis), 1.0, rtol=1e-5)  # float32 sums of <= 10 terms
    # The largest entry is always in the support; entries below max - 1 never are.
    assert np.all((p > 0) >= (x == x.max(axis, keepdims=True)))
    assert not np.any(p[x < x.max(axis, keepdims=True) - 1])


def test_sparsemax_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        x = jnp.array([[0.5, 0.4, -1.0, 0.45], [1.2, 0.0, 0.9, 1.0]], jnp.float64)
        # float64 central differences away from support changes: check_grads' default tolerances hold.
        check_grads(lambda z: sparsemax(jnp.asarray(z)) * jnp.arange(1.0, 5.0), (x,), order=1, modes=("rev", "fwd"))


# --- Bernoulli selection (the router picks how many tokens, under a static cap) --------------------------------------

from sra_jax.ops.selection import bernoulli_log_prob, bernoulli_select  # noqa: E402


def _bernoulli_outcomes(valid: np.ndarray, k_max: int):
    """Every set the capped Bernoulli policy can return: subsets of the valid tokens with at most k_max members."""
    idx = np.flatnonzero(valid)
    for size in range(min(k_max, idx.size) + 1):
        for members in itertools.combinations(idx, size):
            mask = np.zeros(valid.shape, bool)
            mask[list(members)] = True
            yield mask


def test_bernoulli_log_prob_matches_a_hand_computation():
    logits, tau = jnp.array([1.0, -0.5, 2.0, 0.0]), 0.5
    p = 1 / (1 + np.exp(-np.asarray(logits) / tau))
    # fewer than k_max = 3 critical: the whole draw was {0, 1}; every other valid token was not drawn
    got = bernoulli_log_prob(logits, jnp.array([True, True, False, False]), 3, tau=tau)
    np.testing.assert_allclose(got, np.log(p[0] * p[1] * (1 - p[2]) * (1 - p[3])), rtol=1e-6)
    # exactly k_max = 2 critical, {0, 3}: ranked by logit 2 > 0 > 3 > 1, the lowest kept is token 3 (logit 0);
    # token 2 ranks above it and must not have been drawn; token 1 ranks below and is free.
    got = bernoulli_log_prob(logits, jnp.array([True, False, False, True]), 2, tau=tau)
    np.testing.assert_allclose(got, np.log(p[0] * p[3] * (1 - p[2])), rtol=1e-6)
    # padding contributes nothing
    got = bernoulli_log_prob(logits, jnp.array([True, False, False, False]), 3, tau=tau,
                             valid=jnp.array([True, True, False, True]))
    np.testing.assert_allclose(got, np.log(p[0] * (1 - p[1]) * (1 - p[3])), rtol=1e-6)


@pytest.mark.parametrize(("k_max", "ties"), [(1, False), (2, False), (2, True), (5, False)])
def test_bernoulli_probabilities_of_every_possible_set_sum_to_one(k_max, ties):
    logits = jnp.array([0.7, -0.3, 0.7, 1.5, -2.0]) if ties else _logits(3, (5,))
    valid = np.array([True, True, True, True, False])
    total = sum(math.exp(bernoulli_log_prob(logits, jnp.asarray(s), k_max, tau=0.8, valid=jnp.asarray(valid)))
                for s in _bernoulli_outcomes(valid, k_max))
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)


def test_bernoulli_samples_follow_the_log_prob():
    """The sampler and the log-prob describe the same policy: empirical set frequencies match exp(log_prob)."""
    logits, k_max, tau, draws = jnp.array([0.5, -0.2, 1.0, 0.1]), 2, 0.7, 20000
    keys = jax.random.split(jax.random.key(0), draws)
    sets = np.asarray(jax.vmap(lambda k: bernoulli_select(logits, k_max, key=k, tau=tau)[0])(keys))
    codes = sets @ (1 << np.arange(4))
    for outcome in _bernoulli_outcomes(np.ones(4, bool), k_max):
        prob = math.exp(bernoulli_log_prob(logits, jnp.asarray(outcome), k_max, tau=tau))
        freq = np.mean(codes == outcome @ (1 << np.arange(4)))
        # binomial standard error sqrt(p(1-p)/n) <= 0.0035; 5 sigma
        assert abs(freq - prob) < 5 * math.sqrt(prob * (1 - prob) / draws) + 1e-4, (outcome, freq, prob)


@settings(max_examples=10, deadline=None)
@given(rows_with_padding())
def test_bernoulli_respects_the_cap_and_never_picks_invalid(case):
    logits, valid, k, seed = case
    for key in (jax.random.key(seed), None):
        critical, gate = bernoulli_select(logits + 3.0, k, key=key, valid=valid)  # most tokens drawn: cap binds
        critical = np.asarray(critical)
        assert np.all(critical.sum(-1) <= k) and not critical[~np.asarray(valid)].any()
        np.testing.assert_array_equal(np.asarray(gate), critical.astype(np.float32))
    # without a key: logit > 0, keeping the k highest logits when more are positive
    critical = np.asarray(bernoulli_select(logits, k, valid=valid)[0])
    positive = np.asarray(valid) & (np.asarray(logits) > 0)
    order = np.argsort(-np.where(positive, np.asarray(logits), -np.inf), axis=-1, kind="stable")[:, :k]
    want = np.zeros_like(positive)
    np.put_along_axis(want, order, True, axis=-1)
    np.testing.assert_array_equal(critical, want & positive)


def test_bernoulli_gate_is_hard_forward_and_binary_concrete_backward():
    logits, key, tau = _logits(5, (2, 6)), jax.random.key(11), 0.5
    weights = jnp.arange(12.0).reshape(2, 6)
    critical, gate = bernoulli_select(logits, 6, key=key, tau=tau)
    np.testing.assert_array_equal(gate, np.asarray(critical, np.float32))
    # the draw is the threshold of the relaxation at 0: logit / tau + L > 0 with L the key's logistic noise
    scores = np.asarray(logits) / tau + np.asarray(jax.random.logistic(key, logits.shape))
    np.testing.assert_array_equal(critical, scores > 0)
    grad = jax.grad(lambda x: (bernoulli_select(x, 6, key=key, tau=tau)[1] * weights).sum())(logits)
    s = 1 / (1 + np.exp(-scores))
    np.testing.assert_allclose(grad, np.asarray(weights) * s * (1 - s) / tau, rtol=1e-5, atol=1e-7)
    soft = bernoulli_select(logits, 6, key=key, tau=tau, hard=False)[1]
    np.testing.assert_allclose(soft, s, rtol=1e-6)


def test_bernoulli_empty_selection_has_a_finite_log_prob_and_gradient():
    logits = jnp.full((2, 5), -4.0)
    critical, _ = bernoulli_select(logits, 2, key=jax.random.key(0), tau=0.1)
    assert not np.asarray(critical).any()
    lp, grad = jax.value_and_grad(lambda x: bernoulli_log_prob(x, critical, 2, tau=0.1).sum())(logits)
    np.testing.assert_allclose(lp, 10 * np.log1p(-1 / (1 + np.exp(40.0))), rtol=1e-6)
    assert np.all(np.isfinite(grad))


# --- per-row k: each row selects its own count (k_row = ceil(fraction * valid_row) in the model) --------------------


@st.composite
def ragged_rows(draw):
    """(logits [b, n], valid [b, n], k_rows [b] in [0, valid_row], seed): rows with very different valid counts,
    some all padding, as a left-padded batch has."""
    b, n = 4, draw(st.sampled_from([6, 11]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, n + 1, b)
    counts[0] = n  # one full row, so the static bound (k_max = n) is reached by some row
    valid = np.arange(n)[None, :] >= n - counts[:, None]  # left padding
    k_rows = np.array([rng.integers(0 if c == 0 else 1, c + 1) for c in counts])
    return _logits(seed, (b, n)), jnp.asarray(valid), jnp.asarray(k_rows, jnp.int32), seed


@settings(max_examples=15, deadline=None)
@given(ragged_rows())
def test_per_row_k_selects_exactly_k_row_valid_tokens_in_every_mode(case):
    logits, valid, k_rows, seed = case
    key = jax.random.key(seed)
    hard = np.asarray(gumbel_topk(logits, k_rows, key=key, valid=valid))
    top = np.asarray(topk_mask(logits, k_rows, valid=valid))
    indices = np.asarray(gumbel_topk_indices(logits, k_rows, key=key, valid=valid))
    soft = np.asarray(gumbel_topk(logits, k_rows, key=key, valid=valid, hard=False, tau=0.5))
    for row in range(logits.shape[0]):
        k, row_valid = int(k_rows[row]), np.asarray(valid[row])
        assert hard[row].sum() == k and top[row].sum() == k
        assert not hard[row][~row_valid].any() and not top[row][~row_valid].any()
        # plain top-k: the k largest valid logits
        masked = np.where(row_valid, np.asarray(logits[row]), -np.inf)
        np.testing.assert_array_equal(np.flatnonzero(top[row]), np.sort(np.argsort(-masked, kind="stable")[:k]))
        # the ordered draw: k distinct valid indices, then -1; the same set as the hard mask of the same key
        drawn = indices[row, :k]
        assert len(set(drawn)) == k and row_valid[drawn].all() and np.all(indices[row, k:] == -1)
        np.testing.assert_array_equal(np.sort(drawn), np.flatnonzero(hard[row]))
        # relaxed: in [0, 1], summing to k_row (1e-4: ~100 float32 ulps of k after the Newton-refined threshold)
        assert np.all((soft[row] >= 0) & (soft[row] <= 1)) and not soft[row][~row_valid].any()
        np.testing.assert_allclose(soft[row].sum(), k, atol=1e-4)


def test_per_row_k_equal_to_an_int_gives_the_int_result():
    logits, valid = _logits(5, (3, 9)), jnp.asarray(np.random.default_rng(5).random((3, 9)) < 0.8).at[:, :4].set(True)
    key = jax.random.key(2)
    same = jnp.full((3,), 3, jnp.int32)
    np.testing.assert_array_equal(topk_mask(logits, same, valid=valid, k_max=3), topk_mask(logits, 3, valid=valid))
    np.testing.assert_array_equal(gumbel_topk(logits, same, key=key, valid=valid, k_max=4),
                                  gumbel_topk(logits, 3, key=key, valid=valid))
    np.testing.assert_array_equal(gumbel_topk_indices(logits, same, key=key, valid=valid, k_max=3),
                                  gumbel_topk_indices(logits, 3, key=key, valid=valid))


def test_per_row_k_straight_through_gradient_flows_only_to_rows_that_select():
    logits, key = _logits(8, (3, 7)), jax.random.key(1)
    valid = jnp.ones((3, 7), bool).at[2].set(False)  # row 2 is all padding: k_row = 0
    k_rows = jnp.array([1, 5, 0], jnp.int32)
    weights = jnp.asarray(np.random.default_rng(8).standard_normal((3, 7)), jnp.float32)
    grad = np.asarray(jax.grad(lambda x: (gumbel_topk(x, k_rows, key=key, valid=valid, tau=0.7) * weights).sum())(logits))
    assert np.all(np.isfinite(grad))
    assert np.abs(grad[0]).sum() > 0 and np.abs(grad[1]).sum() > 0
    np.testing.assert_array_equal(grad[2], 0.0)
    # The relaxed k-hot keeps sum = k_row, so its Jacobian rows sum to zero: d(sum gate)/d logits = 0 per row.
    row_sum_grad = jax.grad(lambda x: gumbel_topk(x, k_rows, key=key, valid=valid, tau=0.7).sum())(logits)
    np.testing.assert_allclose(row_sum_grad, 0.0, atol=1e-5)


def test_per_row_k_outside_its_contract_is_rejected():
    logits = jnp.zeros((2, 5))
    # Wrong shape / dtype: the ValueError, or under the test suite's jaxtyping hook its annotation check first.
    with pytest.raises((ValueError, TypeCheckError)):
        topk_mask(logits, jnp.array([1, 2, 3]))
    with pytest.raises((ValueError, TypeCheckError)):
        topk_mask(logits, jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"k \(6\) must be in \[1, n\]"):
        topk_mask(logits, jnp.array([1, 2]), k_max=6)
    with pytest.raises(ValueError, match="only for a per-row k"):
        gumbel_topk(logits, 2, key=jax.random.key(0), k_max=3)
    with pytest.raises((ValueError, TypeCheckError)):
        topk_log_prob(logits, jnp.zeros((2, 2), jnp.int32), k=jnp.array([1.0, 1.0]))


@settings(max_examples=15, deadline=None)
@given(ragged_rows())
def test_per_row_log_prob_counts_only_the_first_k_row_draws(case):
    """vs a hand computation in float64: prod over the first k_row draws of p(item | not drawn yet), over valid
    items; whatever follows (-1 padding, or the rest of a longer ordering) is ignored."""
    logits, valid, k_rows, seed = case
    full = gumbel_topk_indices(logits, logits.shape[-1], key=jax.random.key(seed), valid=valid)
    padded = gumbel_topk_indices(logits, k_rows, key=jax.random.key(seed), valid=valid)
    from_full = np.asarray(topk_log_prob(logits, full, valid=valid, k=k_rows))
    from_padded = np.asarray(topk_log_prob(logits, padded, valid=valid))
    for row in range(logits.shape[0]):
        k = int(k_rows[row])
        want = _brute_force_log_prob(np.asarray(logits[row]), tuple(np.asarray(full[row, :k])), np.asarray(valid[row]))
        # float32 logsumexp per term over <= 11 terms: 1e-5 relative.
        np.testing.assert_allclose([from_full[row], from_padded[row]], [want, want], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k_rows", [(1, 2, 3, 0), (3, 1, 2, 2)])
def test_per_row_log_probs_of_all_draws_of_each_rows_size_sum_to_one(k_rows):
    """Enumeration on tiny n: for each row, every ordered draw of k_row of its valid items (padded to the static
    width with -1) has a probability, and they sum to 1 (k_row = 0: the empty draw, probability 1)."""
    n, width = 5, 3
    valid = np.array([[True] * 5, [False, True, True, True, True], [False, False, True, True, True], [False] * 5])
    if k_rows[3]:
        valid[3, 2:] = True
    logits = _logits(21, (4, n))
    for row, k in enumerate(k_rows):
        draws = [list(p) + [-1] * (width - k) for p in itertools.permutations(np.flatnonzero(valid[row]), k)]
        m = len(draws)
        log_probs = topk_log_prob(jnp.broadcast_to(logits[row], (m, n)), jnp.asarray(draws, jnp.int32),
                                  valid=jnp.broadcast_to(valid[row], (m, n)), k=jnp.full((m,), k, jnp.int32))
        np.testing.assert_allclose(np.exp(np.asarray(log_probs, np.float64)).sum(), 1.0, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Per-segment selection (packed rows): each segment behaves exactly like its example alone in a row.


def _count_table(fraction: float, n: int) -> jnp.ndarray:
    table = np.clip(np.ceil(fraction * np.arange(n + 1) - 1e-9), 1, None).astype(np.int32)
    table[0] = 0
    return jnp.asarray(table)


@st.composite
def packed_rows(draw):
    """(scores, logits, segment_ids, valid, counts): rows of 1-4 segments (ids 1.. in order, any id per row may be
    shuffled so segments need not be contiguous) then padding; scores on a coarse grid half the time (ties)."""
    b, n = draw(st.integers(1, 3)), draw(st.integers(2, 14))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((b, n), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, n + 1), size=min(n, draw(st.integers(1, 4))), replace=False))
        start = 0
        for g, end in enumerate(cuts, start=1):
            segment_ids[r, start:end] = g
            start = end
        if draw(st.booleans()):
            segment_ids[r] = rng.permutation(segment_ids[r])
    valid = segment_ids > 0
    scale = 0.5 if draw(st.booleans()) else 0.0
    logits = rng.normal(size=(b, n)).astype(np.float32)
    scores = logits + rng.gumbel(size=(b, n)).astype(np.float32)
    if scale:
        logits, scores = np.round(logits / scale) * scale, np.round(scores / scale) * scale
    counts = _count_table(draw(st.sampled_from([0.1, 0.3, 0.5, 1.0])), n)
    return jnp.asarray(scores), jnp.asarray(logits), jnp.asarray(segment_ids), jnp.asarray(valid), counts


def _alone(segment_ids):
    return [(r, np.flatnonzero(np.asarray(segment_ids)[r] == g))
            for r in range(segment_ids.shape[0]) for g in np.unique(np.asarray(segment_ids)[r]) if g > 0]


@settings(max_examples=20, deadline=None)
@given(packed_rows())
def test_each_segment_selects_what_its_example_selects_alone_in_a_row(case):
    scores, logits, segment_ids, valid, counts = case
    mask = np.asarray(segment_topk_mask(scores, segment_ids, counts, valid=valid))
    soft = np.asarray(segment_relaxed_topk(scores, segment_ids, counts, tau=0.5, valid=valid))
    log_prob = np.asarray(segment_topk_log_prob(logits, jnp.asarray(mask), segment_ids, order=scores, valid=valid))
    want_log_prob = np.zeros(scores.shape[0])
    for r, where in _alone(segment_ids):
        k = int(counts[where.size])
        alone_scores, alone_logits = scores[r, where][None], logits[r, where][None]
        np.testing.assert_array_equal(mask[r, where], np.asarray(topk_mask(alone_scores, k))[0])
        # The same float32 ops on the same values; only the group sums' order may differ: a few ulps.
        np.testing.assert_allclose(soft[r, where], np.asarray(relaxed_topk(alone_scores, k, tau=0.5))[0], atol=1e-5)
        indices = jax.lax.top_k(alone_scores, k)[1]
        want_log_prob[r] += float(topk_log_prob(alone_logits, indices)[0])
    assert not mask[~np.asarray(valid)].any() and (soft[~np.asarray(valid)] == 0).all()
    # f32 sums over up to 14 terms of magnitude < ~30: rtol 1e-5 with a small absolute floor.
    np.testing.assert_allclose(log_prob, want_log_prob, rtol=1e-5, atol=1e-5)


def test_segment_relaxation_gradient_is_that_of_each_segment_alone():
    rng = np.random.default_rng(3)
    scores = jnp.asarray(rng.normal(size=(1, 11)), jnp.float32)
    segment_ids = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0]])
    weights = jnp.asarray(rng.normal(size=(1, 11)), jnp.float32)
    counts = _count_table(0.3, 11)
    packed = jax.grad(lambda s: jnp.sum(weights * segment_relaxed_topk(s, segment_ids, counts, tau=0.7,
                                                                        valid=segment_ids > 0)))(scores)
    for where in (np.arange(4), np.arange(4, 10)):
        k = int(counts[where.size])
        alone = jax.grad(lambda s: jnp.sum(weights[:, where] * relaxed_topk(s, k, tau=0.7)))(scores[:, where])  # noqa: B023 - called in this iteration
        np.testing.assert_allclose(packed[:, where], alone, atol=1e-6)
        assert np.abs(np.asarray(alone)).max() > 1e-3  # a real gradient, not two zeros
    assert packed[0, 10] == 0


def test_segment_log_prob_differs_from_one_top_k_over_the_whole_row():
    # Segment 1 holds the row's two largest logits: a row top-2 takes both, per-segment top-1 takes one from each.
    logits = jnp.asarray([[5.0, 4.0, 0.0, -1.0]])
    segment_ids = jnp.asarray([[1, 1, 2, 2]])
    counts = jnp.asarray([0, 1, 1, 2, 2], jnp.int32)
    mask = segment_topk_mask(logits, segment_ids, counts)
    np.testing.assert_array_equal(mask, [[True, False, True, False]])
    want = jax.nn.log_softmax(logits[0, :2])[0] + jax.nn.log_softmax(logits[0, 2:])[0]
    np.testing.assert_allclose(segment_topk_log_prob(logits, mask, segment_ids), [want], rtol=1e-6)


def test_segment_selection_rejects_bad_input():
    logits = jnp.zeros((2, 5))
    segment_ids = jnp.ones((2, 5), jnp.int32)
    counts = _count_table(0.5, 5)
    # Wrong shape / dtype: the ValueError, or under the test suite's jaxtyping hook its annotation check first.
    with pytest.raises((ValueError, TypeCheckError)):
        segment_topk_mask(logits, segment_ids[:, :4], counts)
    with pytest.raises((ValueError, TypeCheckError)):
        segment_topk_mask(logits, segment_ids.astype(jnp.float32), counts)
    with pytest.raises(ValueError, match=r"counts must be integers of shape \(6,\)"):
        segment_relaxed_topk(logits, segment_ids, counts[:5])
    with pytest.raises(ValueError, match=r"tau \(0.0\) must be > 0"):
        segment_relaxed_topk(logits, segment_ids, counts, tau=0.0)
