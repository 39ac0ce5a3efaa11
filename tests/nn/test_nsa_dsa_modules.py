"""NSAAttention / DSAAttention: Llama-shaped projections, outputs against the ops composed by hand (DSA: the
streaming selection against the one-shot one), full-budget limits equal dense causal attention, the indexer loss
trains only the indexer (selected and dense losses agree at full budget), and a cache is refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sra_jax.config import LlamaConfig
from sra_jax.nn.attention import SparseReasoningAttention
from sra_jax.nn.dsa import DSAAttention
from sra_jax.nn.nsa import NSAAttention
from sra_jax.ops import dsa, rope
from sra_jax.ops.nsa import masked_attention, token_mask

CFG = LlamaConfig.tiny()


def _x(s=20):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, s, CFG.hidden_size))
    i = np.arange(s)
    pos = jnp.asarray(np.stack([i, np.where(i < 16, i % 9, -1)]), jnp.int32)
    seg = jnp.asarray(np.stack([0 * i, (i >= 9).astype(int)]), jnp.int32)
    return x, pos, seg


def _dense(m, x, pos, seg):
    b, s, _ = x.shape
    hq, hkv, hd = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    f = rope.rope_frequencies(hd, CFG.rope_theta, CFG.rope_scaling)
    q = rope.apply_rope(m.q_proj(x).reshape(b, s, hq, hd), pos, f)
    k = rope.apply_rope(m.k_proj(x).reshape(b, s, hkv, hd), pos, f)
    o = masked_attention(q, k, m.v_proj(x).reshape(b, s, hkv, hd), token_mask(pos, pos, seg))[0]
    return m.o_proj(o.reshape(b, s, -1))


def test_projection_shapes_match_sra_layer():
    ref = nnx.state(SparseReasoningAttention(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    for m in (NSAAttention(CFG, block=8, stride=4, block_sel=8, rngs=nnx.Rngs(0)), DSAAttention(CFG, rngs=nnx.Rngs(0))):
        st = nnx.state(m, nnx.Param)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert st[name]["kernel"][...].shape == ref[name]["kernel"][...].shape


def test_dsa_full_budget_is_dense_and_loss_trains_indexer_only():
    m = DSAAttention(CFG, top_k=64, indexer_heads=2, indexer_dim=8, block_q=8, rngs=nnx.Rngs(1))
    x, pos, seg = _x()
    out, loss = m(x, pos, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_dense(m, x, pos, seg)), atol=3e-5)  # f32 order
    grads = nnx.grad(lambda m: m(x, pos, segment_ids=seg)[1])(m)
    assert float(jnp.abs(grads["q_proj"]["kernel"][...]).max()) == 0
    assert float(jnp.abs(grads["indexer_q"]["kernel"][...]).max()) > 0


def test_dsa_partial_budget_matches_the_one_shot_ops_and_both_losses_agree_at_full_budget():
    m = DSAAttention(CFG, top_k=5, indexer_heads=2, indexer_dim=8, block_q=8, indexer_block_k=6, rngs=nnx.Rngs(3))
    x, pos, seg = _x()
    out, _ = m(x, pos, segment_ids=seg)
    b, s, _ = x.shape
    hq, hkv, hd = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    f = rope.rope_frequencies(hd, CFG.rope_theta, CFG.rope_scaling)
    q = rope.apply_rope(m.q_proj(x).reshape(b, s, hq, hd), pos, f)
    k = rope.apply_rope(m.k_proj(x).reshape(b, s, hkv, hd), pos, f)
    qi = m.indexer_q(x).reshape(b, s, 2, 8)
    idx, valid = dsa.top_k_keys(dsa.indexer_scores(qi, m.indexer_k(x), m.indexer_w(x), pos, seg), 5)
    o = dsa.dsa_attention_reference(q, k, m.v_proj(x).reshape(b, s, hkv, hd), idx, valid, pos, seg)
    np.testing.assert_allclose(np.asarray(out), np.asarray(m.o_proj(o.reshape(b, s, -1))), atol=3e-5)  # f32 order
    loss = lambda kind: DSAAttention(
        CFG, top_k=64, indexer_heads=2, indexer_dim=8, block_q=8, indexer_loss=kind, rngs=nnx.Rngs(1)
    )(x, pos, segment_ids=seg)[1]
    np.testing.assert_allclose(float(loss("selected")), float(loss("dense")), rtol=1e-5)  # f32 summation order
    with pytest.raises(ValueError, match="indexer_loss"):
        DSAAttention(CFG, indexer_loss="kl", rngs=nnx.Rngs(0))


def test_nsa_window_gate_only_with_long_window_is_dense():
    m = NSAAttention(CFG, block=8, stride=4, block_sel=8, top_n=2, window=64, rngs=nnx.Rngs(2))
    # gates: compressed and selected closed (sigmoid(-1e4) = 0), window open (sigmoid(1e4) = 1)
    bias = jnp.tile(jnp.array([-1e4, -1e4, 1e4]), CFG.num_attention_heads)
    m.nsa_gate.kernel[...] = jnp.zeros_like(m.nsa_gate.kernel[...])
    m.nsa_gate.bias[...] = bias
    x, pos, seg = _x()
    np.testing.assert_allclose(np.asarray(m(x, pos, segment_ids=seg)), np.asarray(_dense(m, x, pos, seg)), atol=3e-5)
    g = nnx.grad(lambda m: m(x, pos, segment_ids=seg).sum())(m)
    assert np.isfinite(np.asarray(g["q_proj"]["kernel"][...])).all()


def test_cache_is_refused():
    x, pos, _ = _x()
    for m in (NSAAttention(CFG, block=8, stride=4, block_sel=8, rngs=nnx.Rngs(0)), DSAAttention(CFG, rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError, match="KV cache"):
            m(x, pos, cache=object())


def test_dsa_topk_impls_give_the_same_layer():
    # the threshold select orders its slots by key index, the sort select by score: every consumer (attention,
    # selected-keys loss, pair counts) is order-invariant, so outputs, losses, counts and indexer gradients agree
    x, pos, seg = _x()
    layer = lambda topk: DSAAttention(CFG, top_k=5, indexer_heads=2, indexer_dim=8, block_q=8, indexer_block_k=6,
                                      indexer_topk=topk, indexer_query_chunk=7, rngs=nnx.Rngs(3))  # fmt: skip
    runs = {}
    for topk in ("sort", "threshold"):
        m = layer(topk)
        out, loss, pairs = m(x, pos, segment_ids=seg, with_pairs=True)
        grads = nnx.grad(lambda m: m(x, pos, segment_ids=seg)[1])(m)
        runs[topk] = (out, loss, pairs, grads["indexer_q"]["kernel"][...])
    for a, b_ in zip(runs["threshold"], runs["sort"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=3e-6)  # f32 slot summation order
    with pytest.raises(ValueError, match="indexer_topk"):
        DSAAttention(CFG, indexer_topk="radix", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="indexer_query_chunk"):
        DSAAttention(CFG, indexer_query_chunk=0, rngs=nnx.Rngs(0))
