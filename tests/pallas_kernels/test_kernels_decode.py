"""Sparse decode (Triton kernel in interpret mode) against the dense reference: GQA 1/4/8, 1-4 new tokens, ragged
lengths, left padding (kv_start), repeated / out-of-range / -1 critical indices, empty critical lists, windows
longer than the cache, splits with nothing visible; and the reference itself against a float64 numpy oracle."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import TOL, decode_case, decode_oracle, qkv, rel_err

import pallas_kernels as pk

L, D = 64, 32


@functools.partial(
    jax.jit,
    static_argnames=("window", "num_global", "critical_sorted", "num_splits", "skip_empty", "combine", "backend"),
)
def _decode(q, kc, vc, lengths, critical, kv_start, counts=None, *, window, num_global, critical_sorted, num_splits,
            skip_empty, combine, backend):
    extra = (
        {"interpret": True, "num_splits": num_splits, "tile": 16, "critical_sorted": critical_sorted,
         "skip_empty": skip_empty, "combine": combine}
        if backend == "triton"
        else {}
    )
    return pk.sparse_decode_attention(
        q, kc, vc, lengths, window=window, num_global=num_global, critical_indices=critical, kv_start=kv_start,
        critical_counts=counts, backend=backend, **extra
    )


@settings(max_examples=12, deadline=None)
@given(
    group=st.sampled_from([1, 4, 8]),
    t=st.integers(1, 4),
    window=st.sampled_from([1, 5, 16, 100]),
    num_global=st.integers(0, 3),
    capacity=st.sampled_from([0, 7, 24]),
    critical_sorted=st.booleans(),
    num_splits=st.integers(1, 6),
    counted=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_sparse_decode_matches_reference(
    group, t, window, num_global, capacity, critical_sorted, num_splits, counted, seed
):
    """counted: only a prefix of each critical row is live (critical_counts); the entries past it hold live-looking
    slots, so reading them would change the output."""
    b, hkv = 2, 2 if group < 8 else 1
    rng = np.random.default_rng(seed)
    lengths, kv_start, critical, counts = decode_case(rng, b, t, L, capacity, critical_sorted, counted)
    q, kc, vc = qkv(jax.random.PRNGKey(seed), b, t, L, group * hkv, hkv, D, jnp.float32)
    args = (q, kc, vc, jnp.asarray(lengths, jnp.int32), None if critical is None else jnp.asarray(critical),
            jnp.asarray(kv_start, jnp.int32), None if counts is None else jnp.asarray(counts))
    kw = dict(window=window, num_global=num_global, critical_sorted=critical_sorted, num_splits=num_splits)
    variant = dict(skip_empty=bool(seed % 3), combine=("pallas", "xla")[seed % 2 == 0])
    out = _decode(*args, **kw, **variant, backend="triton")
    ref = _decode(*args, **kw, skip_empty=True, combine="pallas", backend="reference")
    assert rel_err(out, ref) < TOL[jnp.float32]
    oracle = decode_oracle(q, kc, vc, lengths, critical, kv_start, window, num_global, counts)
    assert rel_err(ref, oracle) < TOL[jnp.float32]


def test_left_padding_is_invisible_and_positions_shift():
    """A left-padded row gives the same output as the same tokens without padding (slots shifted by kv_start)."""
    pad, n, t, hq, hkv = 5, 40, 2, 4, 2
    q, kc, vc = qkv(jax.random.PRNGKey(3), 1, t, n, hq, hkv, D, jnp.float32)
    garbage = 1e3 * jnp.ones((1, pad, hkv, D), jnp.float32)  # would dominate any softmax it entered
    kc_pad, vc_pad = (jnp.concatenate([garbage, x], axis=1) for x in (kc, vc))
    crit = jnp.array([[3, 17, 17, -1]], jnp.int32)
    kw = dict(window=6, num_global=2, backend="triton", interpret=True, tile=16, num_splits=2)
    plain = pk.sparse_decode_attention(q, kc, vc, jnp.array([n]), critical_indices=crit, **kw)
    padded = pk.sparse_decode_attention(
        q, kc_pad, vc_pad, jnp.array([n + pad]), critical_indices=crit + pad * (crit >= 0),
        kv_start=jnp.array([pad]), **kw
    )
    assert rel_err(padded, plain) < TOL[jnp.float32]


def test_repeated_critical_indices_count_once():
    """Repeats (adjacent or not) give the output of the unique set, in the kernel and in the reference."""
    t, hq, hkv = 1, 8, 2
    q, kc, vc = qkv(jax.random.PRNGKey(5), 1, t, L, hq, hkv, D, jnp.float32)
    unique = jnp.array([[2, 9, 30, -1, -1, -1]], jnp.int32)
    repeated = jnp.array([[30, 9, 30, 2, 9, 30]], jnp.int32)
    kw = dict(window=4, num_global=1)
    want = pk.sparse_decode_attention(q, kc, vc, jnp.array([L]), critical_indices=unique, backend="reference", **kw)
    for backend, extra in (("reference", {}), ("triton", {"interpret": True, "tile": 16})):
        got = pk.sparse_decode_attention(
            q, kc, vc, jnp.array([L]), critical_indices=repeated, backend=backend, **kw, **extra
        )
        assert rel_err(got, want) < TOL[jnp.float32]


def test_critical_slot_in_the_band_stays_visible_to_later_new_tokens():
    # New tokens sit at 37, 38, 39 with window 4: slot 34 is in the first token's window but not in the later ones',
    # so the later tokens must still see it because it is critical (a regression: it used to be dropped for them).
    b, t, n, hq, hkv = 1, 3, 40, 4, 1
    q, kc, vc = qkv(jax.random.PRNGKey(7), b, t, n, hq, hkv, 64, jnp.float32)
    lengths = jnp.array([n])
    critical = jnp.array([[34, 10, -1]], jnp.int32)
    args = dict(window=4, num_global=1, critical_indices=critical)
    out = pk.sparse_decode_attention(q, kc, vc, lengths, backend="triton", interpret=True, num_splits=2, tile=16, **args)
    ref = pk.sparse_decode_attention(q, kc, vc, lengths, backend="reference", **args)
    assert rel_err(out, ref) < TOL[jnp.float32]


def test_decode_slots_list_each_read_slot_once():
    lengths = jnp.array([40, 40])
    slots, window_tiles = pk.decode.decode_slots(
        lengths,
        num_new=1,
        window=5,
        num_global=3,
        critical_indices=jnp.array([[1, 20, 37, 20, 39, -1], [1, 20, 37, 20, 39, -1]]),
        tile=8,
        kv_start=jnp.array([0, 2]),
    )
    listed = [sorted(int(x) for x in row if x >= 0) for row in np.asarray(slots)]
    assert listed == [[0, 1, 2, 20, 35, 36, 37, 38, 39], [2, 3, 4, 20, 35, 36, 37, 38, 39]]
    assert window_tiles == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=0), "window"),
        (dict(window=4, tile=24, backend="triton"), "tile"),
        (dict(window=4, num_global=-1), "num_global"),
        (dict(window=4, num_splits=0, backend="triton"), "num_splits"),
        (dict(window=4, backend="cuda"), "backend"),
        (dict(window=4, critical_counts=jnp.array([1])), "without critical_indices"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    q, kc, vc = qkv(jax.random.PRNGKey(0), 1, 1, 16, 2, 1, D, jnp.float32)
    with pytest.raises(ValueError, match=match):
        pk.sparse_decode_attention(q, kc, vc, jnp.array([16]), **kwargs)


def test_empty_critical_lists_match_no_list():
    """No list, a [b, 0] list and an all -1 list are the same problem (window + sinks only)."""
    b, t, hq, hkv = 2, 2, 4, 2
    q, kc, vc = qkv(jax.random.PRNGKey(11), b, t, L, hq, hkv, D, jnp.float32)
    lengths, kv_start = jnp.array([L, 30]), jnp.array([0, 4])
    kw = dict(window=5, num_global=2, kv_start=kv_start)
    want = pk.sparse_decode_attention(q, kc, vc, lengths, backend="reference", **kw)
    for crit in (None, jnp.zeros((b, 0), jnp.int32), jnp.full((b, 20), -1, jnp.int32)):
        got = pk.sparse_decode_attention(
            q, kc, vc, lengths, critical_indices=crit, backend="triton", interpret=True, tile=16, num_splits=2, **kw
        )
        assert rel_err(got, want) < TOL[jnp.float32]


def test_stacked_cache_layer_reads_that_layer():
    """layer= on a [layers, b, L, hkv, d] cache equals the same call on cache[layer] (kernel and reference), and a
    different layer gives a different answer (the index really selects)."""
    b, t, hq, hkv, layers = 2, 1, 4, 2, 3
    keys = jax.random.split(jax.random.PRNGKey(12), layers)
    q = qkv(keys[0], b, t, L, hq, hkv, D, jnp.float32)[0]
    kcs, vcs = zip(*(qkv(key, b, t, L, hq, hkv, D, jnp.float32)[1:] for key in keys))
    kc, vc = jnp.stack(kcs), jnp.stack(vcs)
    crit = jnp.array([[3, 9, 20, -1], [5, 7, -1, -1]])
    kw = dict(window=6, num_global=1, critical_indices=crit, kv_start=jnp.array([0, 2]), critical_sorted=True)
    lengths = jnp.array([L, 40])
    run = dict(backend="triton", interpret=True, tile=16, num_splits=2)
    for layer in (0, 2):
        want = pk.sparse_decode_attention(q, kc[layer], vc[layer], lengths, backend="reference", **kw)
        for backend_kw in (run, dict(backend="reference")):
            got = pk.sparse_decode_attention(q, kc, vc, lengths, layer=layer, **kw, **backend_kw)
            assert rel_err(got, want) < TOL[jnp.float32]
    other = pk.sparse_decode_attention(q, kc[1], vc[1], lengths, backend="reference", **kw)
    assert rel_err(other, want) > 1e-2
    with pytest.raises(ValueError, match="layer=3"):
        pk.sparse_decode_attention(q, kc, vc, lengths, layer=3, **kw)
    with pytest.raises(ValueError, match=r"\[b, L, hkv, d\]"):
        pk.sparse_decode_attention(q, kc, vc, lengths, **kw)


def test_stacked_cache_layers_share_one_triton_kernel():
    """Lowered for CUDA (on this CPU host), two layers of a stacked cache run the same decode kernel: the layer is
    an operand, not a constant baked into the kernel (a 32-layer model then compiles one decode kernel, not 32)."""
    q = jnp.zeros((1, 1, 4, D), jnp.bfloat16)
    kc = jnp.zeros((3, 1, L, 2, D), jnp.bfloat16)

    def step(q, kc, vc, lengths):
        kw = dict(window=16, backend="triton", combine="xla")
        return [pk.sparse_decode_attention(q, kc, vc, lengths, layer=layer, **kw) for layer in (0, 2)]

    text = jax.jit(step).trace(q, kc, kc, jnp.array([L])).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line.split("__gpu$xla.gpu.triton", 1)[1] for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
    assert len(calls) == 2
    assert len({re.sub(r"%[\w#:.-]+", "%", call) for call in calls}) == 1


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nonfinite_slots_reach_only_the_new_tokens_that_see_them(backend):
    """3 new tokens in slots 37..39: NaN in the k and v of slot 39 (the last new token: the first two cannot see it), inf
    in the v of a left-padding slot and of an empty slot past the length. The first two new tokens give exactly the
    clean output; the last one sees slot 39 and gives NaN. Both combine paths for the kernel."""
    q, kc, vc = qkv(jax.random.PRNGKey(21), 1, 3, L, 8, 2, D, jnp.float32)
    lengths, kv_start = jnp.array([40]), jnp.array([2])
    critical = jnp.array([[5, 20, 39, -1]])
    bad_k, bad_v = kc.at[:, 39].set(jnp.nan), vc.at[:, 39].set(jnp.nan).at[:, jnp.array([0, 50])].set(jnp.inf)
    kw = dict(window=6, num_global=1, critical_sorted=False, num_splits=3, skip_empty=False, backend=backend)
    for combine in ("pallas", "xla") if backend == "triton" else ("xla",):
        got = _decode(q, kc=bad_k, vc=bad_v, lengths=lengths, critical=critical, kv_start=kv_start, combine=combine,
                      **kw)
        want = _decode(q, kc=kc, vc=vc, lengths=lengths, critical=critical, kv_start=kv_start, combine=combine, **kw)
        np.testing.assert_array_equal(got[:, :2], want[:, :2])
        assert np.isnan(np.asarray(got[:, 2])).all()
