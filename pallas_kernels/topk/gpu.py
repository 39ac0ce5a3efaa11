"""Triton (Pallas) top-k gather attention. One program per (row, query token, kv head): the query heads of the GQA
group form the tile's rows (zero rows pad them to >= 16 for the dots), and the program walks its query's key list in
tiles of `block_k` slots, gathering those keys' K and V rows from HBM (masked loads: an empty or invisible slot
reads nothing) with an online softmax. Per-query lists make the union-per-query-block alternative pointless: with
scattered picks the union of a block's lists approaches the whole prefix, while a gathered tile is always dense.

The backward walks the same tiles: dQ accumulates in registers, dK and dV tiles (dS^T Q and P^T dO, summed over the
group's heads by the dots) are scattered to the listed keys with float32 atomic adds."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
NEG = -1e30


def _slots(j, idx_ref, kpos_ref, kseg_ref, q_pos, q_seg, *, block_k, sk, causal):
    """Key indices of tile j (clamped into range) and which of them the query may see."""
    slots = plgpu.load(idx_ref.at[j * block_k + jnp.arange(block_k)])
    ok = (slots >= 0) & (slots < sk)
    safe = jnp.where(ok, slots, 0)
    kp = plgpu.load(kpos_ref.at[safe], mask=ok, other=-1)
    ks = plgpu.load(kseg_ref.at[safe], mask=ok, other=0)
    ok = ok & (kp >= 0) & (q_pos >= 0) & (ks == q_seg)
    return safe, (ok & (kp <= q_pos)) if causal else ok


def _gather(ref, safe, ok):
    cols = jnp.arange(ref.shape[1])[None, :]
    return plgpu.load(ref.at[safe[:, None], cols], mask=ok[:, None], other=0.0)


def _forward_kernel(
    idx_ref, ntile_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
    scale, block_k, sk, causal, dot_kw
):  # fmt: skip
    q = q_ref[...]
    q_pos, q_seg = qpos_ref[...], qseg_ref[...]
    rows = q.shape[0]

    def tile(j, carry):
        m, l, acc = carry
        safe, ok = _slots(j, idx_ref, kpos_ref, kseg_ref, q_pos, q_seg, block_k=block_k, sk=sk, causal=causal)
        k, v = _gather(k_ref, safe, ok), _gather(v_ref, safe, ok)
        s = jnp.where(ok[None, :], plgpu.dot(q, k, trans_b=True, **dot_kw) * scale, NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(ok[None, :], jnp.exp2(s - m_new[:, None]), 0.0)
        l = l * alpha + p.sum(axis=-1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, **dot_kw)
        return m_new, l, acc

    carry = (jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32), jnp.zeros(q.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, ntile_ref[...], tile, carry)
    seen = l > 0
    o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), -jnp.inf)


def _backward_kernel(
    idx_ref, ntile_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    dk_in_ref, dv_in_ref, dq_ref, dk_ref, dv_ref, *, scale, sm_scale, block_k, sk, causal, dot_kw, interpret
):  # fmt: skip
    del dk_in_ref, dv_in_ref  # aliased to dk_ref / dv_ref (zeros in, sums out)
    q, do = q_ref[...], do_ref[...]
    q_pos, q_seg = qpos_ref[...], qseg_ref[...]
    lse = lse_ref[...]
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # a row with no visible slot has p = 0 everywhere below
    delta = delta_ref[...]

    def tile(j, dq):
        safe, ok = _slots(j, idx_ref, kpos_ref, kseg_ref, q_pos, q_seg, block_k=block_k, sk=sk, causal=causal)
        k, v = _gather(k_ref, safe, ok), _gather(v_ref, safe, ok)
        s = plgpu.dot(q, k, trans_b=True, **dot_kw) * scale
        p = jnp.where(ok[None, :], jnp.exp2(s - lse[:, None]), 0.0)
        dp = plgpu.dot(do, v, trans_b=True, **dot_kw)
        ds = (p * (dp - delta[:, None])).astype(q.dtype)
        dk = plgpu.dot(ds, q, trans_a=True, **dot_kw) * sm_scale
        dv = plgpu.dot(p.astype(do.dtype), do, trans_a=True, **dot_kw)
        _scatter_add(dk_ref, safe, ok, dk, sk=sk, interpret=interpret)
        _scatter_add(dv_ref, safe, ok, dv, sk=sk, interpret=interpret)
        return dq + plgpu.dot(ds, k, **dot_kw)

    dq = jax.lax.fori_loop(0, ntile_ref[...], tile, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _scatter_add(ref, safe, ok, x, *, sk, interpret):
    """ref[safe[i]] += x[i] where ok[i], by float32 atomics. ref has a spare row sk: interpret mode supports no
    masked atomics, so there the empty slots add zeros into that row instead."""
    if interpret:
        rows = jnp.where(ok, safe, sk)
        x = jnp.where(ok[:, None], x, 0.0)
        plgpu.atomic_add(ref, (rows[:, None], jnp.arange(x.shape[1])[None, :]), x)
    else:
        plgpu.atomic_add(ref, (safe[:, None], jnp.arange(x.shape[1])[None, :]), x,
                         mask=jnp.broadcast_to(ok[:, None], x.shape))  # Triton wants the mask in the value's shape


def _specs(sk, hi, rows, kp, d):
    """BlockSpecs over grid (row, query token, kv head) for idx, ntile, q pos/seg, k pos/seg, q, k, v."""
    head = (lambda h: h) if hi > 1 else (lambda h: 0)
    return [
        pl.BlockSpec((None, None, None, kp), lambda bi, t, h: (bi, t, head(h), 0)),
        pl.BlockSpec((None, None, None), lambda bi, t, h: (bi, t, head(h))),
        pl.BlockSpec((None, None), lambda bi, t, h: (bi, t)),
        pl.BlockSpec((None, None), lambda bi, t, h: (bi, t)),
        pl.BlockSpec((None, sk), lambda bi, t, h: (bi, 0)),
        pl.BlockSpec((None, sk), lambda bi, t, h: (bi, 0)),
        pl.BlockSpec((None, None, None, rows, d), lambda bi, t, h: (bi, t, h, 0, 0)),
        pl.BlockSpec((None, sk, None, d), lambda bi, t, h: (bi, 0, h, 0)),
        pl.BlockSpec((None, sk, None, d), lambda bi, t, h: (bi, 0, h, 0)),
    ]


def _rows_view(x, hkv, rows):
    """[b, s, hq(, d)] -> [b, s, hkv, rows(, d)]: the group's heads, zero rows appended up to `rows`."""
    b, s, hq = x.shape[:3]
    x = x.reshape(b, s, hkv, hq // hkv, *x.shape[3:])
    pad = [(0, 0)] * 3 + [(0, rows - hq // hkv)] + [(0, 0)] * (x.ndim - 4)
    return jnp.pad(x, pad)


def _rows(group):
    return max(16, pl.next_power_of_2(group))


def forward(q, k, v, idx, ntile, tokens, *, causal, sm_scale, block_k, num_warps, num_stages, interpret):
    """(out [b, sq, hq, d], lse [b, sq, hkv, rows] base 2) for normalised arguments (see `api`)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    rows, kp = _rows(hq // hkv), idx.shape[-1]
    kernel = functools.partial(
        _forward_kernel, scale=sm_scale * LOG2E, block_k=block_k, sk=sk, causal=causal, dot_kw=_dot_kw(q.dtype)
    )
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, sq, hkv),
        in_specs=_specs(sk, idx.shape[2], rows, kp, d),
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda bi, t, h: (bi, t, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda bi, t, h: (bi, t, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, sq, hkv, rows, d), q.dtype),
            jax.ShapeDtypeStruct((b, sq, hkv, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="topk_attention_fwd",
    )(idx, ntile, *tokens, _rows_view(q, hkv, rows), k, v)
    return o[:, :, :, : hq // hkv].reshape(b, sq, hq, d), lse


def backward(q, k, v, out, lse, do, idx, ntile, tokens, *, causal, sm_scale, block_k, num_warps, num_stages, interpret):
    """(dq, dk, dv) for normalised arguments; dk and dv are float32 sums of atomic adds, cast to k's dtype."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    rows, kp = _rows(hq // hkv), idx.shape[-1]
    delta = (out.astype(jnp.float32) * do.astype(jnp.float32)).sum(-1)  # [b, sq, hq]
    kernel = functools.partial(
        _backward_kernel,
        scale=sm_scale * LOG2E,
        sm_scale=sm_scale,
        block_k=block_k,
        sk=sk,
        causal=causal,
        dot_kw=_dot_kw(q.dtype),
        interpret=interpret,
    )
    acc_spec = pl.BlockSpec((None, sk + 1, None, d), lambda bi, t, h: (bi, 0, h, 0))
    row_spec = pl.BlockSpec((None, None, None, rows), lambda bi, t, h: (bi, t, h, 0))
    tile_spec = pl.BlockSpec((None, None, None, rows, d), lambda bi, t, h: (bi, t, h, 0, 0))
    zeros = jnp.zeros((b, sk + 1, hkv, d), jnp.float32)  # a spare row (see _scatter_add)
    dq, dk, dv = pl.pallas_call(
        kernel,
        grid=(b, sq, hkv),
        in_specs=_specs(sk, idx.shape[2], rows, kp, d) + [tile_spec, row_spec, row_spec, acc_spec, acc_spec],
        out_specs=[tile_spec, acc_spec, acc_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, sq, hkv, rows, d), q.dtype),
            jax.ShapeDtypeStruct((b, sk + 1, hkv, d), jnp.float32),
            jax.ShapeDtypeStruct((b, sk + 1, hkv, d), jnp.float32),
        ],
        input_output_aliases={12: 1, 13: 2},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="topk_attention_bwd",
    )(
        idx, ntile, *tokens, _rows_view(q, hkv, rows), k, v, _rows_view(do, hkv, rows), lse,
        _rows_view(delta, hkv, rows), zeros, zeros,
    )  # fmt: skip
    return dq[:, :, :, : hq // hkv].reshape(b, sq, hq, d), dk[:, :sk].astype(k.dtype), dv[:, :sk].astype(v.dtype)


def _dot_kw(dtype):
    return {"allow_tf32": False} if dtype == jnp.float32 else {}
