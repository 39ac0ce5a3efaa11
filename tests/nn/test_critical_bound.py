"""The static critical-key bound (`SRAMaskSpec.max_critical`) the SRA layer builds is a true bound in every case:
the gather implementation, which gathers exactly max_critical critical keys and drops any beyond, matches the dense
reference on the same weights and inputs (prefill into a cache, chunked prefill, decode, packed rows, static masks,
forced sets), and the arithmetic behind the packed bound holds for any segment lengths."""

from __future__ import annotations

import math
from functools import partial

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_model, random_tokens
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from sra_jax.config import SRAConfig
from sra_jax.nn import KVCache
from sra_jax.nn.cache import generation_capacity
from sra_jax.nn.router import count_table

S = 16
# gather and reference sum the same visible keys in different orders (float32): 1e-5 absolute on O(1) logits.
TOL = dict(atol=1e-5, rtol=1e-5)


@partial(nnx.jit, static_argnames=("max_segments", "logits_to_keep"))
def _forward(model, tokens, positions=None, cache=None, **kwargs):
    return model(tokens, positions, cache, **kwargs)


def _sra(**kw) -> SRAConfig:
    # window 2 and 25% critical: most visible keys of a query are critical keys, so a dropped one shows.
    return SRAConfig(**{**dict(critical_fraction=0.25, window=2, num_global=1, router_hidden=8, selection="topk"), **kw})


@pytest.fixture(scope="module")
def pair():
    sra = _sra(queries="all")
    return make_model(sra, attention_impl="reference"), make_model(sra, attention_impl="gather")


def _both(pair, *args, **kwargs):
    (ref, ref_aux), (gat, gat_aux) = (_forward(m, *args, **kwargs) for m in pair)
    np.testing.assert_allclose(gat, ref, **TOL)
    np.testing.assert_array_equal(gat_aux.critical, ref_aux.critical)
    return ref, ref_aux, gat_aux


def test_prefill_and_decode_into_a_generation_cache_gather_their_bound_and_match_the_reference(pair):
    tokens, prompt, max_len = random_tokens(2, S), 12, S
    capacity = generation_capacity(pair[0].sra, prompt, max_len)
    assert capacity == pair[0].sra.num_critical(prompt) + max_len - prompt < max_len
    caches = [KVCache.init(m.config, 2, max_len, critical_capacity=capacity) for m in pair]
    plain = KVCache.init(pair[0].config, 2, max_len)
    _, uncapped = _forward(pair[0], tokens[:, :prompt], None, plain)
    logits = [_forward(m, tokens[:, :prompt], None, c) for m, c in zip(pair, caches, strict=True)]
    np.testing.assert_allclose(logits[1][0], logits[0][0], **TOL)
    np.testing.assert_array_equal(logits[0][1].cache.critical, uncapped.cache.critical)  # the bound clears nothing
    caches = [out[1].cache for out in logits]
    for t in range(prompt, max_len):
        outs = [_forward(m, tokens[:, t:t + 1], None, c) for m, c in zip(pair, caches, strict=True)]
        np.testing.assert_allclose(outs[1][0], outs[0][0], **TOL)
        caches = [out[1].cache for out in outs]


def test_chunked_prefill_gathers_at_most_the_caches_capacity_and_matches_the_reference(pair):
    """Chunks after the first flag tokens by the threshold (any number of them): a capacity below that clears the
    later flags in slot order, and both implementations see the same flags."""
    tokens, capacity = random_tokens(2, S, seed=3), 3
    caches = [KVCache.init(m.config, 2, S, critical_capacity=capacity) for m in pair]
    for start, stop in ((0, 8), (8, S)):
        outs = [_forward(m, tokens[:, start:stop], None, c) for m, c in zip(pair, caches, strict=True)]
        np.testing.assert_allclose(outs[1][0], outs[0][0], **TOL)
        caches = [out[1].cache for out in outs]
        assert int(caches[0].num_critical.max()) <= capacity
    np.testing.assert_array_equal(caches[0].num_critical, caches[0].critical.sum(-1))


@given(st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=6), min_size=2, max_size=2))
def test_packed_rows_with_max_segments_gather_their_bound_and_match_the_reference(pair, rows):
    segment_ids = np.zeros((2, S), np.int32)
    positions = np.full((2, S), -1, np.int32)
    for r, lengths in enumerate(rows):
        start = 0
        for g, length in enumerate(lengths, start=1):
            length = min(length, S - start)
            segment_ids[r, start:start + length] = g
            positions[r, start:start + length] = np.arange(length)
            start += length
    # One static max_segments (>= any row's count here) keeps one compiled program for every example.
    _both(pair, random_tokens(2, S, seed=len(rows[0])), jnp.asarray(positions),
          segment_ids=jnp.asarray(segment_ids), max_segments=6)


def test_max_segments_smaller_than_the_rows_segments_is_refused(pair):
    ids = jnp.asarray(np.repeat(np.arange(1, 5), 4)[None].repeat(2, 0), jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(4), 4)[None].repeat(2, 0), jnp.int32)
    with pytest.raises(ValueError, match="max_segments=3, but a row of segment_ids holds 4 segments"):
        pair[0](random_tokens(2, S), positions, segment_ids=ids, max_segments=3)


@given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.floats(0.001, 1.0))
def test_packed_bound_sum_of_segment_counts_is_at_most_num_critical_of_the_row_plus_segments(lengths, fraction):
    """The arithmetic sra_jax.nn.selector.critical_bound relies on, over any segment lengths and fraction."""
    sra = _sra(critical_fraction=fraction)
    table = np.asarray(count_table(sra, max(lengths)))
    total = int(sum(table[n] for n in lengths))
    assert total <= sra.num_critical(sum(lengths)) + len(lengths)
    assert total <= sum(lengths)


def test_static_mask_layers_share_the_first_layers_bound_and_match_the_reference():
    sra = _sra(mask="static")
    pair = make_model(sra, attention_impl="reference"), make_model(sra, attention_impl="gather")
    tokens = random_tokens(2, S, seed=5)
    _both(pair, tokens)
    caches = [KVCache.init(m.config, 2, S, critical_capacity=generation_capacity(sra, 10, S)) for m in pair]
    outs = [_forward(m, tokens[:, :10], None, c) for m, c in zip(pair, caches, strict=True)]
    np.testing.assert_allclose(outs[1][0], outs[0][0], **TOL)


def test_forced_critical_sets_larger_than_k_are_counted_and_match_the_reference(pair):
    """A concrete forced set is counted (here 12 of 16 tokens, k = 4); eagerly, so the count is concrete."""
    forced = np.zeros((pair[0].config.num_hidden_layers, 2, S), bool)
    forced[..., :12] = True
    tokens = random_tokens(2, S, seed=7)
    outs = [m(tokens, critical=jnp.asarray(forced)) for m in pair]
    np.testing.assert_allclose(outs[1][0], outs[0][0], **TOL)
    traced = [_forward(m, tokens, critical=jnp.asarray(forced)) for m in pair]  # traced: bound s
    np.testing.assert_allclose(traced[1][0], traced[0][0], **TOL)


def test_logits_to_keep_returns_the_last_positions_logits_only(pair):
    tokens = random_tokens(2, S, seed=9)
    full, _ = _forward(pair[0], tokens)
    last, aux = _forward(pair[0], tokens, logits_to_keep=3)
    assert last.shape == (2, 3, full.shape[-1])
    np.testing.assert_allclose(last, full[:, -3:], **TOL)
    with pytest.raises(ValueError, match="logits_to_keep=0"):
        pair[0](tokens, logits_to_keep=0)
    assert math.isfinite(float(aux.mask_density.sum()))
