"""FLOP accounting of NSA / DSA: the (query, key) pairs `ops.nsa.nsa_pair_counts` and `ops.dsa.dsa_pair_counts`
report equal brute-force counts of the dense token masks the references attend with (random padding, packed
segments, GQA selections), and the indexer's FLOPs per pair."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sra_jax.ops import dsa, nsa

B, S, HKV, HQ, D = 2, 29, 2, 4, 8  # S is no multiple of the selection block: a ragged last block
NSA = dict(block=8, stride=4, block_sel=8)


def _rows(seed: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Positions and segment ids: packed segments (positions restart at 0) at random cuts, padding (-1) at random
    slots, a padded tail on some rows."""
    rng = np.random.default_rng(seed)
    pos, seg = np.zeros((B, S), np.int32), np.zeros((B, S), np.int32)
    for r in range(B):
        cuts = np.sort(rng.choice(np.arange(1, S), size=rng.integers(0, 3), replace=False))
        seg[r] = np.searchsorted(cuts, np.arange(S), side="right")
        starts = np.concatenate([[0], cuts])[seg[r]]
        pos[r] = np.arange(S) - starts
        pos[r, rng.random(S) < 0.1] = -1
        pos[r, S - rng.integers(0, 6) :] = -1
    return jnp.asarray(pos), jnp.asarray(seg)


@functools.partial(jax.jit, static_argnames="window")
def _nsa_counts(blocks, pos, seg, window):
    return nsa.nsa_pair_counts(blocks, pos, seg, **NSA, window=window)


@functools.partial(jax.jit, static_argnames="window")
def _nsa_brute(blocks, pos, seg, window):
    """The dense masks of the reference branches, counted."""
    _, c_end, c_seg = nsa.compress(jnp.zeros((B, S, 1, 1)), pos, jnp.ones(NSA["block"]), jnp.zeros((NSA["block"], 1)),
                                   block=NSA["block"], stride=NSA["stride"], segment_ids=seg)  # fmt: skip
    cmp = nsa.compressed_mask(pos, c_end, seg, c_seg).sum((1, 2))
    sel = nsa.selected_token_mask(blocks, NSA["block_sel"], S) & nsa.token_mask(pos, pos, seg)[:, None]
    win = nsa.token_mask(pos, pos, seg, window=window).sum((1, 2))
    return cmp.astype(jnp.float32), sel.sum((2, 3)).mean(1, dtype=jnp.float32), win.astype(jnp.float32)


@given(seed=st.integers(0, 10**6), window=st.sampled_from([1, 5, 64]), density=st.sampled_from([0.2, 0.7, 1.0]))
def test_nsa_pair_counts_equal_the_dense_masks(seed, window, density):
    pos, seg = _rows(seed)
    nq = -(-S // NSA["block_sel"])
    # any selection, causal or not: 3 distinct blocks per (token, kv head), each slot empty (-1) with 1 - density
    k1, k2 = jax.random.split(jax.random.key(seed))
    order = jnp.argsort(jax.random.uniform(k1, (B, S, HKV, nq)), -1)[..., :3].astype(jnp.int32)
    blocks = jnp.where(jax.random.uniform(k2, order.shape) < density, order, -1)
    got, want = _nsa_counts(blocks, pos, seg, window), _nsa_brute(blocks, pos, seg, window)
    for name, g, w in zip(("compressed", "selected", "window"), got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)  # integer counts (halves: mean)


def test_nsa_counts_of_the_selection_nsa_attention_used():
    """The selection `nsa_attention` returns, on random q/k/v: counts equal the branches' masks, and are sparse."""
    pos, seg = _rows(7)
    ks = jax.random.split(jax.random.key(0), 4)
    q, g = jax.random.normal(ks[0], (B, S, HQ, D)), jax.nn.sigmoid(jax.random.normal(ks[3], (B, S, HQ, 3)))
    k, v = jax.random.normal(ks[1], (B, S, HKV, D)), jax.random.normal(ks[2], (B, S, HKV, D))
    pool = dict(cmp_weights_k=jnp.ones(8) / 8, cmp_pos_k=jnp.zeros((8, D)), cmp_weights_v=jnp.ones(8) / 8,
                cmp_pos_v=jnp.zeros((8, D)))  # fmt: skip
    run = jax.jit(functools.partial(nsa.nsa_attention, **pool, **NSA, top_n=1, window=5))
    _, blocks = run(q, k, v, g, pos, segment_ids=seg)
    got = _nsa_counts(blocks, pos, seg, 5)
    for g_, w_ in zip(got, _nsa_brute(blocks, pos, seg, 5), strict=True):
        np.testing.assert_array_equal(np.asarray(g_), np.asarray(w_))
    causal = np.asarray(nsa.token_mask(pos, pos, seg).sum((1, 2)))
    assert (np.asarray(got[1]) <= causal).all() and (np.asarray(got[2]) <= causal).all()


def test_nsa_pair_counts_bad_window():
    pos, seg = _rows(0)
    with pytest.raises(ValueError, match="window"):
        nsa.nsa_pair_counts(jnp.zeros((B, S, HKV, 2), jnp.int32), pos, seg, **NSA, window=0)


@functools.partial(jax.jit, static_argnames="top_k")
def _dsa_case(key, pos, seg, top_k):
    ks = jax.random.split(key, 3)
    qi, ki = jax.random.normal(ks[0], (B, S, 2, 4)), jax.random.normal(ks[1], (B, S, 4))
    wi = jax.random.normal(ks[2], (B, S, 2))
    idx, valid = dsa.indexer_top_k(qi, ki, wi, pos, seg, top_k=top_k, block_k=8)
    brute = (dsa.selection_mask(idx, valid, S) & nsa.token_mask(pos, pos, seg)).sum((1, 2))
    visible = nsa.token_mask(pos, pos, seg).sum(-1)  # [b, s] keys each query may see
    return dsa.dsa_pair_counts(idx, valid, pos, seg), brute.astype(jnp.float32), visible


@given(seed=st.integers(0, 10**6), top_k=st.sampled_from([1, 6, 40]))
def test_dsa_pair_counts_equal_the_dense_selection_mask(seed, top_k):
    pos, seg = _rows(seed)
    got, brute, visible = _dsa_case(jax.random.key(seed), pos, seg, top_k)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(brute))
    np.testing.assert_array_equal(np.asarray(got), np.minimum(np.asarray(visible), top_k).sum(-1))


def test_indexer_flops_per_pair():
    # 4 heads x 64 dims: 4 dot products of 64 multiply-adds and 4 weighted adds, 2 FLOPs each
    assert dsa.indexer_flops_per_pair(4, 64) == 2 * (4 * 64 + 4)
