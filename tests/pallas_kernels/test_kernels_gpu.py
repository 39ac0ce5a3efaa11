"""GPU (Triton) kernels in interpret mode against the reference: forward and all three gradients.

Compiling an interpreted kernel costs tens of seconds on CPU, so each test fixes its shapes and static rule and
jits once; hypothesis then varies everything that is data: positions (ragged tails, padding rows with nothing
visible), critical flags, segment ids, layouts and inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import TOL, qkv, rel_err

import pallas_kernels as pk

TINY = pk.GpuConfig(
    fwd_block_q=16, fwd_block_k=16, dq_block_q=16, dq_block_k=16, dkv_block_q=16, dkv_block_k=16
)


def _loss(backend, layout, w, **kw):
    def f(q, k, v):
        extra = {"interpret": True, "config": TINY} if backend != "reference" else {}
        out = pk.block_sparse_attention(q, k, v, layout, backend=backend, **kw, **extra)
        return (out.astype(jnp.float32) * w).sum(), out

    return f


def _compare(backend, q, k, v, layout, **kw):
    w = jax.random.normal(jax.random.PRNGKey(1), q.shape, jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)
    (_, out), grads = jax.value_and_grad(_loss(backend, layout, w, **kw), argnums=(0, 1, 2), has_aux=True)(
        q, k, v
    )
    (_, ref), ref_grads = jax.value_and_grad(
        _loss("reference", layout, w, **kw), argnums=(0, 1, 2), has_aux=True
    )(f32(q), f32(k), f32(v))
    return out, grads, ref, ref_grads


@functools.partial(jax.jit, static_argnames=("backend",))
def _sra_case(q, k, v, positions, critical, segments, backend):
    layout = pk.sra_layout(
        positions,
        block_q=32,
        block_k=16,
        window=12,
        num_global=2,
        k_critical=critical,
        q_critical=critical,
        segment_ids=segments,
    )
    return _compare(
        backend,
        q,
        k,
        v,
        layout,
        window=12,
        num_global=2,
        q_positions=positions,
        k_critical=critical,
        q_critical=critical,
        segment_ids=segments,
    )


@settings(max_examples=5)
@given(
    valid=st.integers(1, 64), fraction=st.floats(0.0, 0.5), split=st.integers(0, 64), seed=st.integers(0, 999)
)
def test_gpu_sra_rule_gqa4_f32_with_ragged_rows_segments_and_critical_keys(valid, fraction, split, seed):
    b, s, hq, hkv, d = 2, 64, 4, 1, 64
    q, k, v = qkv(jax.random.PRNGKey(seed), b, s, s, hq, hkv, d, jnp.float32)
    positions = jnp.broadcast_to(jnp.where(jnp.arange(s) < valid, jnp.arange(s), -1), (b, s))
    critical = jax.random.uniform(jax.random.PRNGKey(seed + 1), (b, s)) < fraction
    segments = jnp.broadcast_to((jnp.arange(s) >= split).astype(jnp.int32), (b, s))
    out, grads, ref, ref_grads = _sra_case(q, k, v, positions, critical, segments, backend="triton")
    assert rel_err(out, ref) < TOL[jnp.float32]
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < TOL[jnp.float32]
    # Padding rows see nothing: zero output, zero gradient.
    np.testing.assert_array_equal(np.asarray(out)[:, valid:], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0])[:, valid:], 0.0)


@functools.partial(jax.jit, static_argnames=("backend",))
def _block_case(q, k, v, block_mask, backend):
    layout = pk.layout_from_block_mask(block_mask, block_q=32, block_k=32)
    return _compare(backend, q, k, v, layout, causal=True)


@settings(max_examples=3)
@given(density=st.floats(0.0, 1.0), seed=st.integers(0, 999))
def test_gpu_random_block_layout_gqa8_bf16_ragged_length(density, seed):
    # s = 80 is not a multiple of the 32-token block: the tail is padded and masked.
    b, s, hq, hkv, d = 1, 80, 8, 1, 64
    q, k, v = qkv(jax.random.PRNGKey(seed), b, s, s, hq, hkv, d, jnp.bfloat16)
    mask = pk.random_causal_block_mask(jax.random.PRNGKey(seed + 7), 3, density, heads=hkv)
    out, grads, ref, ref_grads = _block_case(q, k, v, mask, backend="triton")
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < TOL[jnp.bfloat16]
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < TOL[jnp.bfloat16]


@functools.partial(jax.jit, static_argnames=("backend",))
def _window_loss_and_out(q, k, v, positions, backend):
    """Sliding window 6 over 40 tokens, the last 8 padding; loss on rows 0..19 only."""
    layout = pk.sra_layout(positions, block_q=16, block_k=16, window=6)
    extra = {"interpret": True, "config": TINY} if backend != "reference" else {}

    def loss(q, k, v):
        out = pk.block_sparse_attention(
            q, k, v, layout, window=6, q_positions=positions, k_positions=positions, backend=backend, **extra
        )
        return jnp.sum(out[:, :20].astype(jnp.float32) ** 2), out

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)


def test_gpu_nonfinite_keys_reach_only_the_rows_that_see_them():
    """NaN in the k and v of token 21 (future for rows 0..20, in their diagonal tile) and inf in the v of a padding
    slot: rows 0..20 and their gradients are exactly the clean ones (Triton, interpret); rows 21..26 see token
    21 and are NaN."""
    q, k, v = qkv(jax.random.PRNGKey(3), 1, 40, 40, 2, 1, 16, jnp.float32)
    positions = jnp.where(jnp.arange(40) < 32, jnp.arange(40), -1)[None]
    bad_k, bad_v = k.at[:, 21].set(jnp.nan), v.at[:, 21].set(jnp.nan).at[:, 35].set(jnp.inf)
    (_, got), got_grads = _window_loss_and_out(q, bad_k, bad_v, positions, "triton")
    (_, want), want_grads = _window_loss_and_out(q, k, v, positions, "triton")
    np.testing.assert_array_equal(got[:, :21], want[:, :21])
    assert np.isnan(np.asarray(got[:, 21:27])).all()
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)  # same kernels on the same finite values


def test_forward_and_backward_kernels_lower_for_cuda_and_verify():
    """The compiled (not interpreted) Triton kernels, lowered for CUDA on this CPU host: the forward, dq and dk/dv
    kernels of the block-sparse and compact paths. tests/conftest.py verifies each Triton module, which catches
    ops that only XLA's Triton compiler on a GPU would reject."""
    s = 256
    q = jnp.zeros((1, s, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, s, 2, 64), jnp.bfloat16)
    positions = jnp.arange(s, dtype=jnp.int32)[None]
    critical = positions % 9 == 0
    rule = dict(window=32, num_global=2, q_positions=positions, k_critical=critical, q_critical=critical)
    layout = pk.sra_layout(positions, block_q=64, block_k=64, window=32, num_global=2, k_critical=critical,
                           q_critical=critical)
    sparse = lambda q, k, v: pk.block_sparse_attention(q, k, v, layout, backend="triton", **rule)
    compact = lambda q, k, v: pk.sra_compact_attention(
        q, k, v, q_positions=positions, k_positions=positions, q_critical=critical, k_critical=critical, window=32,
        num_global=2, queries="critical", max_critical=32, backend="triton",
    )
    for attention in (sparse, compact):
        loss = lambda q, k, v, f=attention: f(q, k, v).astype(jnp.float32).sum()
        text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") >= 3  # forward, dq, dk/dv (verified by the conftest fixture)
