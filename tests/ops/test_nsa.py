"""NSA: compression, the compressed-branch mask, per-token top-n block selection, the full gated reference against a
float64 oracle, causality (later tokens never change earlier outputs), and the selected-blocks branch on the top-k
gather kernel (Triton, interpret mode) and its jnp backend against the dense reference, values and gradients (GQA,
padding, packed segments); custom block masks as BlockLayouts."""

from __future__ import annotations

import functools

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


def test_selection_is_per_token_forces_first_and_own_block_and_is_causal():
    s, bs = 30, 8
    p = jax.random.uniform(jax.random.PRNGKey(1), (2, 4, s, 6))
    sel = functools.partial(nsa.select_blocks, num_kv_heads=2, block=8, stride=4, block_sel=bs, top_n=3)
    blocks = np.asarray(sel(p))
    assert blocks.shape == (2, s, 2, 3) and blocks.dtype == np.int32
    own = np.arange(s) // bs
    for t in range(s):
        got = blocks[:, t]
        assert (got <= own[t]).all(), "a token selects no later block"
        assert ((got == 0).any(-1) & (got == own[t]).any(-1)).all(), "first and own block are always selected"
        n_causal = min(3, own[t] + 1)
        assert ((got >= 0).sum(-1) == n_causal).all(), "every slot is used while causal blocks remain"
        valid = np.sort(np.where(got >= 0, got, 99), -1)
        assert (np.diff(valid, axis=-1)[..., : n_causal - 1] > 0).all(), "distinct blocks"
    # a token's selection reads only its own compressed attention: later rows of p change no earlier selection
    p2 = p.at[:, :, 17:].set(jax.random.uniform(jax.random.PRNGKey(9), (2, 4, s - 17, 6)))
    np.testing.assert_array_equal(np.asarray(sel(p2))[:, :17], blocks[:, :17])
    # the selection follows the importance: the heaviest non-forced block of a kv head's group is picked
    imp = np.asarray(nsa.token_importance(p, num_kv_heads=2, block=8, stride=4, block_sel=bs, num_sel=4))
    t = 29  # own block 3: top-3 = {0, 3, argmax over blocks 1..2}
    want = 1 + imp[:, :, t, 1:3].argmax(-1)  # [b, hkv]
    assert (np.sort(blocks[:, t], -1) == np.sort(np.stack([np.zeros_like(want), want, 3 + 0 * want], -1), -1)).all()


def _oracle_selected(blocks, block_sel, s):
    """Token mask [b, hkv, s, s] of a selection, built with numpy loops from the definition."""
    blocks = np.asarray(blocks)
    b, _, hkv, _ = blocks.shape
    m = np.zeros((b, hkv, s, s), bool)
    for r in range(b):
        for t in range(s):
            for h in range(hkv):
                for j in blocks[r, t, h]:
                    if j >= 0:
                        m[r, h, t, j * block_sel : (j + 1) * block_sel] = True
    return m


@settings(max_examples=8)  # each example compiles on new shapes; 8 cover the strategies below
@given(s=st.sampled_from([24, 29]), top_n=st.sampled_from([1, 2, 3]), pad=st.integers(0, 5), seed=st.integers(0, 1000))
def test_nsa_reference_against_oracle(s, top_n, pad, seed):
    q, k, v, pos, seg = inputs(seed, 2, s, 4, 2, D, pad, 11)
    g = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(seed), (2, s, 4, 3)))
    prm = _params(seed, 8)
    out, blocks = nsa.nsa_attention(
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
    tok = _oracle_selected(blocks, 8, s) & vis[:, None]
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


_CAUSAL_CFG = dict(block=4, stride=2, block_sel=4, top_n=4, window=3)  # choices from the 4th block on


@functools.cache
def _causal_forward(impl):
    sel = lambda q, k, v, bm, pos, seg: nsa.nsa_selected(q, k, v, bm, pos, block_sel=4, segment_ids=seg, impl=impl)
    return jax.jit(
        lambda q, k, v, g, pos, seg, prm: nsa.nsa_attention(
            q,
            k,
            v,
            g,
            pos,
            **prm,
            **_CAUSAL_CFG,
            segment_ids=seg,
            selected_fn=lambda q, k, v, bm: sel(q, k, v, bm, pos, seg),
        )  # fmt: skip
    )


@settings(max_examples=20)
@given(
    s=st.sampled_from([22, 31]),
    hkv=st.sampled_from([1, 2]),
    frac=st.floats(0.45, 0.95),
    pad=st.integers(0, 4),
    split=st.integers(9, 17),
    seed=st.integers(0, 10_000),
    impl=st.sampled_from(["reference", "gather"]),
)
def test_nsa_forward_is_causal(s, hkv, frac, pad, split, seed, impl):
    """Changing the queries, keys, values and gates of the tokens after slot t leaves every output at slots <= t
    unchanged, t inside a selection block (block_sel 4; top-3 of up to 8 blocks), GQA 4/hkv, row 1 packed and
    padded. A selection shared by a query block fails this (it reads the block's later queries): on these inputs
    the per-query-block selection changed an earlier output in about half of the draws."""
    t = int(frac * (s - 1))
    if t % 4 == 3:  # keep t strictly inside its block: the test's point
        t -= 1
    q, k, v, pos, seg = inputs(seed, 2, s, 4, hkv, D, pad, split)
    q = 0.3 * q  # flat compressed attention up to t, peaked after it: later queries would sway a shared selection
    g = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(seed + 1), (2, s, 4, 3)))
    prm = _params(seed, 4)
    fwd = _causal_forward(impl)
    out, blocks = fwd(q, k, v, g, pos, seg, prm)
    later = (jnp.arange(s) > t)[None, :, None, None]
    q2, k2, v2, _, _ = inputs(seed + 1, 2, s, 4, hkv, D, pad, split)
    g2 = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(seed + 2), (2, s, 4, 3)))
    q2 = 5.0 * q2
    q2, k2, v2, g2 = (jnp.where(later, b_, a) for a, b_ in ((q, q2), (k, k2), (v, v2), (g, g2)))
    out2, blocks2 = fwd(q2, k2, v2, g2, pos, seg, prm)
    np.testing.assert_array_equal(np.asarray(blocks2)[:, : t + 1], np.asarray(blocks)[:, : t + 1])
    # the same masked sums over the same keys: equal up to XLA's fusion choices
    np.testing.assert_allclose(np.asarray(out2)[:, : t + 1], np.asarray(out)[:, : t + 1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(out2)[0, t + 1 :], np.asarray(out)[0, t + 1 :]), "the later tokens changed"


@pytest.fixture(scope="module", params=[2, 1], ids=["gqa4/2", "gqa4/1"])
def kernel_case(request):
    hkv = request.param
    q, k, v, pos, seg = inputs(5, 2, 30, 4, hkv, D, 3, 13)  # 30 tokens: ragged against the 8-token blocks
    g = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(5), (2, 30, 4, 3)))
    _, blocks = nsa.nsa_attention(
        q, k, v, g, pos, **_params(5, 8), block=8, stride=4, block_sel=8, top_n=2, window=5, segment_ids=seg
    )
    return q, k, v, pos, seg, blocks


@pytest.mark.parametrize(
    "impl,kw", [("gather", {}), ("pallas", {"backend": "triton", "interpret": True, "block_k": 16})],
    ids=["gather", "pallas-triton-interpret"],
)  # fmt: skip
def test_selected_branch_fast_paths_match_reference(kernel_case, impl, kw):
    q, k, v, pos, seg, blocks = kernel_case
    dense = np.asarray(nsa.selected_token_mask(blocks, 8, 30))
    assert not dense[:, :, 24:].all(-1).any(), "the selection must leave keys out for the test to mean anything"
    fast = lambda q, k, v: nsa.nsa_selected(q, k, v, blocks, pos, block_sel=8, segment_ids=seg, impl=impl, **kw)
    ref = lambda q, k, v: nsa.nsa_selected(q, k, v, blocks, pos, block_sel=8, segment_ids=seg, impl="reference")
    w = jnp.cos(jnp.arange(D))
    gf = jax.grad(lambda *a: (fast(*a) * w).sum(), (0, 1, 2))(q, k, v)
    gr = jax.grad(lambda *a: (ref(*a) * w).sum(), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(np.asarray(fast(q, k, v)), np.asarray(ref(q, k, v)), atol=2e-5)  # f32: order only
    for a, b_ in zip(gf, gr):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=5e-5)


def test_full_forward_gradients_gather_equal_reference():
    """nsa_attention with the gather selected branch against the dense reference: gradients of q, k, v, gates and
    the compression pool (the selection itself carries no gradient); no gradient flows from earlier outputs into
    later tokens."""
    q, k, v, pos, seg = inputs(3, 2, 29, 4, 2, D, 2, 12)
    g = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(3), (2, 29, 4, 3)))
    prm = _params(3, 8)
    cfg = dict(block=8, stride=4, block_sel=8, top_n=2, window=5, segment_ids=seg)
    w = jnp.sin(jnp.arange(D))

    def loss(impl, q, k, v, g, prm):
        fn = lambda q, k, v, bm: nsa.nsa_selected(q, k, v, bm, pos, block_sel=8, segment_ids=seg, impl=impl)
        return (nsa.nsa_attention(q, k, v, g, pos, **prm, **cfg, selected_fn=fn)[0] * w).sum()

    got = jax.grad(functools.partial(loss, "gather"), (0, 1, 2, 3, 4))(q, k, v, g, prm)
    want = jax.grad(functools.partial(loss, "reference"), (0, 1, 2, 3, 4))(q, k, v, g, prm)
    for a, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=5e-5)  # f32, another summation order
    # causal gradients too: the outputs up to slot t send nothing into the later tokens' q, k, v
    t = 13

    def early(q, k, v):
        fn = lambda q, k, v, bm: nsa.nsa_selected(q, k, v, bm, pos, block_sel=8, segment_ids=seg, impl="gather")
        return nsa.nsa_attention(q, k, v, g, pos, **prm, **cfg, selected_fn=fn)[0][:, : t + 1].sum()

    for grad in jax.grad(early, (0, 1, 2))(q, k, v):
        assert not np.asarray(grad)[:, t + 1 :].any()


def test_custom_block_layout_roundtrip_and_bad_shape():
    bm = jax.random.bernoulli(jax.random.PRNGKey(2), 0.5, (2, 3, 4)) | jnp.eye(3, 4, dtype=bool)
    lay = nsa.custom_block_layout(bm, block_q=8, block_k=8, seq_q=20, seq_k=30)
    assert bool((lay.to_block_mask()[0][:, 0] == bm).all())
    with pytest.raises(ValueError, match="block_mask"):
        nsa.custom_block_layout(bm, block_q=8, block_k=8, seq_q=40, seq_k=30)


def test_bad_arguments():
    x = jnp.zeros((1, 8, 1, D))
    pos = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="stride"):
        nsa.compress(x, pos, jnp.ones(4), jnp.zeros((4, D)), block=4, stride=5)
    with pytest.raises(ValueError, match="top_n"):
        nsa.select_blocks(jnp.zeros((1, 1, 8, 1)), num_kv_heads=1, block=8, stride=8, block_sel=8, top_n=0)
    blocks = jnp.zeros((1, 8, 1, 1), jnp.int32)
    with pytest.raises(ValueError, match="impl 'triton' not in"):
        nsa.nsa_selected(x, x, x, blocks, pos, block_sel=8, impl="triton")
    with pytest.raises(ValueError, match="only apply to impl='pallas'"):
        nsa.nsa_selected(x, x, x, blocks, pos, block_sel=8, impl="gather", interpret=True)
