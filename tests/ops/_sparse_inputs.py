"""Random inputs shared by the NSA / DSA tests: GQA q/k/v, padded rows (position -1 tail) and packed segments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inputs(seed: int, b: int, s: int, hq: int, hkv: int, d: int, pad: int, split: int):
    """Row 0 is one full sequence; row 1 packs two segments (the second starts at `split`) followed by `pad`
    padding tokens (position -1)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, s, hq, d))
    k = jax.random.normal(ks[1], (b, s, hkv, d))
    v = jax.random.normal(ks[2], (b, s, hkv, d))
    i = np.arange(s)
    pos1 = np.where(i < split, i, i - split)
    pos1 = np.where(i >= s - pad, -1, pos1)
    seg1 = (i >= split).astype(np.int32)
    pos = np.stack([i] + [pos1] * (b - 1))
    seg = np.stack([np.zeros(s, np.int32)] + [seg1] * (b - 1))
    return q, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32)


def dense_oracle(q, k, v, mask):
    """float64 numpy masked attention, mask [b, q, k] or [b, hkv, q, k]; empty rows give zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    mask = np.asarray(mask)
    mask = mask[:, None] if mask.ndim == 3 else np.repeat(mask, g, axis=1)
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    e = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhqk,bkhd->bqhd", p, v)
