"""Helpers shared by the kernel tests: random inputs, a dense masked softmax written here, error metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Relative-norm tolerances ||x - ref|| / ||ref|| against the float32 reference, per input dtype. f32: the kernels
# use full-precision dots, so only summation order differs (~1e-6). f16 / bf16: the kernels round P and dS to the
# input dtype before the second dot (as flash attention does), an error of one rounding (2^-11 / 2^-8) times a
# small constant.
TOL = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}


def rel_err(x, ref) -> float:
    """||x - ref|| / max(||ref||, 1): relative, except that an exactly-zero reference (a softmax over a single
    visible key has zero dq and dk) is compared in absolute terms instead of dividing rounding noise by zero."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert np.isfinite(x).all(), "non-finite values"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1.0))


def dense_softmax_attention(q, k, v, mask, scale):
    """float64 numpy attention with a [b, q, k] or [b, hq, q, k] mask; empty rows give zeros."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[:, None]
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = np.where(mask, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(mask, np.exp(s - m), 0.0)
    l = p.sum(-1, keepdims=True)
    p = p / np.where(l > 0, l, 1.0)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def qkv(key, b, sq, sk, hq, hkv, d, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    return (
        jax.random.normal(kq, (b, sq, hq, d), dtype),
        jax.random.normal(kk, (b, sk, hkv, d), dtype),
        jax.random.normal(kv, (b, sk, hkv, d), dtype),
    )


def decode_oracle(q, kc, vc, lengths, critical, kv_start, window, num_global, counts=None):
    """float64 numpy sparse decode written from the rule, one (row, token, head) at a time: the t new tokens sit in
    slots lengths - t .., a token in slot s sees kv_start <= j <= s with s - j < window, j < kv_start + num_global,
    or j among the row's critical entries (the first counts[i] of them when counts is given)."""
    q, kc, vc = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, kc, vc))
    b, t, hq, d = q.shape
    group = hq // kc.shape[2]
    out = np.zeros_like(q)
    for i in range(b):
        used = [] if critical is None else np.asarray(critical[i])[: None if counts is None else int(counts[i])]
        crit = {int(c) for c in used}
        start = int(kv_start[i])
        for n in range(t):
            s = int(lengths[i]) - t + n
            seen = [j for j in range(start, s + 1) if s - j < window or j < start + num_global or j in crit]
            for h in range(hq if seen else 0):
                k, v = kc[i, seen, h // group], vc[i, seen, h // group]
                logits = k @ q[i, n, h] / np.sqrt(d)
                p = np.exp(logits - logits.max())
                out[i, n, h] = p @ v / p.sum()
    return out


def decode_case(rng, b, t, cache_len, capacity, critical_sorted, counted):
    """Random sparse-decode inputs for a cache of cache_len slots: lengths, kv_start (row 0 unpadded; a padded row
    may put early new tokens in the padding), critical rows with entries anywhere (past the length, in the
    window, among the sinks), repeats and -1 padding;
    with counts, the entries past a row's count look live (reading them would change the output)."""
    lengths = rng.integers(t, cache_len + 1, b)
    kv_start = np.minimum(rng.integers(0, 12, b), lengths - 1)
    kv_start[0] = 0
    if capacity == 0:
        return lengths, kv_start, None, None
    rows = []
    for i in range(b):
        row = rng.integers(0, int(lengths[i]) + 8, capacity)
        row = np.where(rng.random(capacity) < 0.25, row[rng.integers(0, capacity, capacity)], row)  # repeats
        row = np.where(rng.random(capacity) < 0.15, -1, row)
        row[rng.integers(capacity // 2, capacity + 1):] = -1
        if critical_sorted:
            row = np.concatenate([np.sort(row[row >= 0]), row[row < 0]])
        rows.append(row)
    critical = np.stack(rows).astype(np.int32)
    counts = None
    if counted:  # capacity > 0 here
        counts = rng.integers(0, capacity + 1, b).astype(np.int32)
        tail = np.arange(capacity)[None, :] >= counts[:, None]
        live_looking = np.sort(rng.integers(0, int(lengths.max()), (b, capacity)), axis=1)
        critical = np.where(tail, live_looking, critical).astype(np.int32)
    return lengths, kv_start, critical, counts
