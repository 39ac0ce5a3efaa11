"""The sort-free threshold top-k of the DSA indexer (`ops.dsa.indexer_top_k` impl="threshold") against the one-shot
`top_k_keys(indexer_scores(...))`: the same set of keys per query and the same valid slots, over lengths, batch,
top_k beyond the visible keys, ties (integer-valued scores), fully masked rows, padding and packed segments; and its
pieces (`order_key`, `kth_largest_key`, `compact_top_k`) against `jax.lax.top_k` on raw float rows."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sra_jax.ops import dsa


def _sets(idx, valid):
    """Per query: the sorted selected keys and the sorted valid keys (-1 fills the invalid slots)."""
    idx, valid = np.asarray(idx), np.asarray(valid)
    return np.sort(idx, -1), np.sort(np.where(valid, idx, -1), -1)


def assert_same_selection(got, want):
    g, w = _sets(*got), _sets(*want)
    np.testing.assert_array_equal(g[1], w[1])  # the valid keys
    np.testing.assert_array_equal(g[0], w[0])  # all slots: invalid ones hold the same lowest-index -inf keys


@functools.partial(jax.jit, static_argnames=("top_k", "query_chunk", "radix_bits"))
def _both(qi, ki, wi, pos, seg, *, top_k, query_chunk, radix_bits):
    want = dsa.top_k_keys(dsa.indexer_scores(qi, ki, wi, pos, seg), top_k)
    got = dsa.indexer_top_k(qi, ki, wi, pos, seg, top_k=top_k, impl="threshold", query_chunk=query_chunk,
                            radix_bits=radix_bits)  # fmt: skip
    return got, want


@st.composite
def _rows(draw, b, s):
    """Per row: a packed layout of segments (positions restart at each), a padded tail (position -1); row 0 may be
    all padding (every query fully masked)."""
    pos, seg = np.zeros((b, s), np.int32), np.zeros((b, s), np.int32)
    for r in range(b):
        cuts = sorted(draw(st.lists(st.integers(1, s - 1), max_size=2, unique=True))) if s > 1 else []
        pad = draw(st.integers(0, s))
        start = 0
        for n, end in enumerate([*cuts, s]):
            pos[r, start:end], seg[r, start:end] = np.arange(end - start), n
            start = end
        pos[r, s - pad :] = -1
    return jnp.asarray(pos), jnp.asarray(seg)


# (batch, length, top_k, query_chunk, radix_bits): one compile each; values, layouts and ties vary per example.
# A single token; chunks that do not divide the length; top_k beyond the length; the automatic chunk.
CONFIGS = [(1, 1, 4, None, 2), (2, 13, 4, 5, 1), (3, 9, 30, 2, 4), (1, 24, 9, None, 4)]


@given(data=st.data(), config=st.sampled_from(CONFIGS), integer=st.booleans(), seed=st.integers(0, 2**30))
def test_threshold_top_k_equals_one_shot(data, config, integer, seed):
    b, s, top_k, query_chunk, radix_bits = config
    pos, seg = data.draw(_rows(b, s))
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    shapes = ((b, s, 2, 4), (b, s, 4), (b, s, 2))
    if integer:  # small integers: exact scores, many ties (and zeros from the ReLU)
        qi, ki, wi = (jax.random.randint(k_, sh, -2, 3).astype(jnp.float32) for k_, sh in zip(ks, shapes))
    else:
        qi, ki, wi = (jax.random.normal(k_, sh) for k_, sh in zip(ks, shapes))
    got, want = _both(qi, ki, wi, pos, seg, top_k=top_k, query_chunk=query_chunk, radix_bits=radix_bits)
    assert got[0].shape == got[1].shape == (b, s, min(top_k, s))
    assert_same_selection(got, want)


@functools.partial(jax.jit, static_argnames=("kk", "radix_bits"))
def _select_row(x, *, kk, radix_bits):
    u = dsa.order_key(x)
    t = dsa.kth_largest_key(u, kk, radix_bits)
    vals, idx = jax.lax.top_k(x, kk)
    return t, dsa.order_key(vals[:, -1]), dsa.compact_top_k(u, kk, t), idx


@given(
    vals=st.lists(
        st.one_of(st.sampled_from([-np.inf, -0.0, 0.0, 1.0, -1.0, 3.5, np.inf]), st.floats(width=32, allow_nan=False)),
        min_size=12, max_size=12,
    ),  # fmt: skip
    kk_bits=st.sampled_from([(1, 1), (5, 2), (7, 4), (12, 2)]),
)
def test_kth_largest_and_compaction_match_lax_top_k(vals, kk_bits):
    kk, radix_bits = kk_bits
    x = jnp.asarray(np.array(vals, np.float32).reshape(1, 12))
    t, want_t, idx, want_idx = _select_row(x, kk=kk, radix_bits=radix_bits)
    assert int(t[0]) == int(want_t[0])
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(want_idx), -1))
    assert (np.diff(np.asarray(idx), axis=-1) > 0).all()  # ascending key index


def test_order_key_is_monotone():
    x = np.array([-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38, np.inf], np.float32)
    u = np.asarray(dsa.order_key(jnp.asarray(x)))
    assert (np.diff(u.astype(np.int64)) > 0).all()


def test_threshold_top_k_batch_rows_are_independent_and_grad_safe():
    # a row's selection does not depend on the other rows; the selection has no gradient and tracing one is fine
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    qi, ki, wi = jax.random.normal(ks[0], (2, 10, 2, 4)), jax.random.normal(ks[1], (2, 10, 4)), jnp.ones((2, 10, 2))
    pos = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
    both = dsa.indexer_top_k(qi, ki, wi, pos, top_k=3, query_chunk=4)
    one = dsa.indexer_top_k(qi[1:], ki[1:], wi[1:], pos[1:], top_k=3, query_chunk=4)
    np.testing.assert_array_equal(np.asarray(both[0][1:]), np.asarray(one[0]))
    g = jax.grad(lambda qi: (dsa.indexer_top_k(qi, ki, wi, pos, top_k=3)[0] * 1.0).sum() + qi.sum())(qi)
    np.testing.assert_array_equal(np.asarray(g), 1.0)


def test_threshold_bad_arguments():
    qi, ki, wi = jnp.zeros((1, 4, 2, 4)), jnp.zeros((1, 4, 4)), jnp.zeros((1, 4, 2))
    pos = jnp.arange(4)[None]
    with pytest.raises(ValueError, match="impl"):
        dsa.indexer_top_k(qi, ki, wi, pos, top_k=2, impl="radix")
    with pytest.raises(ValueError, match="query_chunk"):
        dsa.indexer_top_k(qi, ki, wi, pos, top_k=2, query_chunk=0)
    with pytest.raises(ValueError, match="radix_bits"):
        dsa.indexer_top_k(qi, ki, wi, pos, top_k=2, radix_bits=3)
    with pytest.raises(ValueError, match="top_k"):
        dsa.indexer_top_k(qi, ki, wi, pos, top_k=0)
