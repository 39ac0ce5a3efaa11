"""pallas_kernels.finite: the rows that see a non-finite key come from the visibility rule, a block of rows at a time
(checked against the dense any(mask & bad), with blocks that do not divide the rows), the wrapper makes a leaky
attention (masked weights times 0, as in a fused kernel) exact, and a compact SRA program holds one attention."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import pallas_kernels as pk
from pallas_kernels import finite


def _dense_seen(mask, bad, hq):
    """[b, sq, hq]: any visible flagged key, per query head (mask [b, sq, sk] or [b, h, sq, sk])."""
    b, sk, hkv = bad.shape
    if mask.ndim == 3:
        mask = mask[:, None]
    mask = np.repeat(mask, hq // mask.shape[1], axis=1)  # [b, hq, sq, sk]
    per_head = np.repeat(bad, hq // hkv, axis=-1).transpose(0, 2, 1)[:, :, None, :]  # [b, hq, 1, sk]
    return (mask & per_head).any(-1).transpose(0, 2, 1)


@st.composite
def _cases(draw):
    b, sq, sk = draw(st.integers(1, 2)), draw(st.integers(1, 19)), draw(st.integers(1, 17))
    hkv, g = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3]))
    hq = hkv * g
    heads = draw(st.sampled_from([None, 1, hkv, hq]))
    seed = draw(st.integers(0, 2**31 - 1))
    budget = draw(st.integers(1, 3 * b * sk * hq))  # down to one row per block
    return b, sq, sk, hkv, hq, heads, seed, budget


@settings(deadline=None)
@given(_cases())
def test_rows_seeing_matches_the_dense_search_for_any_block_size(case):
    b, sq, sk, hkv, hq, heads, seed, budget = case
    rng = np.random.default_rng(seed)
    shape = (b, sq, sk) if heads is None else (b, heads, sq, sk)
    mask = rng.random(shape) < 0.3
    bad = rng.random((b, sk, hkv)) < 0.2
    visible = lambda start, size: jax.lax.dynamic_slice_in_dim(jnp.asarray(mask), start, size, axis=-2)
    with mock.patch.object(finite, "_ROW_SEARCH_ELEMENTS", budget):
        got = finite.rows_seeing(visible, jnp.asarray(bad), sq, hq)
    np.testing.assert_array_equal(got, _dense_seen(mask, bad, hq))


def _leaky_attention(mask):
    """Masked attention whose masked weights are 0 times the value (0 * NaN = NaN), as in a fused kernel."""

    def attend(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        s = jnp.where(mask[:, None], s, -1e30)
        p = jax.nn.softmax(s, axis=-1) * mask[:, None]
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    return attend


def test_exclude_nonfinite_keys_makes_a_leaky_attention_exact():
    """NaN k at key 3 and inf v at key 6 of a causal mask with a window of 3: rows 3..5 and 6..8 are NaN, the rest
    equal the clean output (with the clean gradients); without the wrapper no row is finite."""
    b, s, h, d = 1, 10, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (b, s, h, d), jnp.float32) for key in keys)
    i = np.arange(s)
    mask = jnp.asarray(((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3))[None])
    bad_k, bad_v = k.at[:, 3].set(jnp.nan), v.at[:, 6].set(jnp.inf)
    attend = _leaky_attention(mask)
    rows = lambda start, size: jax.lax.dynamic_slice_in_dim(mask, start, size, axis=-2)
    run = jax.jit(lambda q, k, v: finite.exclude_nonfinite_keys(attend, q, k, v, rows))
    assert not np.isfinite(np.asarray(attend(q, bad_k, bad_v))).any()
    got, want = run(q, bad_k, bad_v), run(q, k, v)
    seen = np.isin(i, [3, 4, 5, 6, 7, 8])
    assert np.isnan(np.asarray(got[:, seen])).all()
    np.testing.assert_array_equal(got[:, ~seen], want[:, ~seen])
    loss = jax.jit(jax.grad(lambda q, k, v: jnp.sum(run(q, k, v)[:, ~seen] ** 2), argnums=(0, 1, 2)))
    for g, w in zip(loss(q, bad_k, bad_v), loss(q, k, v), strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)  # same program on the same finite values


def test_the_compact_path_lowers_one_attention():
    """Lowered for the GPU (Triton, no device needed): the window band and the critical part, one kernel each; the
    rows that see a non-finite key need no second run of them."""
    b, s = 1, 256
    q = jnp.zeros((b, s, 4, 64), jnp.bfloat16)
    k = jnp.zeros((b, s, 2, 64), jnp.bfloat16)
    positions = jnp.arange(s, dtype=jnp.int32)[None]
    critical = positions % 9 == 0
    run = lambda q, k, v: pk.sra_compact_attention(
        q, k, v, q_positions=positions, k_positions=positions, q_critical=critical, k_critical=critical, window=32,
        num_global=2, queries="critical", max_critical=32, backend="triton",
    )
    text = jax.jit(run).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2


def test_block_sparse_rows_follow_the_layout_and_the_rule_a_row_at_a_time():
    """Triton (interpret) with a per-head random layout and a sliding window, the row search one row per block
    (`_ROW_SEARCH_ELEMENTS` tiny): NaN exactly where the reference (dense, where()-masked) gives NaN, the other
    rows equal to it: a non-finite key reaches a row only through a visited block and the token rule."""
    from pallas_kernels.block_sparse.layout import layout_from_block_mask

    b, s, hq, hkv, d = 1, 40, 4, 2, 16
    q, k, v = (jax.random.normal(key, (b, s, h, d), jnp.float32)
               for key, h in zip(jax.random.split(jax.random.PRNGKey(5), 3), (hq, hkv, hkv), strict=True))
    blocks = pk.random_causal_block_mask(jax.random.PRNGKey(6), 3, 0.6, batch=b, heads=hq)
    layout = layout_from_block_mask(blocks, block_q=16, block_k=16)
    k = k.at[:, 9, 0].set(jnp.nan).at[:, 30, 1].set(jnp.nan)
    v = v.at[:, 20, 1].set(jnp.inf)
    kw = dict(window=12, num_global=1)
    with mock.patch.object(finite, "_ROW_SEARCH_ELEMENTS", 1):
        got = pk.block_sparse_attention(q, k, v, layout, backend="triton", interpret=True, **kw)
    want = pk.block_sparse_attention(q, k, v, layout, backend="reference", **kw)
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert 0 < np.isnan(want).mean() < 1
    clean = ~np.isnan(want)
    np.testing.assert_allclose(got[clean], want[clean], rtol=1e-5, atol=1e-5)  # f32 kernels vs dense reference
