"""KV-cache decoding: prefill + token-by-token decode reproduce the full forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, make_model, random_tokens

from sra_jax.config import SRAConfig
from sra_jax.nn import KVCache, Llama


def prefill_and_decode(model: Llama, tokens, positions, prompt_len: int = 8, max_len: int = 12):
    """Logits of every token from one prefill call then one call per remaining token; the cache; router scores.
    `positions=None` lets the model number the tokens after the cached ones."""
    cache = KVCache.init(model.config, tokens.shape[0], max_len)
    pieces, scores = [], []
    for start, stop in [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, tokens.shape[1])]:
        step_positions = None if positions is None else positions[:, start:stop]
        logits, aux = forward(model, tokens[:, start:stop], step_positions, cache)
        pieces.append(logits)
        scores.append(aux.router_logits)
        cache = aux.cache
    return jnp.concatenate(pieces, axis=1), cache, jnp.concatenate(scores, axis=-1)


def left_padded(lengths: list[int], total: int, seed: int = 0):
    """Rows of `total` tokens whose first total - length slots are padding (position -1)."""
    tokens = random_tokens(len(lengths), total, seed=seed)
    positions = np.stack([np.arange(total) - (total - n) for n in lengths])
    positions = np.where(positions < 0, -1, positions)
    return jnp.where(positions < 0, 0, tokens), jnp.asarray(positions, jnp.int32)


SPARSE = SRAConfig(critical_fraction=0.25, window=3, num_global=1, selection="topk", router_hidden=8)


def test_decoding_with_sra_off_matches_the_full_forward_pass():
    model = make_model()
    tokens = random_tokens(2, 12)
    want, _ = forward(model, tokens)
    got, cache, _ = prefill_and_decode(model, tokens, None)
    # Same float32 arithmetic over a different key count (empty slots are masked while decoding): rounding only.
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert int(cache.index) == 12
    np.testing.assert_array_equal(cache.positions, np.broadcast_to(np.arange(12), (2, 12)))


@pytest.mark.parametrize(("mask", "queries"), [("dynamic", "critical"), ("static", "all")])
def test_decoding_with_sra_on_matches_the_full_pass_given_the_caches_critical_sets(mask, queries):
    sra = SRAConfig(**{**SPARSE.__dict__, "mask": mask, "queries": queries})
    model = make_model(sra)
    tokens = random_tokens(2, 12, seed=1)
    got, cache, _ = prefill_and_decode(model, tokens, None)
    critical = cache.critical
    want, aux = forward(model, tokens, critical=critical)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(aux.critical, critical)


def test_prefill_selects_the_top_k_and_decoding_keeps_tokens_scoring_above_the_threshold():
    model = make_model(SPARSE)
    tokens = random_tokens(2, 12, seed=2)
    _, cache, scores = prefill_and_decode(model, tokens, None)
    scores, critical = np.asarray(scores), np.asarray(cache.critical)
    k = SPARSE.num_critical(8)
    kth_score = -np.sort(-scores[..., :8], axis=-1)[..., k - 1]
    np.testing.assert_array_equal(cache.threshold, kth_score)
    np.testing.assert_array_equal(critical[..., :8], scores[..., :8] >= kth_score[..., None])
    np.testing.assert_array_equal(critical[..., 8:], scores[..., 8:] >= kth_score[..., None])


@pytest.mark.parametrize("sra", [None, SPARSE], ids=["dense", "sra"])
def test_left_padded_prompts_of_different_lengths_decode_like_the_full_pass(sra):
    model = make_model(sra)
    tokens, positions = left_padded([3, 8], total=12)  # prompts occupy slots 0..7; 4 tokens decoded
    got, cache, _ = prefill_and_decode(model, tokens, positions)
    want, _ = forward(model, tokens, positions, critical=None if sra is None else cache.critical)
    real = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(got))
    assert not np.asarray(cache.critical)[:, ~real].any()


def test_cache_is_a_pytree_with_the_contract_shapes(config):
    cache = KVCache.init(config, batch=3, max_len=5, dtype=jnp.bfloat16)
    layers, kv, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    assert cache.k.shape == cache.v.shape == (layers, 3, 5, kv, hd) and cache.k.dtype == jnp.bfloat16
    assert cache.positions.shape == (3, 5) and np.all(cache.positions == -1)
    assert cache.critical.shape == (layers, 3, 5) and cache.threshold.shape == (layers, 3)
    assert cache.critical_slots.shape == (layers, 3, 5) and np.all(cache.critical_slots == -1)
    assert cache.num_critical.shape == (layers, 3) and np.all(cache.num_critical == 0)
    assert len(jax.tree.leaves(cache)) == 8


BERNOULLI = SRAConfig(critical_fraction=1.0, window=3, num_global=1, selection="bernoulli", router_hidden=8)


def test_bernoulli_decoding_matches_the_full_forward_pass_with_the_fixed_cut():
    """Prefill and decode both mark a token critical iff its router score > 0; with a cap that cannot bind
    (critical_fraction=1) the full forward pass makes the same choice, so no forcing is needed."""
    model = make_model(BERNOULLI)
    tokens = random_tokens(2, 12, seed=4)
    got, cache, scores = prefill_and_decode(model, tokens, None)
    want, aux = forward(model, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.critical, aux.critical)
    np.testing.assert_array_equal(cache.critical, np.asarray(scores) > 0)
    np.testing.assert_array_equal(cache.threshold, 0.0)
    assert 0 < np.asarray(cache.critical).mean() < 1  # a real mix, not a degenerate all/none
