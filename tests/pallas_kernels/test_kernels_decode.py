"""Sparse decode (Triton kernel in interpret mode) against the reference: ragged cache lengths, several new
tokens, GQA rows sharing one tile, duplicates between sinks and critical indices, splits with nothing visible."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import TOL, qkv, rel_err

import pallas_kernels as pk


@functools.partial(jax.jit, static_argnames=("backend",))
def _decode(q, kc, vc, lengths, critical, backend):
    extra = {"interpret": True, "num_splits": 3, "tile": 16} if backend == "triton" else {}
    return pk.sparse_decode_attention(
        q, kc, vc, lengths, window=8, num_global=2, critical_indices=critical, backend=backend, **extra
    )


@settings(max_examples=5)
@given(len0=st.integers(1, 96), len1=st.integers(1, 96), seed=st.integers(0, 999))
def test_sparse_decode_matches_reference_gqa4_two_new_tokens(len0, len1, seed):
    b, t, L, hq, hkv, d = 2, 2, 96, 8, 2, 64
    q, kc, vc = qkv(jax.random.PRNGKey(seed), b, t, L, hq, hkv, d, jnp.float32)
    lengths = jnp.array([max(len0, t), max(len1, t)])
    rng = np.random.default_rng(seed)
    # Unique indices per row (the API's contract), some past the length, some among the sinks, -1 padding.
    critical = np.stack(
        [np.where(rng.random(12) < 0.8, rng.choice(L, 12, replace=False), -1) for _ in range(b)]
    )
    out = _decode(q, kc, vc, lengths, jnp.asarray(critical, jnp.int32), backend="triton")
    ref = _decode(q, kc, vc, lengths, jnp.asarray(critical, jnp.int32), backend="reference")
    assert rel_err(out, ref) < TOL[jnp.float32]


def test_decode_slots_list_each_visible_slot_once():
    lengths = jnp.array([40])
    slots, window_tiles = pk.decode.decode_slots(
        lengths, num_new=1, window=5, num_global=3, critical_indices=jnp.array([[1, 20, 37, 39, -1]]), tile=8
    )
    listed = sorted(int(x) for x in np.asarray(slots)[0] if x >= 0)
    assert listed == [0, 1, 2, 20, 35, 36, 37, 38, 39]
    assert window_tiles == 1


def test_critical_slot_in_the_band_stays_visible_to_later_new_tokens():
    # New tokens sit at 37, 38, 39 with window 4: slot 34 is in the first token's window but not in the later ones',
    # so the later tokens must still see it because it is critical (a regression: it used to be dropped for them).
    b, t, L, hq, hkv, d = 1, 3, 40, 4, 1, 64
    q, kc, vc = qkv(jax.random.PRNGKey(7), b, t, L, hq, hkv, d, jnp.float32)
    lengths = jnp.array([L])
    critical = jnp.array([[34, 10, -1]], jnp.int32)
    args = dict(window=4, num_global=1, critical_indices=critical)
    out = pk.sparse_decode_attention(q, kc, vc, lengths, backend="triton", interpret=True, num_splits=2, tile=16, **args)
    ref = pk.sparse_decode_attention(q, kc, vc, lengths, backend="reference", **args)
    assert rel_err(out, ref) < TOL[jnp.float32]
