"""SRA decode through the sparse decode kernel (attention_impl="pallas"): greedy decoding equals the reference path
token for token, logits agree, and the kernel path really runs (Triton kernel in Pallas interpret mode on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import assert_lists_match_flags, forward, make_model, random_tokens

import pallas_kernels
from sra_jax.config import SRAConfig
from sra_jax.generate import generate
from sra_jax.nn import KVCache, LeftPaddedKVCache, Llama
from sra_jax.nn.cache import critical_slot_lists
from sra_jax.nn import decode as nn_decode

# Both paths are float32; the kernel (exp2-based online softmax over window / sink / critical tiles, splits merged
# by log-sum-exp) and the reference (one masked softmax) round differently: ~1e-6 per attention output, grown by
# two layers and the LM head. 1e-4 is ~20x the largest difference seen, far below a wrong mask (>1e-2).
ATOL = 1e-4
SPARSE = dict(critical_fraction=0.25, window=3, num_global=1, router_hidden=8)
CASES = {
    "topk-critical": SRAConfig(**SPARSE, selection="topk", queries="critical"),
    # layer 0 dense (SRA off), layer 1 SRA: both kinds of layer in one model
    "gumbel-all-mixed": SRAConfig(**SPARSE, selection="gumbel_topk", queries="all", layers=(1,)),
    # static mask: layer 1 reuses layer 0's critical flags from the cache
    "bernoulli-critical-static": SRAConfig(**{**SPARSE, "critical_fraction": 1.0}, selection="bernoulli", mask="static"),
}
PROMPT_LENGTHS = [3, 8, 5]  # ragged: left-padded into 8 slots
STEPS = 5


def _pair(sra):
    """Same weights: the reference model and the pallas model whose decode steps use the kernel (interpret mode)."""
    return make_model(sra), make_model(sra, attention_impl="pallas", decode_kernel="interpret")


def _ragged_prompts():
    tokens = np.asarray(random_tokens(len(PROMPT_LENGTHS), 8, seed=11))
    positions = np.stack([np.arange(8) - (8 - n) for n in PROMPT_LENGTHS])
    positions = np.where(positions < 0, -1, positions)
    return jnp.asarray(np.where(positions < 0, 0, tokens)), jnp.asarray(positions, jnp.int32)


def greedy_decode(model: Llama, tokens, positions, steps: int = STEPS, layout: str = "checked"):
    """(new tokens [b, steps], logits of every decode step [b, steps, vocab], final cache): one prefill, then one
    jitted single-token call per step, feeding back the argmax. layout="left_padded": a `LeftPaddedKVCache` built
    from the prompt lengths, which sets the positions itself."""
    max_len = tokens.shape[1] + steps
    if layout == "left_padded":
        lengths = (positions >= 0).sum(-1)
        cache = LeftPaddedKVCache.create(model.config, lengths, prompt_len=tokens.shape[1], max_len=max_len)
    else:
        cache = KVCache.init(model.config, tokens.shape[0], max_len, layout=layout)
    given = layout != "left_padded"
    logits, aux = forward(model, tokens, positions if given else None, cache)
    cache, token, position = aux.cache, jnp.argmax(logits[:, -1], -1), positions[:, -1] + 1
    out, step_logits = [], []
    for step in range(steps):
        out.append(token)
        logits, aux = forward(model, token[:, None], (position + step)[:, None] if given else None, cache)
        cache = aux.cache
        step_logits.append(logits[:, 0])
        token = jnp.argmax(logits[:, 0], -1)
    return jnp.stack(out, 1), jnp.stack(step_logits, 1), cache


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_decode_through_the_kernel_equals_the_reference_path(name):
    reference, pallas = _pair(CASES[name])
    tokens, positions = _ragged_prompts()
    want_tokens, want_logits, want_cache = greedy_decode(reference, tokens, positions)
    got_tokens, got_logits, got_cache = greedy_decode(pallas, tokens, positions)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    np.testing.assert_allclose(got_logits, want_logits, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(got_cache.critical, want_cache.critical)
    assert_lists_match_flags(got_cache)  # what the kernel read on the last step
    kv_start, ok = nn_decode.left_padded_layout(got_cache.positions, got_cache.index)
    assert bool(ok)  # the kernel path was eligible on every step (the layout only grows)
    np.testing.assert_array_equal(kv_start, [8 - n for n in PROMPT_LENGTHS])
    if CASES[name] is not None:
        assert np.asarray(got_cache.critical)[:, :, 8:].any()  # decoded tokens became critical: the list grows


def test_a_left_padded_cache_decodes_like_a_checked_one():
    """A `LeftPaddedKVCache` skips the per-step layout check and its cond; it writes the positions the checked
    cache is given, so the kernel reads the same rows and the logits are those of the checked cache."""
    _, pallas = _pair(CASES["topk-critical"])
    tokens, positions = _ragged_prompts()
    want_tokens, want_logits, want_cache = greedy_decode(pallas, tokens, positions)
    got_tokens, got_logits, got_cache = greedy_decode(pallas, tokens, positions, layout="left_padded")
    assert isinstance(got_cache, LeftPaddedKVCache) and got_cache.layout == "left_padded"  # survives the calls
    np.testing.assert_array_equal(got_cache.positions, want_cache.positions)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-6, rtol=0)


def test_a_left_padded_layout_cannot_be_declared_falsely():
    """A declaration the cache cannot keep is an error: `KVCache` only checks layouts, `LeftPaddedKVCache` refuses
    caller positions (the right-padded or offset positions that a declared layout once decoded wrongly) and
    prompt lengths outside its prompt."""
    _, pallas = _pair(CASES["topk-critical"])
    config = pallas.config
    for layout in ("left_padded", "right_padded"):
        with pytest.raises(ValueError, match="layout"):
            KVCache.init(config, 1, 8, layout=layout)
    with pytest.raises(TypeError):
        KVCache.init(config, 1, 8).replace(layout="left_padded")  # the layout is the type, not a field
    cache = LeftPaddedKVCache.create(config, [3, 5], prompt_len=5, max_len=8)
    right_padded = jnp.array([[0, 1, 2, -1, -1], [0, 1, 2, 3, 4]], jnp.int32)
    with pytest.raises(ValueError, match="positions cannot be given with a LeftPaddedKVCache"):
        pallas(random_tokens(2, 5), right_padded, cache)
    for lengths in ([6, 5], [-1, 5]):
        with pytest.raises(ValueError, match="prompt_lengths"):
            LeftPaddedKVCache.create(config, lengths, prompt_len=5, max_len=8)
    with pytest.raises(ValueError, match="prompt_len"):
        LeftPaddedKVCache.create(config, [3], prompt_len=8, max_len=8)


@settings(max_examples=8)
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=3), first_call=st.integers(1, 6))
def test_a_left_padded_cache_keeps_its_layout_whatever_the_calls(lengths, first_call):
    """After any split of the prompt into calls and any number of decode calls, the positions a LeftPaddedKVCache
    wrote are exactly the layout the decode kernel reads (checked by `left_padded_layout`), so skipping the check
    is safe; a row whose prompt is still all padding has no valid slot yet."""
    from sra_jax.config import LlamaConfig

    cache = LeftPaddedKVCache.create(LlamaConfig.tiny(), lengths, prompt_len=6, max_len=10)
    for size in (first_call, 6 - first_call, 1, 2):
        if size == 0:
            continue
        positions = cache.next_positions(size)
        cache = cache.replace(
            positions=jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.index)),
            index=cache.index + size,
        )
        kv_start, ok = nn_decode.left_padded_layout(cache.positions, cache.index)
        started = np.asarray(cache.kv_start) < int(cache.index)
        if started.all():
            assert bool(ok)
            np.testing.assert_array_equal(kv_start, cache.kv_start)
        np.testing.assert_array_equal(np.asarray(cache.positions).max(-1) + 1,
                                      np.maximum(int(cache.index) - np.asarray(cache.kv_start), 0))


def test_generate_with_the_kernel_matches_the_reference_token_for_token():
    sra = CASES["topk-critical"]
    reference, pallas = _pair(sra)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [9]]
    assert generate(pallas, prompts, max_new_tokens=6) == generate(reference, prompts, max_new_tokens=6)


def test_a_multi_token_decode_call_respects_each_new_tokens_criticality():
    """Three new tokens in one call (the kernel path takes up to MAX_DECODE_TOKENS): with queries="critical" a
    non-critical new token must not see distant critical keys, a critical one must (queries="all" is the one-call
    path the greedy tests cover)."""
    sra = SRAConfig(**{**SPARSE, "critical_fraction": 0.5}, selection="topk", queries="critical")
    reference, pallas = _pair(sra)
    tokens = random_tokens(2, 14, seed=5)
    outs = []
    for model in (reference, pallas):
        cache = KVCache.init(model.config, 2, 14)
        _, aux = forward(model, tokens[:, :11], None, cache)
        logits, aux = forward(model, tokens[:, 11:], None, aux.cache)
        outs.append((logits, aux.cache.critical))
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    new_flags = np.asarray(outs[1][1])[:, :, 11:]
    assert new_flags.any() and not new_flags.all()  # a mix of critical and non-critical new tokens
    np.testing.assert_allclose(outs[1][0], outs[0][0], atol=ATOL, rtol=0)


def test_the_kernel_output_is_what_the_model_uses(monkeypatch):
    """Replacing the kernel by zeros changes the decode logits (the pallas path really runs), and a cache whose
    layout the kernel cannot read (positions offset by 2: slot != first slot + position) falls back to the general
    path with the right answer."""
    sra = CASES["topk-critical"]
    reference, pallas = _pair(sra)
    tokens = random_tokens(2, 9, seed=3)

    def two_calls(model, positions):
        cache = KVCache.init(model.config, 2, 9)
        _, aux = forward(model, tokens[:, :8], positions[:, :8], cache)
        return forward(model, tokens[:, 8:], positions[:, 8:], aux.cache)[0]

    plain = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    want = two_calls(reference, plain)
    np.testing.assert_allclose(two_calls(pallas, plain), want, atol=ATOL, rtol=0)
    offset = plain + 2
    np.testing.assert_allclose(two_calls(pallas, offset), two_calls(reference, offset), atol=ATOL, rtol=0)

    # A fresh jit (the shared `forward` would reuse its compiled program) traces the replaced kernel.
    monkeypatch.setattr(pallas_kernels, "sparse_decode_attention", lambda q, *a, **k: jnp.zeros_like(q))
    patched = nnx.jit(lambda model, tokens, positions, cache: model(tokens, positions, cache))
    cache = KVCache.init(pallas.config, 2, 9)
    _, aux = patched(pallas, tokens[:, :8], plain[:, :8], cache)
    assert np.abs(np.asarray(patched(pallas, tokens[:, 8:], plain[:, 8:], aux.cache)[0]) - np.asarray(want)).max() > 1e-2
    cache = KVCache.init(pallas.config, 2, 9)
    _, aux = patched(pallas, tokens[:, :8], offset[:, :8], cache)
    np.testing.assert_allclose(patched(pallas, tokens[:, 8:], offset[:, 8:], aux.cache)[0],
                               two_calls(reference, offset), atol=ATOL, rtol=0)


def test_left_padded_layout_accepts_only_the_layout_the_kernel_reads():
    good = jnp.array([[-1, -1, 0, 1, 2, -1], [0, 1, 2, 3, 4, -1]])
    kv_start, ok = nn_decode.left_padded_layout(good, jnp.int32(5))
    np.testing.assert_array_equal(kv_start, [2, 0])
    assert bool(ok)
    for bad in (
        [[-1, -1, 0, 1, 2, -1], [0, 1, 2, 3, -1, -1]],  # right padding inside the filled slots
        [[-1, -1, 0, 2, 3, -1], [0, 1, 2, 3, 4, -1]],  # a gap in the positions
        [[-1, -1, 1, 2, 3, -1], [0, 1, 2, 3, 4, -1]],  # positions offset from the first slot
        [[-1, -1, 0, 1, 2, 7], [0, 1, 2, 3, 4, -1]],  # a filled slot past the length
    ):
        assert not bool(nn_decode.left_padded_layout(jnp.array(bad), jnp.int32(5))[1]), bad


def test_critical_slot_lists_list_every_critical_slot_in_order_then_minus_one():
    critical = jnp.array([[False, True, False, True, True], [False] * 5])
    slots, counts = critical_slot_lists(critical)
    np.testing.assert_array_equal(slots, [[1, 3, 4, -1, -1], [-1] * 5])
    np.testing.assert_array_equal(counts, [3, 0])


def test_decode_kernel_switches_and_bad_values_are_rejected():
    model = make_model(CASES["topk-critical"], attention_impl="pallas")
    assert all(layer.attn.decode_kernel == "auto" for layer in model.layers)
    model.set_decode_kernel("off")
    assert all(layer.attn.decode_kernel == "off" for layer in model.layers)
    with pytest.raises(ValueError, match="decode_kernel"):
        model.set_decode_kernel("cuda")
    with pytest.raises(ValueError, match="decode_kernel"):
        make_model(None, attention_impl="pallas", decode_kernel="fast")


@pytest.mark.parametrize("layout", ["checked", "left_padded"])
def test_a_decode_step_updates_the_cache_in_place(layout):
    """A jitted decode step on a donated cache writes K/V, flags and the critical slot list in place: the compiled
    program copies no cache-sized buffer (a copy per step would read and write the whole cache, far more than the
    sparse kernel reads). Moving the cache writes inside a lax.cond (e.g. one cond around all layers) makes XLA
    copy the whole cache in and out of the branches, which this catches. A checked cache branches on its layout in
    every layer; a LeftPaddedKVCache has no conditional at all (on a GPU each one waits on the host)."""
    from sra_jax.config import LlamaConfig

    config = LlamaConfig.tiny(num_hidden_layers=3)
    model = make_model(CASES["topk-critical"], config=config, attention_impl="pallas", decode_kernel="reference")
    if layout == "left_padded":
        cache = LeftPaddedKVCache.create(config, [4, 6], prompt_len=6, max_len=40).replace(index=jnp.int32(6))
    else:
        cache = KVCache.init(config, 2, 40)
    graphdef, state = nnx.split(model)

    def step(state, tokens, cache):
        logits, aux = nnx.merge(graphdef, state)(tokens, None, cache)
        return logits, aux.cache

    hlo = jax.jit(step, donate_argnums=(2,)).lower(state, jnp.ones((2, 1), jnp.int32), cache).compile().as_text()
    big = {f"[{','.join(map(str, leaf.shape))}]" for leaf in (cache.k, cache.critical, cache.critical_slots)}
    copies = [
        line for line in hlo.splitlines()
        if " copy(" in line and any(shape in line.split("=")[1].split(" copy(")[0] for shape in big)
    ]
    # checked: the step branches on the layout (the kernel path is in the program); left-padded: no branch
    assert (" conditional(" in hlo) == (layout == "checked")
    assert not copies, copies[:3]
