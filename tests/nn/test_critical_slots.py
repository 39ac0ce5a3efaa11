"""The KV cache's critical slot lists (`critical_slots`, `num_critical`): every call keeps them equal to the ascending
critical slots of the flags (what the sparse decode kernel reads), and the kernel path really reads them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_lists_match_flags, forward, make_model, random_tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn import KVCache
from sra_jax.nn.cache import critical_slot_lists


@jax.jit
def _write_call(cache: KVCache, flags):
    """One call's bookkeeping, as the model does it: every layer appends its flags [layers, b, s], then the flags
    and the index are written."""
    for layer in range(cache.num_layers):
        cache = cache.append_critical(layer, flags[layer])
    critical = jax.lax.dynamic_update_slice(cache.critical, flags, (0, 0, cache.index))
    return cache.replace(critical=critical, index=cache.index + flags.shape[-1])


@settings(max_examples=20, deadline=None)
@given(first=st.integers(1, 16), fraction=st.floats(0, 1), seed=st.integers(0, 2**16), data=st.data())
def test_appending_call_by_call_keeps_the_lists_equal_to_the_flags(first, fraction, seed, data):
    """A prefill of any length then calls of 1-4 tokens (decode steps) until the cache is full, random flags per
    layer, row and call: after every call the lists equal the flags' ascending slots. (Layers, batch and max_len
    stay fixed so that each call size compiles once for every example.)"""
    layers, batch, max_len = 2, 3, 16
    cache = KVCache.init(LlamaConfig.tiny(num_hidden_layers=layers), batch, max_len)
    rng = np.random.default_rng(seed)
    size = first
    while size > 0:
        cache = _write_call(cache, jnp.asarray(rng.random((layers, batch, size)) < fraction))
        assert_lists_match_flags(cache)
        size = min(data.draw(st.integers(1, 4), label="step"), max_len - int(cache.index))


def test_a_call_at_index_zero_starts_the_lists_afresh():
    config = LlamaConfig.tiny(num_hidden_layers=1)
    cache = KVCache.init(config, 1, 6).with_critical(jnp.asarray([[[True, False, True, True, False, False]]]))
    cache = cache.replace(index=jnp.int32(0)).append_critical(0, jnp.asarray([[False, True]]))
    assert int(cache.num_critical[0, 0]) == 1 and int(cache.critical_slots[0, 0, 0]) == 1


def test_with_critical_rebuilds_the_lists_and_checks_the_shape():
    config = LlamaConfig.tiny(num_hidden_layers=2)
    flags = jnp.asarray(np.random.default_rng(0).random((2, 3, 9)) < 0.4)
    cache = KVCache.init(config, 3, 9).with_critical(flags)
    np.testing.assert_array_equal(cache.critical, flags)
    assert_lists_match_flags(cache)
    with pytest.raises(ValueError, match=r"critical \(2, 3, 8\)"):
        cache.with_critical(flags[..., :8])


# Layer 1 dense (its lists must stay empty), layers 0 and 2 SRA; a high fraction so decoded tokens often clear the
# prefill threshold and the lists grow while decoding.
DYNAMIC = SRAConfig(critical_fraction=0.4, window=2, num_global=1, selection="topk", router_hidden=8, layers=(0, 2))
# Static mask (layers 1, 2 reuse layer 0's flags), Bernoulli cut at 0: roughly half of every call's tokens critical.
STATIC = SRAConfig(critical_fraction=1.0, window=2, num_global=1, selection="bernoulli", mask="static",
                   router_hidden=8)
WIDTH, STEPS = 8, 6


@pytest.mark.parametrize("sra", [DYNAMIC, STATIC], ids=["dynamic", "static"])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_model_calls_keep_the_lists_equal_to_the_flags(sra, data):
    """Left-padded prompts of any lengths, one prefill, then STEPS decode calls (one token, or two at once): the
    lists match the cache's flags after every call, and they grew while decoding."""
    model, batch = make_model(sra, config=LlamaConfig.tiny(num_hidden_layers=3)), 3
    lengths = data.draw(st.lists(st.integers(1, WIDTH), min_size=batch, max_size=batch), label="lengths")
    tokens = random_tokens(batch, WIDTH + STEPS, seed=data.draw(st.integers(0, 99), label="seed"))
    positions = np.stack([np.arange(WIDTH + STEPS) - (WIDTH - n) for n in lengths])
    positions = jnp.asarray(np.where(positions < 0, -1, positions), jnp.int32)
    cache = KVCache.init(model.config, batch, WIDTH + STEPS)
    _, aux = forward(model, tokens[:, :WIDTH], positions[:, :WIDTH], cache)
    assert_lists_match_flags(aux.cache)
    after_prefill = np.asarray(aux.cache.num_critical)
    step = 1 + data.draw(st.integers(0, 1), label="tokens per call")
    for start in range(WIDTH, WIDTH + STEPS, step):
        _, aux = forward(model, tokens[:, start : start + step], positions[:, start : start + step], aux.cache)
        assert_lists_match_flags(aux.cache)
    if sra is DYNAMIC:
        assert not np.asarray(aux.cache.num_critical)[1].any()  # the dense layer
    assert (np.asarray(aux.cache.num_critical) >= after_prefill).all()


def test_the_decode_kernel_reads_the_lists_not_the_flags():
    """Same flags, different lists: with correct lists the kernel path equals the general path; a list missing its
    critical slots (counts 0) or naming other slots changes the decode logits, while the general path (which reads
    the flags) does not change. So a wrong list cannot pass the equality tests."""
    sra = SRAConfig(critical_fraction=0.5, window=2, num_global=1, selection="topk", queries="all", router_hidden=8)
    general = make_model(sra)
    kernel = make_model(sra, attention_impl="pallas", decode_kernel="reference")
    tokens = random_tokens(2, 13, seed=7)
    _, aux = forward(general, tokens[:, :12], None, KVCache.init(general.config, 2, 13))  # same weights: one prefill
    cache = aux.cache
    assert_lists_match_flags(cache)
    want = forward(general, tokens[:, 12:], None, cache)[0]
    np.testing.assert_allclose(forward(kernel, tokens[:, 12:], None, cache)[0], want, atol=1e-5, rtol=0)

    assert (np.asarray(cache.num_critical) > 2).all()  # distant critical keys exist (window 2, 1 global)
    emptied = cache.replace(num_critical=jnp.zeros_like(cache.num_critical))
    others, other_counts = critical_slot_lists(~cache.critical & (cache.positions >= 0)[None])  # the other slots
    swapped = cache.replace(critical_slots=others, num_critical=other_counts)
    for wrong in (emptied, swapped):
        got = forward(kernel, tokens[:, 12:], None, wrong)[0]
        assert np.abs(np.asarray(got) - np.asarray(want)).max() > 1e-3
        np.testing.assert_array_equal(forward(general, tokens[:, 12:], None, wrong)[0], want)
