"""DSA: the lightning indexer, top-k selection, the gather attention against the dense masked reference (values
and gradients; GQA, padding, packed segments) and the indexer's KL warm-up loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sra_jax.ops import dsa
from sra_jax.ops.nsa import token_mask
from tests.ops._sparse_inputs import dense_oracle, inputs


def _indexer(seed, b, s, hi=2, di=8):
    ks = jax.random.split(jax.random.PRNGKey(seed + 100), 3)
    return (
        jax.random.normal(ks[0], (b, s, hi, di)),
        jax.random.normal(ks[1], (b, s, di)),
        jax.random.normal(ks[2], (b, s, hi)),
    )


def test_indexer_scores_formula():
    qi, ki, wi = _indexer(0, 1, 5)
    pos = jnp.arange(5)[None]
    got = dsa.indexer_scores(qi, ki, wi, pos)
    want = np.zeros((5, 5))
    for t in range(5):
        for s_ in range(5):
            want[t, s_] = sum(float(wi[0, t, j]) * max(float(qi[0, t, j] @ ki[0, s_]), 0.0) for j in range(2))
    want = np.where(np.tril(np.ones((5, 5), bool)), want, -np.inf)
    np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-5, atol=1e-5)  # f32 dots


@settings(max_examples=8)  # each example compiles a gradient on new shapes; 8 cover the strategies below
@given(
    s=st.sampled_from([9, 16]),
    top_k=st.sampled_from([1, 3, 7]),
    hq_group=st.sampled_from([(2, 1), (4, 2), (2, 2)]),
    pad=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_gather_matches_reference(s, top_k, hq_group, pad, seed):
    hq, hkv = hq_group
    split = s // 2
    q, k, v, pos, seg = inputs(seed, 2, s, hq, hkv, 8, min(pad, s - split - 1), split)
    qi, ki, wi = _indexer(seed, 2, s)
    idx, valid = dsa.top_k_keys(dsa.indexer_scores(qi, ki, wi, pos, seg), top_k)
    ref = dsa.dsa_attention_reference(q, k, v, idx, valid, pos, seg)
    got = dsa.dsa_attention_gather(q, k, v, idx, valid, pos, seg, block_q=4)
    oracle = dense_oracle(q, k, v, dsa.selection_mask(idx, valid, s) & token_mask(pos, pos, seg))
    np.testing.assert_allclose(np.asarray(ref), oracle, atol=2e-5)  # f32 against f64: summation order
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)
    # each query sees at most top_k keys, always within its visible set
    sel = dsa.selection_mask(idx, valid, s)
    assert int(sel.sum(-1).max()) <= top_k
    assert not bool((sel & ~token_mask(pos, pos, seg)).any())
    loss = lambda f: lambda q, k, v: (f(q, k, v) * jnp.cos(jnp.arange(q.shape[-1]))).sum()
    gr = jax.grad(loss(lambda *a: dsa.dsa_attention_reference(*a, idx, valid, pos, seg)), (0, 1, 2))(q, k, v)
    gg = jax.grad(loss(lambda *a: dsa.dsa_attention_gather(*a, idx, valid, pos, seg, block_q=4)), (0, 1, 2))(q, k, v)
    for a, b_ in zip(gg, gr):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=5e-5)  # f32 summation order


def test_full_top_k_is_dense_causal():
    q, k, v, pos, seg = inputs(3, 2, 12, 4, 2, 8, 2, 5)
    qi, ki, wi = _indexer(3, 2, 12)
    idx, valid = dsa.top_k_keys(dsa.indexer_scores(qi, ki, wi, pos, seg), 12)
    got = dsa.dsa_attention_gather(q, k, v, idx, valid, pos, seg, block_q=5)
    np.testing.assert_allclose(np.asarray(got), dense_oracle(q, k, v, token_mask(pos, pos, seg)), atol=2e-5)


def test_kl_loss_zero_at_target_and_stops_main_gradient():
    q, k, _, pos, seg = inputs(4, 2, 10, 4, 2, 8, 2, 4)
    mask = token_mask(pos, pos, seg)
    from sra_jax.ops.nsa import masked_attention

    t = masked_attention(q, k, k, mask)[1].sum(1)
    t = t / jnp.maximum(t.sum(-1, keepdims=True), 1e-30)
    perfect = jnp.where(mask, jnp.log(jnp.maximum(t, 1e-30)), -jnp.inf)
    assert abs(float(dsa.indexer_kl_loss(q, k, perfect, pos, seg))) < 1e-5
    qi, ki, wi = _indexer(4, 2, 10)
    f = lambda q, k, qi: dsa.indexer_kl_loss(q, k, dsa.indexer_scores(qi, ki, wi, pos, seg), pos, seg)
    val = f(q, k, qi)
    assert float(val) > 0 and np.isfinite(float(val))
    gq, gk, gqi = jax.grad(f, (0, 1, 2))(q, k, qi)
    assert float(jnp.abs(gq).max()) == 0 and float(jnp.abs(gk).max()) == 0
    assert np.isfinite(np.asarray(gqi)).all() and float(jnp.abs(gqi).max()) > 0


def test_bad_arguments():
    q, k, v, pos, seg = inputs(0, 2, 8, 2, 1, 8, 0, 4)
    with pytest.raises(ValueError, match="top_k"):
        dsa.top_k_keys(jnp.zeros((1, 4, 4)), 0)
    with pytest.raises(ValueError, match="block_q"):
        dsa.dsa_attention_gather(q, k, v, jnp.zeros((2, 8, 2), jnp.int32), jnp.ones((2, 8, 2), bool), pos, block_q=0)


@pytest.mark.parametrize(
    "s, top_k, block_k, pad",
    [(16, 5, 4, 0), (19, 7, 8, 3), (12, 20, 5, 2)],  # blocks that divide s or not, top_k beyond s (invalid slots)
)
def test_streaming_top_k_equals_one_shot(s, top_k, block_k, pad):
    _, _, _, pos, seg = inputs(s, 2, s, 2, 1, 8, pad, s // 2)
    qi, ki, wi = _indexer(s, 2, s)
    want = dsa.top_k_keys(dsa.indexer_scores(qi, ki, wi, pos, seg), top_k)
    got = dsa.indexer_top_k(qi, ki, wi, pos, seg, top_k=top_k, block_k=block_k, impl="sort")
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))  # invalid slots too, in the same order


@pytest.mark.parametrize("impl", dsa.INDEXER_TOPK_IMPLS)
def test_top_k_ties_go_to_the_lower_key_index(impl):
    # integer-valued indexer inputs give exact scores: every visible key of a query scores the same
    s = 11
    _, _, _, pos, seg = inputs(0, 2, s, 2, 1, 8, 2, 6)
    qi, ki, wi = jnp.ones((2, s, 2, 4)), jnp.ones((2, s, 4)), jnp.ones((2, s, 2))
    idx, valid = dsa.indexer_top_k(qi, ki, wi, pos, seg, top_k=3, block_k=4, impl=impl, query_chunk=4)
    vis = np.asarray(token_mask(pos, pos, seg))
    for b in range(2):
        for t in range(s):
            lowest = np.flatnonzero(vis[b, t])[:3]
            np.testing.assert_array_equal(np.sort(np.asarray(idx[b, t][valid[b, t]])), lowest)
    want = dsa.top_k_keys(dsa.indexer_scores(qi, ki, wi, pos, seg), 3)
    if impl == "sort":  # slots by descending score, ties by key index: top_k_keys' order
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(want[0]))
    else:  # slots by ascending key index
        np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(want[0]), -1))


def _dsa(q, k, v, *, idx, valid, pos, seg, **kw):
    return dsa.dsa_attention(q, k, v, idx, valid, pos, seg, **kw)


def test_dsa_attention_impls_agree_forward_and_gradients():
    q, k, v, pos, seg = inputs(5, 2, 13, 4, 2, 16, 3, 6)
    qi, ki, wi = _indexer(5, 2, 13)
    idx, valid = dsa.indexer_top_k(qi, ki, wi, pos, seg, top_k=6, block_k=8)
    w = jnp.cos(jnp.arange(16.0))
    runs = {
        "reference": {},
        "gather": {"block_q": 4},
        "pallas": {"backend": "triton", "interpret": True, "block_k": 16},
    }
    outs, grads = {}, {}
    for impl, kw in runs.items():
        f = functools.partial(_dsa, idx=idx, valid=valid, pos=pos, seg=seg, impl=impl, **kw)
        outs[impl] = f(q, k, v)
        grads[impl] = jax.grad(lambda q, k, v, f=f: (f(q, k, v) * w).sum(), (0, 1, 2))(q, k, v)
    for impl in ("gather", "pallas"):
        np.testing.assert_allclose(np.asarray(outs[impl]), np.asarray(outs["reference"]), atol=2e-5)  # f32 order
        for a, b_ in zip(grads[impl], grads["reference"]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=5e-5)  # f32 summation order
    with pytest.raises(ValueError, match="impl"):
        dsa.dsa_attention(q, k, v, idx, valid, pos, seg, impl="cudnn")
    with pytest.raises(ValueError, match="only apply"):
        dsa.dsa_attention(q, k, v, idx, valid, pos, seg, impl="gather", interpret=True)


def test_selected_kl_loss_equals_dense_kl_at_full_budget_and_trains_only_the_indexer():
    q, k, _, pos, seg = inputs(6, 2, 10, 4, 2, 8, 2, 4)
    qi, ki, wi = _indexer(6, 2, 10)
    full = dsa.indexer_top_k(qi, ki, wi, pos, seg, top_k=10, block_k=4)
    dense = dsa.indexer_kl_loss(q, k, dsa.indexer_scores(qi, ki, wi, pos, seg), pos, seg)
    sel = lambda q, k, qi, sel_: dsa.indexer_kl_loss_selected(q, k, qi, ki, wi, *sel_, pos, seg, block_q=3)
    np.testing.assert_allclose(float(sel(q, k, qi, full)), float(dense), rtol=1e-5)  # f32 summation order
    part = dsa.indexer_top_k(qi, ki, wi, pos, seg, top_k=3, block_k=4)
    gq, gk, gqi = jax.grad(sel, (0, 1, 2))(q, k, qi, part)
    assert float(jnp.abs(gq).max()) == 0 and float(jnp.abs(gk).max()) == 0
    assert np.isfinite(np.asarray(gqi)).all() and float(jnp.abs(gqi).max()) > 0


@pytest.mark.parametrize("impl", ["reference", "gather", "pallas"])
def test_decode_equals_the_last_row_of_the_full_recompute(impl):
    b, n, L, top_k = 2, 12, 16, 5
    q, k, v, _, _ = inputs(7, b, L, 4, 2, 16, 0, L)
    qi, ki, wi = _indexer(7, b, L)
    # row 1 is left-padded by 3 slots (positions -1, then 0 ..); slots >= n are not yet written (garbage)
    i = np.arange(L)
    pos = jnp.asarray(np.stack([i, np.where(i < 3, -1, i - 3)]), jnp.int32)
    lengths = jnp.array([n, n], jnp.int32)
    live = pos[:, :n]
    idx, valid = dsa.top_k_keys(dsa.indexer_scores(qi[:, :n], ki[:, :n], wi[:, :n], live), top_k)
    full = dsa.dsa_attention(q[:, :n], k[:, :n], v[:, :n], idx, valid, live, impl="reference")
    kw = {"backend": "triton", "interpret": True, "block_k": 16} if impl == "pallas" else {}
    out, d_idx, d_valid = dsa.dsa_decode(
        q[:, n - 1 : n], k, v, ki, qi[:, n - 1 : n], wi[:, n - 1 : n], lengths,
        top_k=top_k, slot_positions=pos, impl=impl, **kw,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(d_valid), np.asarray(valid[:, n - 1 : n]))
    np.testing.assert_array_equal(
        np.asarray(jnp.where(d_valid, d_idx, -1)), np.asarray(jnp.where(valid, idx, -1)[:, n - 1 : n])
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(full[:, n - 1 : n]), atol=2e-5)  # f32 order
