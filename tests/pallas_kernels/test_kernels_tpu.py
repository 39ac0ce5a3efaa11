"""TPU (Mosaic) kernels in TPU interpret mode against the reference, and lowering for the TPU platform on CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import TOL, qkv, rel_err

import pallas_kernels as pk


def _loss(backend, layout, w, **kw):
    def f(q, k, v):
        extra = {"interpret": True} if backend == "tpu" else {}
        out = pk.block_sparse_attention(q, k, v, layout, backend=backend, **kw, **extra)
        return (out.astype(jnp.float32) * w).sum(), out

    return f


@functools.partial(jax.jit, static_argnames=("backend",))
def _case(q, k, v, positions, critical, backend):
    layout = pk.sra_layout(
        positions, block_q=16, block_k=16, window=10, num_global=2, k_critical=critical, q_critical=critical
    )
    w = jax.random.normal(jax.random.PRNGKey(1), q.shape, jnp.float32)
    kw = {
        "window": 10,
        "num_global": 2,
        "q_positions": positions,
        "k_critical": critical,
        "q_critical": critical,
    }
    return jax.value_and_grad(_loss(backend, layout, w, **kw), argnums=(0, 1, 2), has_aux=True)(q, k, v)


@settings(max_examples=4)
@given(valid=st.integers(1, 48), fraction=st.floats(0.0, 0.5), seed=st.integers(0, 999))
def test_tpu_sra_rule_gqa2_f32_matches_reference_forward_and_gradients(valid, fraction, seed):
    b, s, hq, hkv, d = 1, 48, 4, 2, 64
    q, k, v = qkv(jax.random.PRNGKey(seed), b, s, s, hq, hkv, d, jnp.float32)
    positions = jnp.where(jnp.arange(s) < valid, jnp.arange(s), -1)[None]
    critical = jax.random.uniform(jax.random.PRNGKey(seed + 1), (b, s)) < fraction
    (_, out), grads = _case(q, k, v, positions, critical, backend="tpu")
    (_, ref), ref_grads = _case(q, k, v, positions, critical, backend="reference")
    assert rel_err(out, ref) < TOL[jnp.float32]
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < TOL[jnp.float32]
    np.testing.assert_array_equal(np.asarray(out)[:, valid:], 0.0)


def test_tpu_kernels_lower_for_the_tpu_platform_on_cpu():
    # jax needs a chip description to lower Mosaic kernels; on a CPU host none exists, so register one (v5e)
    # for the "cpu" device kind. This checks jax's Mosaic lowering only: the TPU compiler itself never runs here.
    from jax._src.pallas.mosaic import tpu_info

    tpu_info.registry.setdefault(
        "cpu", lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
    )
    b, s, hq, hkv, d = 1, 256, 4, 1, 128
    q = jnp.zeros((b, s, hq, d), jnp.bfloat16)
    k = jnp.zeros((b, s, hkv, d), jnp.bfloat16)
    positions = jnp.arange(s)[None]
    critical = jnp.arange(s)[None] % 7 == 0
    layout = pk.sra_layout(positions, block_q=128, block_k=128, window=64, k_critical=critical)
    loss = lambda q, k, v: (
        pk.block_sparse_attention(q, k, v, layout, backend="tpu", window=64, k_critical=critical)
        .astype(jnp.float32)
        .sum()
    )
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("tpu",))
    # forward, dQ and dK/dV kernels, once each (the rows seeing a non-finite key come from the rule, not a second
    # forward: pallas_kernels.finite)
    assert lowered.as_text().count("tpu_custom_call") == 3
