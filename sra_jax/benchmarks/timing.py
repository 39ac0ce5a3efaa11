"""Timing helpers shared by the attention benchmark scripts (`op_bench`, `compact_bench`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np


def time_call(fn: Callable, args: tuple, iters: int) -> tuple[float, float]:
    """(median milliseconds per call over `iters` timed calls, seconds of the first call: compile + one run). One
    untimed warm-up call sits between the first call and the timed ones."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3), first


def fwd_bwd(f: Callable) -> Callable:
    """`g(q, k, v, do, *rest)`: the gradients of `f(q, k, v, *rest)` in q, k, v for the output cotangent `do`."""

    def g(q, k, v, do, *rest):
        _, vjp = jax.vjp(lambda q, k, v: f(q, k, v, *rest), q, k, v)
        return vjp(do)

    return g
