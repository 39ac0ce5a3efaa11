"""NSA: compression, the compressed-branch mask, top-n block selection, the full gated reference against a float64
oracle, and the selected-blocks branch on the block-sparse kernel (Triton, interpret mode) against the reference,
values and gradients (GQA, padding, packed segments); custom block masks as BlockLayouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sra_jax.ops import nsa
from tests.ops._sparse_inputs import dense_oracle, inputs

D = 16


def _params(seed, l):
    ks = jax.random.split(jax.random.PRNGKey(seed + 7), 2)
    return dict(
        cmp_weights_k=jnp.linspace(0.5, 1.5, l) / l,
        cmp_pos_k=0.1 * jax.random.normal(ks[0], (l, D)),
        cmp_weights_v=jnp.ones(l) / l,
        cmp_pos_v=0.1 * jax.random.normal(ks[1], (l, D)),
    )


def test_compress_is_weighted_pool_with_position_embedding():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 10, 1, D))
    pos = jnp.array([[0, 1, 2, 3, 4, 5, 6, 7, -1, -1]])
    w, pe = jnp.arange(1.0, 5.0), jnp.ones((4, D))
    c, end, _ = nsa.compress(x, pos, w, pe, block=4, stride=2)
    assert c.shape == (1, 4, 1, D)
    np.testing.assert_allclose(np.asarray(c[0, 1, 0]), np.asarray(((x[0, 2:6, 0] + 1) * w[:, None]).sum(0)), rtol=1e-5)
    assert end.tolist() == [[3, 5, 7, -1]]  # the last block holds padding


def test_selection_forces_first_and_own_block_and_is_causal():
    p = jax.random.uniform(jax.random.PRNGKey(1), (2, 4, 32, 7))
    bm = nsa.selection_block_mask(p, num_kv_heads=2, block=8, stride=4, block_sel=8, top_n=3, seq_len=32)
    assert bm.shape == (2, 2, 4, 4)
    assert bool(bm[..., 0].all()) and bool(jnp.diagonal(bm, axis1=-2, axis2=-1).all())
    assert not bool((bm & ~jnp.tril(jnp.ones((4, 4), bool))).any())
    assert int(bm.sum(-1).max()) <= 3


@settings(max_examples=8)  # each example compiles on new shapes; 8 cover the strategies below
@given(s=st.sampled_from([24, 29]), top_n=st.sampled_from([1, 2, 3]), pad=st.integers(0, 5), seed=st.integers(0, 1000))
def test_nsa_reference_against_oracle(s, top_n, pad, seed):
    q, k, v, pos, seg = inputs(seed, 2, s, 4, 2, D, pad, 11)
    g = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(seed), (2, s, 4, 3)))
    prm = _params(seed, 8)
    out, bm = nsa.nsa_attention(
        q, k, v, g, pos, **prm, block=8, stride=4, block_sel=8, top_n=top_n, window=5, segment_ids=seg
    )
    # oracle built from the definitions: compressed keys by loop, masks from positions
    kc, end, cseg = nsa.compress(k, pos, prm["cmp_weights_k"], prm["cmp_pos_k"], block=8, stride=4, segment_ids=seg)
    vc, _, _ = nsa.compress(v, pos, prm["cmp_weights_v"], prm["cmp_pos_v"], block=8, stride=4, segment_ids=seg)
    posn, segn, endn, csegn = (np.asarray(x) for x in (pos, seg, end, cseg))
    vis = (posn[:, :, None] >= 0) & (posn[:, None] >= 0) & (posn[:, None] <= posn[:, :, None])
    vis &= segn[:, :, None] == segn[:, None]
    cm = (posn[:, :, None] >= 0) & (endn[:, None] >= 0) & (endn[:, None] <= posn[:, :, None])
    cm &= segn[:, :, None] == csegn[:, None]
    win = vis & (posn[:, :, None] - posn[:, None] < 5)
    tok = np.repeat(np.repeat(np.asarray(bm), 8, -2), 8, -1)[..., :s, :s] & vis[:, None]
    gn = np.asarray(g, np.float64)
    want = (
        gn[..., :1] * dense_oracle(q, kc, vc, cm)
        + gn[..., 1:2] * dense_oracle(q, k, v, tok)
        + gn[..., 2:] * dense_oracle(q, k, v, win)
    )
    np.testing.assert_allclose(np.asarray(out), want, atol=3e-5)  # f32 against f64: summation order
    assert not bool(
        jnp.isnan(
            jax.grad(
                lambda q: nsa.nsa_attention(
                    q, k, v, g, pos, **prm, block=8, stride=4, block_sel=8, top_n=top_n, window=5, segment_ids=seg
                )[0].sum()
            )(q)
        ).any()
    )


@pytest.fixture(scope="module")
def kernel_case():
    q, k, v, pos, seg = inputs(5, 2, 30, 4, 2, D, 3, 13)  # 30 tokens: ragged against the 8-token blocks
    g = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(5), (2, 30, 4, 3)))
    _, bm = nsa.nsa_attention(
        q, k, v, g, pos, **_params(5, 8), block=8, stride=4, block_sel=8, top_n=3, window=5, segment_ids=seg
    )
    return q, k, v, pos, seg, bm


def test_selected_branch_on_kernel_matches_reference(kernel_case):
    q, k, v, pos, seg, bm = kernel_case
    assert bool((~bm).any()), "the selection must leave blocks out for the test to mean anything"
    kern = lambda q, k, v: nsa.nsa_selected_kernel(
        q, k, v, bm, pos, block_sel=8, segment_ids=seg, backend="triton", interpret=True
    )
    ref = lambda q, k, v: nsa.nsa_selected_reference(q, k, v, bm, pos, block_sel=8, segment_ids=seg)
    w = jnp.cos(jnp.arange(D))
    gk = jax.grad(lambda *a: (kern(*a) * w).sum(), (0, 1, 2))(q, k, v)
    gr = jax.grad(lambda *a: (ref(*a) * w).sum(), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(np.asarray(kern(q, k, v)), np.asarray(ref(q, k, v)), atol=2e-5)  # f32: order only
    for a, b_ in zip(gk, gr):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=5e-5)


def test_custom_block_layout_roundtrip_and_bad_shape():
    bm = jax.random.bernoulli(jax.random.PRNGKey(2), 0.5, (2, 3, 4)) | jnp.eye(3, 4, dtype=bool)
    lay = nsa.custom_block_layout(bm, block_q=8, block_k=8, seq_q=20, seq_k=30)
    assert bool((lay.to_block_mask()[0][:, 0] == bm).all())
    with pytest.raises(ValueError, match="block_mask"):
        nsa.custom_block_layout(bm, block_q=8, block_k=8, seq_q=40, seq_k=30)


def test_bad_arguments():
    x = jnp.zeros((1, 8, 1, D))
    with pytest.raises(ValueError, match="stride"):
        nsa.compress(x, jnp.zeros((1, 8), jnp.int32), jnp.ones(4), jnp.zeros((4, D)), block=4, stride=5)
    with pytest.raises(ValueError, match="top_n"):
        nsa.selection_block_mask(
            jnp.zeros((1, 1, 8, 1)), num_kv_heads=1, block=8, stride=8, block_sel=8, top_n=0, seq_len=8
        )
