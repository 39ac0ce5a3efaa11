"""Sparse decode, TPU backend (Pallas Mosaic, decode/tpu.py) in TPU interpret mode on CPU against the dense reference
and a float64 oracle: GQA 1/4/8, 1-4 new tokens, ragged lengths, left padding, repeated / out-of-range / -1 critical
entries, empty lists, critical_counts, windows longer than the cache, splits; bf16 with a stacked cache (layer=);
a race-detector run of the double-buffered DMAs; and lowering for the TPU platform on CPU.

TPU interpret mode fills fresh VMEM with NaN and performs a DMA only when it is waited on, so a read of an unfilled
buffer row or a missing wait shows up as NaN or stale values. Each compile costs ~7 s here: the hypothesis test
draws the static shape per example and several dynamic cases (lengths, kv_start, lists, counts) per compile."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu
from kernel_testing import TOL, decode_case, decode_oracle, qkv, rel_err

import pallas_kernels as pk
from pallas_kernels.decode import api, tpu

L, D = 64, 64


@functools.partial(jax.jit, static_argnames=("window", "num_global", "critical_sorted", "num_splits", "backend"))
def _decode(q, kc, vc, lengths, critical, kv_start, counts, *, window, num_global, critical_sorted, num_splits,
            backend):
    extra = {"interpret": True, "num_splits": num_splits, "tile": 16} if backend == "tpu" else {}
    return pk.sparse_decode_attention(
        q, kc, vc, lengths, window=window, num_global=num_global, critical_indices=critical, kv_start=kv_start,
        critical_counts=counts, critical_sorted=critical_sorted, backend=backend, **extra
    )


@settings(max_examples=5, deadline=None)
@given(
    group=st.sampled_from([1, 4, 8]),
    t=st.integers(1, 4),
    window=st.sampled_from([1, 5, 16, 100]),
    num_global=st.integers(0, 3),
    capacity=st.sampled_from([0, 7, 40]),
    critical_sorted=st.booleans(),
    num_splits=st.integers(1, 3),
    counted=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.float16]),
    seed=st.integers(0, 10_000),
)
def test_tpu_decode_matches_reference_and_float64_oracle(
    group, t, window, num_global, capacity, critical_sorted, num_splits, counted, dtype, seed
):
    """f32 and f16 (computed in f32 in the kernel: TOL[f16] covers the output's rounding to f16)."""
    b, hkv = 2, 2 if group < 8 else 1
    rng = np.random.default_rng(seed)
    q, kc, vc = qkv(jax.random.PRNGKey(seed), b, t, L, group * hkv, hkv, D, dtype)
    kw = dict(window=window, num_global=num_global, critical_sorted=critical_sorted, num_splits=num_splits)
    for _ in range(2):  # same shapes: one compile, two dynamic cases
        lengths, kv_start, critical, counts = decode_case(rng, b, t, L, capacity, critical_sorted, counted)
        ints = (None if x is None else jnp.asarray(x, jnp.int32) for x in (lengths, critical, kv_start, counts))
        args = (q, kc, vc, *ints)
        out = _decode(*args, **kw, backend="tpu")
        ref = _decode(*args, **kw, backend="reference")
        assert out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype]
        oracle = decode_oracle(q, kc, vc, lengths, critical, kv_start, window, num_global, counts)
        assert rel_err(out, oracle) < TOL[dtype]


def test_tpu_decode_bf16_stacked_cache_reads_only_its_layer():
    """bf16, head_dim 128, GQA 4, a [layers, b, L, hkv, d] cache read in place at
    layer=1 while the other layers hold NaN. Tolerance TOL[bf16]: the kernel rounds P to bf16 before P @ V."""
    layers, b, t, hq, hkv, d = 3, 2, 2, 8, 2, 128
    q, kc, vc = qkv(jax.random.PRNGKey(11), b, t, L, hq, hkv, d, jnp.bfloat16)
    nan = jnp.full((layers, b, L, hkv, d), jnp.nan, jnp.bfloat16)
    k_stack, v_stack = nan.at[1].set(kc), nan.at[1].set(vc)
    lengths, kv_start = jnp.array([L, 37]), jnp.array([0, 4])
    critical = jnp.array([[40, 2, 2, 17, -1, 63], [5, 30, -1, -1, 9, 36]], jnp.int32)
    kw = dict(window=8, num_global=2, critical_indices=critical, kv_start=kv_start)
    out = pk.sparse_decode_attention(
        q, k_stack, v_stack, lengths, layer=1, backend="tpu", interpret=True, tile=32, **kw
    )
    ref = pk.sparse_decode_attention(q, kc, vc, lengths, backend="reference", **kw)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < TOL[jnp.bfloat16]
    used = np.asarray(critical)
    oracle = decode_oracle(q, kc, vc, np.asarray(lengths), used, np.asarray(kv_start), 8, 2)
    assert rel_err(out, oracle) < TOL[jnp.bfloat16]


def test_tpu_decode_auto_on_tpu_dispatches_here_and_repeats_count_once(monkeypatch):
    """backend="auto" on a TPU platform runs this kernel (the platform faked; interpret=True keeps it on CPU), and a
    list with repeats (adjacent or not, unsorted) gives the output of its unique set."""
    t, hq, hkv = 1, 8, 2
    q, kc, vc = qkv(jax.random.PRNGKey(5), 1, t, L, hq, hkv, D, jnp.float32)
    unique = jnp.array([[2, 9, 30, -1, -1, -1]], jnp.int32)
    repeated = jnp.array([[30, 9, 30, 2, 9, 30]], jnp.int32)
    kw = dict(window=4, num_global=1)
    want = pk.sparse_decode_attention(q, kc, vc, jnp.array([L]), critical_indices=unique, backend="reference", **kw)
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(tpu, "decode_partials", functools.partial(_counting, tpu.decode_partials, calls))
    got = pk.sparse_decode_attention(
        q, kc, vc, jnp.array([L]), critical_indices=repeated, interpret=True, tile=16, **kw
    )
    assert calls == [1]
    assert rel_err(got, want) < TOL[jnp.float32]


def _counting(fn, calls, *args, **kwargs):
    calls.append(1)
    return fn(*args, **kwargs)


def test_tpu_decode_double_buffered_dmas_have_no_races():
    """The interpreter's happens-before race detector over the kernel's DMAs and buffer reads: the next unit's copies
    go to the other buffer while this one computes, and every read of a buffer follows the wait of its copies."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter

    b, t, hq, hkv = 1, 2, 4, 1
    q, kc, vc = qkv(jax.random.PRNGKey(2), b, t, L, hq, hkv, D, jnp.float32)
    lengths, kv_start = jnp.array([50]), jnp.array([3])
    critical = api.sort_critical(jnp.array([[7, 8, -1, 21, 22, 23, 30, 1, 40]], jnp.int32))
    params = pltpu.InterpretParams(detect_races=True)
    o, lse = tpu.decode_partials(
        q, kc, vc, lengths, kv_start, critical, None, window=5, num_global=2, sm_scale=None, num_splits=2, tile=16,
        interpret=params,
    )
    o.block_until_ready()
    assert interpreter.races is not None and not interpreter.races.races_found
    out = api.combine_splits(o, lse, q.shape, q.dtype, combine="xla")
    ref = pk.sparse_decode_attention(
        q, kc, vc, lengths, window=5, num_global=2, critical_indices=critical, kv_start=kv_start, backend="reference"
    )
    assert rel_err(out, ref) < TOL[jnp.float32]


def test_tpu_decode_lowers_for_the_tpu_platform_on_cpu():
    # As in test_kernels_tpu: register a chip description (v5e) for the "cpu" device kind so that jax can lower the
    # Mosaic kernel here. This checks jax's lowering (block shapes, scalar prefetch, DMAs, semaphores) only: the TPU
    # compiler itself never runs on this machine.
    from jax._src.pallas.mosaic import tpu_info

    tpu_info.registry.setdefault("cpu", lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
    layers, b, t, hq, hkv, d, cache = 2, 2, 1, 32, 8, 128, 1024
    q = jnp.zeros((b, t, hq, d), jnp.bfloat16)
    k = jnp.zeros((layers, b, cache, hkv, d), jnp.bfloat16)
    lengths = jnp.array([cache, 700])
    critical = jnp.zeros((b, 103), jnp.int32)
    counts = jnp.array([50, 103])

    def step(q, k, v, lengths, critical, counts):
        return [
            pk.sparse_decode_attention(
                q, k, v, lengths, window=256, num_global=4, critical_indices=critical, critical_counts=counts,
                critical_sorted=True, layer=layer, backend="tpu", tile=128,
            )
            for layer in (0, 1)
        ]

    lowered = jax.jit(step).trace(q, k, k, lengths, critical, counts).lower(lowering_platforms=("tpu",))
    calls = [line for line in lowered.as_text().splitlines() if "tpu_custom_call" in line]
    assert len(calls) == 2
    # The layer is a scalar-prefetch operand: both layers' calls carry one and the same kernel.
    assert len({re.sub(r"%[\w#:.-]+", "%", line.split("tpu_custom_call", 1)[1]) for line in calls}) == 1


def test_tpu_decode_nonfinite_slots_reach_only_the_new_tokens_that_see_them():
    """3 new tokens in slots 37..39: NaN k and v in slot 39 (the first two new tokens cannot see it; it shares their
    band tile), inf v in a left-padding slot and in an empty slot past the length (both copied with the band's
    tiles). The first two new tokens give exactly the clean output; the last one sees slot 39 and gives NaN."""
    q, kc, vc = qkv(jax.random.PRNGKey(22), 1, 3, L, 8, 2, D, jnp.float32)
    lengths, kv_start = jnp.array([40]), jnp.array([34])
    critical = jnp.array([[5, 20, 39, -1]])
    bad_k = kc.at[:, 39].set(jnp.nan)
    bad_v = vc.at[:, 39].set(jnp.nan).at[:, jnp.array([33, 41])].set(jnp.inf)
    kw = dict(window=6, num_global=1, critical_sorted=False, num_splits=2, backend="tpu")
    got = _decode(q, bad_k, bad_v, lengths, critical, kv_start, None, **kw)
    want = _decode(q, kc, vc, lengths, critical, kv_start, None, **kw)
    np.testing.assert_array_equal(got[:, :2], want[:, :2])
    assert np.isnan(np.asarray(got[:, 2])).all()
