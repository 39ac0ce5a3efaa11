"""NSA decode with a KV cache: `ops.nsa.nsa_prefill` + `nsa_decode_step` against the forward (`nsa_attention` on
positions 0..t, at t, and the forward on the whole sequence: it is causal) for every t, left-padded rows against each
row alone, and `Llama` with NSA layers first and last (NSACache) prefill + token-by-token decode against the forward
on the whole sequence."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sra_jax.config import LlamaConfig, NSAConfig, SRAConfig
from sra_jax.nn import KVCache, Llama
from sra_jax.nn.cache import LeftPaddedKVCache
from sra_jax.nn.nsa_cache import NSACache
from sra_jax.ops import nsa

D = 8


def _data(seed, b, s, hq, hkv, block):
    ks = jax.random.split(jax.random.key(seed), 8)
    q, k, v = (jax.random.normal(ks[i], (b, s, h, D)) for i, h in enumerate((hq, hkv, hkv)))
    gates = jax.nn.sigmoid(jax.random.normal(ks[3], (b, s, hq, 3)))
    prm = dict(
        cmp_weights_k=jax.random.normal(ks[4], (block,)) / block, cmp_pos_k=0.3 * jax.random.normal(ks[5], (block, D)),
        cmp_weights_v=jax.random.normal(ks[6], (block,)) / block, cmp_pos_v=0.3 * jax.random.normal(ks[7], (block, D)),
    )  # fmt: skip
    return q, k, v, gates, prm


def _forward_every_prefix(q, k, v, g, prm, cfg):
    """out[:, t] = the forward on positions 0..t (later tokens as padding, which the forward never reads), at t."""
    b, s = q.shape[:2]
    fwd = jax.jit(lambda pos: nsa.nsa_attention(q, k, v, g, pos, **prm, **cfg)[0])
    i = jnp.arange(s)
    return np.stack([np.asarray(fwd(jnp.broadcast_to(jnp.where(i <= t, i, -1), (b, s))))[:, t] for t in range(s)], 1)


def _decode_all(q, k, v, g, prm, cfg, prompt_lengths, max_len):
    """Row r: a prompt of prompt_lengths[r] tokens left-padded to max(prompt_lengths) slots, prefilled, then its
    next tokens decoded one per step. Returns out[r, p] for every position p the row reaches (nan after)."""
    b, s = q.shape[:2]
    lengths = np.asarray(prompt_lengths)
    p_len = int(lengths.max())
    shift = p_len - lengths  # row r's position p sits in slot p + shift[r]
    steps = s - p_len
    slot_pos = np.full((b, max_len), -1, np.int32)
    for r in range(b):
        slot_pos[r, shift[r] : shift[r] + lengths[r] + steps] = np.arange(lengths[r] + steps)
    src = np.clip(np.arange(max_len)[None] - shift[:, None], 0, s - 1)
    at_slots = lambda x: jnp.take_along_axis(x, jnp.asarray(src).reshape(b, max_len, 1, 1), 1)
    qs, ks, vs, gs = (at_slots(x) for x in (q, k, v, g))
    sp = jnp.asarray(slot_pos)
    pre = jax.jit(functools.partial(nsa.nsa_prefill, max_len=max_len, **prm, **cfg))
    out, ck, cv, ce = pre(qs[:, :p_len], ks[:, :p_len], vs[:, :p_len], gs[:, :p_len], sp[:, :p_len])
    outs = [out]
    step = jax.jit(functools.partial(nsa.nsa_decode_step, **prm, **cfg))
    visible = jnp.where(jnp.arange(max_len) < p_len, sp, -1)
    for i in range(steps):
        slot = p_len + i
        visible = visible.at[:, slot].set(sp[:, slot])
        cut = lambda x: jnp.where((jnp.arange(max_len) <= slot)[None, :, None, None], x, 0.0)  # noqa: B023
        o, (ck, cv, ce) = step(qs[:, slot : slot + 1], cut(ks), cut(vs), gs[:, slot : slot + 1],
                               sp[:, slot : slot + 1], visible, jnp.int32(slot), ck, cv, ce)  # fmt: skip
        outs.append(o)
    out = np.asarray(jnp.concatenate(outs, 1))  # by slot
    rows = [out[r, shift[r] : shift[r] + lengths[r] + steps] for r in range(b)]
    return np.stack([np.pad(x, ((0, s - len(x)), (0, 0), (0, 0)), constant_values=np.nan) for x in rows])


CASES = [  # hq, hkv, block, stride, block_sel, top_n, window
    (4, 2, 4, 2, 4, 3, 3),  # stride < block, window < block
    (4, 1, 4, 4, 2, 3, 5),  # MQA, stride = block, selection blocks smaller than compression blocks
    (4, 2, 8, 4, 4, 9, 16),  # top_n larger than the available blocks
]


@pytest.mark.parametrize("hq,hkv,block,stride,block_sel,top_n,window", CASES)
def test_decode_equals_the_forward_on_every_prefix(hq, hkv, block, stride, block_sel, top_n, window):
    cfg = dict(block=block, stride=stride, block_sel=block_sel, top_n=top_n, window=window)
    s = 21
    q, k, v, g, prm = _data(hq + block, 2, s, hq, hkv, block)
    got = _decode_all(q, k, v, g, prm, cfg, prompt_lengths=[1, 1], max_len=24)  # every position a decode step
    want = _forward_every_prefix(q, k, v, g, prm, cfg)
    # Same math in a different summation order (cached compressed blocks, cache-wide masks): float32 rounding.
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # the forward is causal: the whole sequence's forward gives the same at every t
    whole = np.asarray(nsa.nsa_attention(q, k, v, g, jnp.broadcast_to(jnp.arange(s), (2, s)), **prm, **cfg)[0])
    np.testing.assert_allclose(got, whole, rtol=2e-5, atol=2e-5)


def test_left_padded_rows_equal_each_row_alone():
    """Rows with different prompt lengths in one left-padded batch (prefill, then decode: rows complete compression
    blocks at different steps) give what each row gives alone; the prefill is by position, not by slot."""
    cfg = dict(block=4, stride=2, block_sel=4, top_n=3, window=3)
    s = 19
    q, k, v, g, prm = _data(7, 3, s, 4, 2, 4)
    got = _decode_all(q, k, v, g, prm, cfg, prompt_lengths=[6, 11, 1], max_len=24)
    want = _forward_every_prefix(q, k, v, g, prm, cfg)
    for r, n in enumerate([6, 11, 1]):
        p_len = 11
        # the prompt's outputs are the forward's on the whole prompt; decoded positions the forward's on 0..t
        prompt = jax.jit(lambda pos: nsa.nsa_attention(q, k, v, g, pos, **prm, **cfg)[0])(
            jnp.broadcast_to(jnp.where(jnp.arange(s) < n, jnp.arange(s), -1), (3, s))
        )
        np.testing.assert_allclose(got[r, :n], np.asarray(prompt)[r, :n], rtol=2e-5, atol=2e-5)
        reach = n + s - p_len
        np.testing.assert_allclose(got[r, n:reach], want[r, n:reach], rtol=2e-5, atol=2e-5)


# top_n=3 of up to 4 selection blocks: from the 13th token on, a token's third block is picked by importance.
TINY_NSA = NSAConfig(block=4, stride=2, block_sel=4, top_n=3, window=3)
NSA_LAYERS = (0, 2)  # NSA first (a dense and an NSA layer read its outputs) and last


@pytest.fixture(scope="module")
def nsa_model():
    config = LlamaConfig.tiny(num_hidden_layers=3)
    sra = SRAConfig(attention="nsa", layers=NSA_LAYERS, nsa=TINY_NSA)
    model = Llama(config, sra, rngs=nnx.Rngs(0))
    for i in NSA_LAYERS:
        for name in ("nsa_cmp_pos_k", "nsa_cmp_pos_v"):  # non-trivial pool weights (init: mean pool, no embedding)
            p = getattr(model.layers[i].attn, name)
            p[...] = 0.3 * jax.random.normal(jax.random.key(5 + i), p[...].shape)
    step = nnx.jit(lambda m, t, c: m(t, cache=c))
    whole = nnx.jit(lambda m, t: m(t)[0])
    return config, sra, model, step, whole


def test_nsa_cache_decode_equals_the_forward(nsa_model):
    """Decoding token t equals the forward on the whole sequence at t (the forward is causal, so this is also the
    recomputation of the prefix 0..t), with NSA layers before other layers."""
    config, sra, model, step, whole = nsa_model
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, config.vocab_size)
    cache = NSACache.init(config, sra, batch=2, max_len=16)
    logits, aux = step(model, tokens[:, :5], cache)
    full, _ = model(tokens[:, :5])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full), rtol=1e-5, atol=1e-5)
    want = np.asarray(whole(model, tokens))
    for t in range(5, 16):
        logits, aux = step(model, tokens[:, t : t + 1], aux.cache)
        # Same math in another order (cached compressed blocks, cache-wide masks): float32 rounding only.
        np.testing.assert_allclose(np.asarray(logits)[:, 0], want[:, t], rtol=1e-5, atol=1e-5, err_msg=f"t={t}")
    assert int(aux.cache.index) == 16
    for i in NSA_LAYERS:
        assert (np.asarray(aux.cache.cmp_end[i]) == 2 * np.arange(7) + 3).all()  # blocks end at 3, 5, ..., 15
    assert (np.asarray(aux.cache.cmp_end[1]) == -1).all()  # the dense layer keeps none


def test_nsa_cache_left_padded_rows_equal_each_row_alone(nsa_model):
    config, sra, model, step, whole = nsa_model
    lengths, prompt_len, steps = [3, 7], 7, 7
    tokens = jax.random.randint(jax.random.key(4), (2, 14), 0, config.vocab_size)
    # row r's tokens left-padded: slot j holds token j - (prompt_len - lengths[r])
    padded = np.zeros((2, prompt_len + steps), np.int32)
    for r, n in enumerate(lengths):
        padded[r, prompt_len - n :] = np.asarray(tokens[r, : n + steps])
    kv = LeftPaddedKVCache.create(config, lengths, prompt_len=prompt_len, max_len=prompt_len + steps)
    logits, aux = step(model, jnp.asarray(padded[:, :prompt_len]), NSACache.wrap(kv, config, sra))
    outs = [np.asarray(logits)[:, -1]]
    for i in range(steps - 1):
        logits, aux = step(model, jnp.asarray(padded[:, prompt_len + i : prompt_len + i + 1]), aux.cache)
        outs.append(np.asarray(logits)[:, 0])
    for r, n in enumerate(lengths):
        want = np.asarray(whole(model, tokens[r : r + 1]))[0, n - 1 : n + steps - 1]  # causal: row r alone
        np.testing.assert_allclose(np.stack([o[r] for o in outs]), want, rtol=1e-5, atol=1e-5)


def test_nsa_layers_need_an_nsa_cache_built_for_their_settings(nsa_model):
    config, sra, model, step, _ = nsa_model
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="layer 0 .*NSACache"):
        step(model, tokens, KVCache.init(config, batch=1, max_len=8))
    other = SRAConfig(attention="nsa", layers=NSA_LAYERS,
                      nsa=NSAConfig(block=8, stride=4, block_sel=4, top_n=3, window=3))  # fmt: skip
    with pytest.raises(ValueError, match="layer 0 .*compressed"):
        step(model, tokens, NSACache.init(config, other, batch=1, max_len=16))
    with pytest.raises(ValueError, match="attention='nsa'"):
        NSACache.init(config, SRAConfig(attention="dsa", layers=NSA_LAYERS), batch=1, max_len=8)
    with pytest.raises(ValueError, match="must start at an empty cache"):
        model(tokens[:, :2], cache=NSACache.init(config, sra, batch=1, max_len=16).replace(index=jnp.int32(4)))


def test_ops_decode_refuses_bad_input():
    q, k, v, g, prm = _data(0, 1, 6, 4, 2, 4)
    cfg = dict(block=4, stride=2, block_sel=4, top_n=2, window=3)
    with pytest.raises(ValueError, match=r"positions must be < max\(s, block\) = 6"):
        nsa.nsa_prefill(q, k, v, g, jnp.arange(6)[None] + 1, max_len=8, **prm, **cfg)
    pos = jnp.arange(6)[None]
    with pytest.raises(ValueError, match="one token per row"):
        nsa.nsa_decode(q, k, v, g, pos, pos, k[:, :1], v[:, :1], pos[:, :1], **cfg)
    assert nsa.num_cache_blocks(3, block=4, stride=2) == 1 and nsa.num_cache_blocks(16, block=4, stride=2) == 7
