"""Layouts: CSR lists round-trip, the transposed lists agree, full blocks are truly full, and the SRA layout
covers every visible token pair."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import pallas_kernels as pk
from pallas_kernels.block_sparse.token_mask import token_mask


# Shapes are few (each new shape recompiles every jnp op); the masks vary freely.
@settings(max_examples=8)
@given(st.sampled_from([(1, 5), (6, 3)]), st.floats(0.0, 1.0), st.integers(0, 1000))
def test_block_mask_round_trips_through_both_lists(blocks, density, seed):
    nq, nk = blocks
    rng = np.random.default_rng(seed)
    visited = rng.random((2, 3, nq, nk)) < density
    full = visited & (rng.random(visited.shape) < 0.5)
    layout = pk.layout_from_block_mask(
        jnp.asarray(visited), full_mask=jnp.asarray(full), block_q=16, block_k=8
    )
    got_visited, got_full = layout.to_block_mask()
    np.testing.assert_array_equal(got_visited, visited)
    np.testing.assert_array_equal(got_full, full)
    np.testing.assert_array_equal(layout.q_counts, visited.sum(-2))
    # Full blocks come first in every list.
    first = np.take_along_axis(np.asarray(full), np.asarray(layout.kv_indices), -1)
    slot = np.arange(layout.kv_indices.shape[-1])
    np.testing.assert_array_equal(
        first & (slot < np.asarray(layout.kv_full)[..., None]), slot < np.asarray(layout.kv_full)[..., None]
    )


def test_trim_keeps_the_visited_blocks():
    mask = pk.causal_block_mask(5, 5)[None]
    layout = pk.layout_from_block_mask(
        mask & (jnp.arange(5)[None, :] >= jnp.arange(5)[:, None] - 1), block_q=8, block_k=8
    )
    trimmed = layout.trim()
    assert trimmed.kv_indices.shape[-1] == 2
    np.testing.assert_array_equal(trimmed.to_block_mask()[0], layout.to_block_mask()[0])


@settings(max_examples=6)
@given(st.sampled_from([7, 40, 64]), st.integers(0, 1000))
def test_token_layout_marks_exactly_the_blocks_with_visible_pairs(seq, seed):
    mask = np.random.default_rng(seed).random((1, seq, seq)) < 0.05
    layout = pk.layout_from_token_mask(jnp.asarray(mask), block_q=16, block_k=8)
    visited, full = (np.asarray(x)[0, 0] for x in layout.to_block_mask())
    padded = np.zeros((visited.shape[0] * 16, visited.shape[1] * 8), bool)
    padded[:seq, :seq] = mask[0]
    tiles = padded.reshape(visited.shape[0], 16, visited.shape[1], 8)
    np.testing.assert_array_equal(visited, tiles.any((1, 3)))
    np.testing.assert_array_equal(full, tiles.all((1, 3)))


@settings(max_examples=10)
@given(
    seq=st.sampled_from([37, 64]),
    window=st.integers(1, 20),
    num_global=st.integers(0, 4),
    causal=st.booleans(),
    fraction=st.floats(0.0, 0.5),
    queries_all=st.booleans(),
    pad=st.integers(0, 7),
    seed=st.integers(0, 1000),
)
def test_sra_layout_covers_every_visible_pair_and_full_blocks_are_full(
    seq, window, num_global, causal, fraction, queries_all, pad, seed
):
    rng = np.random.default_rng(seed)
    positions = np.where(np.arange(seq) < seq - pad, np.arange(seq), -1)[None].astype(np.int32)
    critical = rng.random((1, seq)) < fraction
    segments = (np.arange(seq) >= seq // 2).astype(np.int32)[None]
    q_critical = None if queries_all else jnp.asarray(critical)
    layout = pk.sra_layout(
        jnp.asarray(positions),
        block_q=16,
        block_k=8,
        causal=causal,
        window=window,
        num_global=num_global,
        k_critical=jnp.asarray(critical),
        q_critical=q_critical,
        segment_ids=jnp.asarray(segments),
    )
    rule = pk.MaskRule(
        causal=causal,
        window=window,
        num_global=num_global,
        has_segments=True,
        has_k_critical=True,
        has_q_critical=not queries_all,
    )
    tokens = pk.block_sparse.token_mask.TokenInfo(
        jnp.asarray(positions),
        jnp.asarray(positions),
        jnp.asarray(segments),
        jnp.asarray(segments),
        None if queries_all else jnp.asarray(critical, jnp.int32),
        jnp.asarray(critical, jnp.int32),
    )
    mask = np.asarray(token_mask(rule, tokens))[0]
    visited, full = (np.asarray(x)[0, 0] for x in layout.to_block_mask())
    padded = np.zeros((visited.shape[0] * 16, visited.shape[1] * 8), bool)
    padded[:seq, :seq] = mask
    tiles = padded.reshape(visited.shape[0], 16, visited.shape[1], 8)
    assert not (tiles.any((1, 3)) & ~visited).any(), "a block holding a visible pair is not visited"
    assert not (full & ~tiles.all((1, 3))).any(), "a block marked full hides an invisible pair"


def test_random_causal_block_mask_keeps_the_diagonal_and_density():
    mask = np.asarray(pk.random_causal_block_mask(jax.random.PRNGKey(0), 64, 0.1))[0, 0]
    assert mask.diagonal().all() and not np.triu(mask, 1).any()
    assert abs(mask.sum() / (64 * 65 / 2) - 0.1) < 0.02
