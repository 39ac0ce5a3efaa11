"""The dependency-free Wilson interval equals scipy's (scipy is a test-time reference here)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from sra_jax.evals.stats import wilson_interval


@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_equals_scipy(case):
    correct, n = case
    ci = scipy_stats.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    # Same closed form; scipy takes z from its own normal quantile: agreement to float64 round-off.
    assert wilson_interval(correct, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


@pytest.mark.parametrize("correct, n", [(0, 0), (-1, 5), (6, 5)])
def test_wilson_interval_refuses_impossible_counts(correct, n):
    with pytest.raises(ValueError, match="correct"):
        wilson_interval(correct, n)
