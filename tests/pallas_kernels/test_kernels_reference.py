"""The references agree with a dense float64 softmax written here, and empty rows give zeros and zero gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testing import dense_softmax_attention, qkv, rel_err

import pallas_kernels as pk
from pallas_kernels.block_sparse.token_mask import TokenInfo, token_mask


@pytest.mark.parametrize("group", [1, 4])
def test_block_sparse_reference_matches_dense_softmax(group):
    b, s, d = 2, 40, 16
    q, k, v = qkv(jax.random.PRNGKey(group), b, s, s, 4, 4 // group, d, jnp.float32)
    critical = jax.random.uniform(jax.random.PRNGKey(9), (b, s)) < 0.2
    positions = jnp.broadcast_to(jnp.where(jnp.arange(s) < 33, jnp.arange(s), -1), (b, s))
    kw = {
        "window": 5,
        "num_global": 2,
        "k_critical": critical,
        "q_critical": critical,
        "q_positions": positions,
    }
    layout = pk.sra_layout(
        positions, block_q=16, block_k=8, window=5, num_global=2, k_critical=critical, q_critical=critical
    )
    out = pk.reference.block_sparse_attention(q, k, v, layout, **kw)
    rule = pk.MaskRule(window=5, num_global=2, has_k_critical=True, has_q_critical=True)
    flags = critical.astype(jnp.int32)
    mask = token_mask(rule, TokenInfo(positions, positions, q_critical=flags, k_critical=flags))
    assert rel_err(out, dense_softmax_attention(q, k, v, mask, d**-0.5)) < 1e-6  # f32 vs f64: rounding only


def test_reference_empty_rows_give_zero_output_and_zero_gradient():
    q, k, v = qkv(jax.random.PRNGKey(0), 1, 8, 8, 2, 2, 16, jnp.float32)
    positions = jnp.array([[0, 1, 2, 3, -1, -1, -1, -1]])
    layout = pk.layout_from_block_mask(jnp.ones((1, 1, 1), bool), block_q=8, block_k=8)
    f = lambda q, k, v: pk.reference.block_sparse_attention(
        q, k, v, layout, q_positions=positions, k_positions=positions
    )
    out = f(q, k, v)
    np.testing.assert_array_equal(out[:, 4:], 0.0)
    dq, dk, _dv = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(q, k, v)
    assert np.isfinite(dq).all() and np.isfinite(dk).all()
    np.testing.assert_array_equal(dq[:, 4:], 0.0)
    np.testing.assert_array_equal(dk[:, 4:], 0.0)


def test_decode_reference_matches_dense_softmax():
    b, length, d = 2, 50, 16
    q, kc, vc = qkv(jax.random.PRNGKey(3), b, 2, length, 4, 2, d, jnp.float32)
    lengths = jnp.array([50, 20])
    crit = jnp.array([[5, 30, -1], [3, 19, 40]])
    out = pk.reference.sparse_decode_attention(
        q, kc, vc, lengths, window=4, num_global=1, critical_indices=crit
    )
    slot = np.arange(length)
    mask = np.zeros((b, 2, length), bool)
    for i in range(b):
        for t in range(2):
            pos = int(lengths[i]) - 2 + t
            keep = (pos - slot < 4) | (slot < 1) | np.isin(slot, np.asarray(crit[i]))
            mask[i, t] = keep & (slot <= pos)
    assert rel_err(out, dense_softmax_attention(q, kc, vc, mask, d**-0.5)) < 1e-6
