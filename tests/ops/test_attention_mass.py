"""sra_jax.ops.attention_mass: the blockwise column sums equal the dense reference (random shapes, GQA, segments,
padding, query weights, window / global exclusion, block sizes that do not divide s), and the mass of every key
adds up to heads * weight of each query when nothing is excluded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sra_jax.ops.attention_mass import attention_mass, attention_mass_reference, query_logsumexp
from sra_jax.ops.nsa import token_mask


def _inputs(seed, b, s, hkv, groups, d, pad, packed):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, s, hkv * groups, d)), jnp.float32) * 2.0
    k = jnp.asarray(rng.normal(size=(b, s, hkv, d)), jnp.float32) * 2.0
    positions = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    lengths = s - rng.integers(0, pad + 1, size=b)
    positions[np.arange(s)[None] >= lengths[:, None]] = -1
    segment_ids = None
    if packed:  # two segments per row, positions restarting at the boundary (the packing convention)
        cut = rng.integers(1, s, size=b)
        segment_ids = np.where(np.arange(s)[None] < cut[:, None], 1, 2).astype(np.int32)
        positions = np.where(segment_ids == 1, np.arange(s)[None], np.arange(s)[None] - cut[:, None]).astype(np.int32)
        positions[np.arange(s)[None] >= lengths[:, None]] = -1
        segment_ids = jnp.asarray(np.where(positions >= 0, segment_ids, 0))
    weights = jnp.asarray(rng.uniform(size=(b, s)), jnp.float32)
    return q, k, jnp.asarray(positions), segment_ids, weights


@given(seed=st.integers(0, 2**16), b=st.integers(1, 2), s=st.integers(1, 20), hkv=st.integers(1, 2),
       groups=st.sampled_from([1, 2]), pad=st.integers(0, 4), packed=st.booleans(), block_q=st.integers(1, 9),
       window=st.sampled_from([None, 1, 3]), num_global=st.integers(0, 2), weighted=st.booleans())
def test_blockwise_mass_equals_the_dense_reference(seed, b, s, hkv, groups, pad, packed, block_q, window, num_global,
                                                    weighted):
    q, k, positions, segment_ids, weights = _inputs(seed, b, s, hkv, groups, 4, min(pad, s - 1), packed and s > 1)
    weights = weights if weighted else None
    lse = query_logsumexp(q, k, positions, segment_ids, block_q=block_q)
    got = attention_mass(q, k, lse, positions, segment_ids, weights, window=window, num_global=num_global,
                         block_q=block_q)
    want = attention_mass_reference(q, k, positions, segment_ids, weights, window=window, num_global=num_global)
    # float32 sums of at most s * heads probabilities in a different order
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_logsumexp_is_the_softmax_normaliser_and_mass_sums_to_heads_per_query():
    q, k, positions, segment_ids, weights = _inputs(3, 2, 13, 2, 2, 8, 3, True)
    lse = query_logsumexp(q, k, positions, segment_ids, block_q=4)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2)) * 8**-0.5
    visible = token_mask(positions, positions, segment_ids)[:, None]
    want = jax.nn.logsumexp(jnp.where(visible, logits, -jnp.inf), axis=-1).transpose(0, 2, 1)
    np.testing.assert_allclose(lse, want, rtol=1e-6, atol=1e-6)  # float32 rounding of the same sums
    assert np.all(np.isneginf(np.asarray(lse)[np.asarray(positions) < 0]))  # padding sees nothing
    mass = attention_mass(q, k, lse, positions, segment_ids, weights, block_q=5)
    valid_weight = jnp.where(positions >= 0, weights, 0.0).sum(-1)
    np.testing.assert_allclose(mass.sum(-1), 4 * valid_weight, rtol=1e-5)  # each query's 4 heads sum to 1
    assert np.all(np.asarray(mass)[np.asarray(positions) < 0] == 0)


def test_excluded_pairs_carry_no_mass_and_the_rest_keep_their_share():
    q, k, positions, _, _ = _inputs(5, 1, 12, 1, 1, 4, 0, False)
    lse = query_logsumexp(q, k, positions)
    full = attention_mass(q, k, lse, positions)
    only_last = jnp.zeros((1, 12)).at[0, 11].set(1.0)  # the last query: its window 3 covers keys 9..11
    mass = attention_mass(q, k, lse, positions, query_weights=only_last, window=3, num_global=2)
    assert np.all(np.asarray(mass)[0, [0, 1, 9, 10, 11]] == 0)
    reference = attention_mass_reference(q, k, positions, query_weights=only_last)
    np.testing.assert_allclose(mass[0, 2:9], reference[0, 2:9], rtol=1e-5, atol=1e-7)  # exp(x - lse) vs softmax
    assert float(full.sum()) == pytest.approx(12.0, rel=1e-5)


def test_bad_arguments_are_named():
    q, k, positions, _, _ = _inputs(0, 1, 4, 1, 1, 4, 0, False)
    lse = query_logsumexp(q, k, positions)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        query_logsumexp(q[:, :, :1].repeat(3, axis=2), k.repeat(2, axis=2), positions)
    with pytest.raises(ValueError, match="window"):
        attention_mass(q, k, lse, positions, window=0)
    with pytest.raises(ValueError, match="block_q"):
        attention_mass(q, k, lse, positions, block_q=0)
    with pytest.raises(ValueError, match="num_global"):
        attention_mass_reference(q, k, positions, num_global=-1)
