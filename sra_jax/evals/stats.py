"""Confidence intervals for accuracies, dependency-free (used by the evals, the demo and the experiments)."""

from __future__ import annotations

import math
from statistics import NormalDist

_Z95 = NormalDist().inv_cdf(0.975)


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion `correct / n` (no continuity correction)."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"wilson_interval needs 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    p, z2 = correct / n, _Z95 * _Z95
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)
