"""Rotary position embeddings with Llama 3 frequency scaling, in Hugging Face's `rotate_half` convention
(the two halves of the head dimension form the rotated pairs), so HF q/k weights load without permutation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from sra_jax.config import RopeScaling


def rope_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | Mapping[str, Any] | None = None
) -> Float[Array, " half"]:
    """Inverse frequencies `[head_dim // 2]` (float32), Llama-3-scaled when `scaling` is given.

    Same arithmetic, in float32, as transformers' `_compute_llama3_parameters`: wavelengths longer than
    original_max / low_freq_factor are divided by `factor`, shorter than original_max / high_freq_factor are
    kept, and the band in between is interpolated smoothly.
    """
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim ({head_dim!r}) must be a positive even integer (RoPE rotates pairs)")
    if not theta > 0:
        raise ValueError(f"theta ({theta}) must be > 0")
    if isinstance(scaling, Mapping):
        scaling = RopeScaling.from_hf(dict(scaling))
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    if scaling is None:
        return jnp.asarray(inv_freq)
    factor = np.float32(scaling.factor)
    old_context = np.float32(scaling.original_max_position_embeddings)
    low, high = np.float32(scaling.low_freq_factor), np.float32(scaling.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return jnp.asarray(np.where(is_medium, smoothed, scaled).astype(np.float32))


def _rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(
    x: Float[Array, "b s h d"], positions: Int[Array, "b s"], inv_freq: Float[Array, " half"]
) -> Float[Array, "b s h d"]:
    """Rotate `x` by angle position * inv_freq (computed in float32), returned in x's dtype."""
    if x.shape[-1] != 2 * inv_freq.shape[0]:
        raise ValueError(f"head_dim ({x.shape[-1]}) must be twice the number of frequencies ({inv_freq.shape[0]})")
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    return (x32 * jnp.cos(angles) + _rotate_half(x32) * jnp.sin(angles)).astype(x.dtype)
