"""Specs for sra_jax.ops.rope: Llama 3 scaled frequencies and rotation equal transformers' implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from sra_jax.config import RopeScaling
from sra_jax.ops.rope import apply_rope, rope_frequencies

SCALINGS = [
    None,
    RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    # A short original context puts many frequencies in the interpolated (medium) band.
    RopeScaling(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=64),
]


def hf_rotary(head_dim: int, theta: float, scaling: RopeScaling | None) -> LlamaRotaryEmbedding:
    config = HFLlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=None if scaling is None else scaling.to_hf(),
    )
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("scaling", SCALINGS, ids=["unscaled", "llama3.1", "llama3-short-context"])
@pytest.mark.parametrize("head_dim, theta", [(64, 500000.0), (128, 500000.0), (16, 10000.0)])
def test_rope_frequencies_equal_transformers(head_dim, theta, scaling):
    # Same float32 operations in the same order: agreement to 1 ulp (rtol 1e-6).
    # LlamaRotaryEmbedding runs transformers' `_compute_llama3_parameters` for rope_type llama3.
    expected = hf_rotary(head_dim, theta, scaling).inv_freq.numpy()
    np.testing.assert_allclose(rope_frequencies(head_dim, theta, scaling), expected, rtol=1e-6)


def test_rope_frequencies_accept_the_hf_dict_form():
    hf = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    np.testing.assert_array_equal(rope_frequencies(64, 5e5, hf), rope_frequencies(64, 5e5, RopeScaling(**hf)))


@pytest.mark.parametrize("scaling", SCALINGS[:2], ids=["unscaled", "llama3.1"])
def test_apply_rope_equals_transformers_apply_rotary_pos_emb(scaling):
    b, s, h, d = 2, 7, 3, 16
    x = np.random.default_rng(0).standard_normal((b, s, h, d)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4, 5, 6], [5, 9, 100, 1000, 4000, 8191, 20000]], np.int32)
    inv_freq = rope_frequencies(d, 500000.0, scaling)
    ours = apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq)
    xt = torch.from_numpy(x).transpose(1, 2)
    cos, sin = hf_rotary(d, 500000.0, scaling)(xt, torch.from_numpy(positions).long())
    theirs, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
    # Angles up to 20000 rad in float32 (ulp ~ 2e-3): cos/sin of the same float32 angle agree to ~1e-5 across
    # libraries' range reduction.
    np.testing.assert_allclose(ours, theirs.transpose(1, 2).numpy(), atol=3e-5)


def test_apply_rope_keeps_dtype_and_norm():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8), jnp.bfloat16)
    out = apply_rope(x, jnp.arange(5)[None], rope_frequencies(8, 10000.0))
    assert out.dtype == jnp.bfloat16
    # A rotation preserves each pair's norm; bfloat16 output rounding bounds the change by ~1%.
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(out, np.float32), axis=-1), np.linalg.norm(np.asarray(x, np.float32), axis=-1), rtol=2e-2
    )


def test_bad_rope_arguments_raise_value_errors():
    with pytest.raises(ValueError, match=r"head_dim \(7\)"):
        rope_frequencies(7, 10000.0)
    with pytest.raises(ValueError, match="rope_type"):
        rope_frequencies(8, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match=r"head_dim \(8\) must be twice"):
        apply_rope(jnp.zeros((1, 2, 1, 8)), jnp.zeros((1, 2), jnp.int32), jnp.ones(3))
