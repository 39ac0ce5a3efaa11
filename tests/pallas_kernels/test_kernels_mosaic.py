"""Mosaic GPU (Hopper) backend: host-side checks on CPU; the kernel itself against the reference on a GPU.

The Mosaic GPU kernel needs wgmma/TMA hardware (sm_90+); the GPU tests skip elsewhere with that reason. On CPU we
check the parts that run on the host: configuration validation, which inputs the kernel refuses and why, the
token-rule tile function against the shared rule, and the `auto` backend choice.

GPU tolerances: relative L2 error against the f32 reference < 2e-2 for bf16/f16 inputs (bf16 has an 8-bit
mantissa, P is rounded to the input dtype before the PV product, exp2 is the approximate one).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.block_sparse import dispatch, mosaic, mosaic_bwd, mosaic_common, token_mask
from pallas_kernels.block_sparse.token_mask import MaskRule, visible

ON_HOPPER = mosaic.available()
gpu_only = pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU kernels need an sm_90+ CUDA GPU (no CPU lowering)")
TOL = 2e-2


def _layout(block_q=128, block_k=128, n=4):
    mask = pk.causal_block_mask(n, n)[None]
    return pk.layout_from_block_mask(mask, block_q=block_q, block_k=block_k)


# ---------------------------------------------------------------- host side (CPU)


def test_config_validation():
    with pytest.raises(ValueError, match="block_q"):
        mosaic.MosaicConfig(block_q=128)
    with pytest.raises(ValueError, match="block_kv"):
        mosaic.MosaicConfig(block_kv=96)
    with pytest.raises(ValueError, match="stages"):
        mosaic.MosaicConfig(stages=1)
    cfg = mosaic.MosaicConfig()
    assert cfg.rows_per_cta == 128
    # 2 x 64 x 128 bf16 (Q/O) + 2 stages x 2 x 128 x 128 bf16 (K, V) + token fields + lse
    assert cfg.smem_bytes(128, 2, 1) == 32768 + 131072 + 4 * (2 * 128 + 2 * 64) + 512


@pytest.mark.parametrize(
    ("shape", "dtype", "layout", "cfg", "match"),
    [
        ((1, 256, 2, 128), jnp.float32, _layout(), mosaic.MosaicConfig(), "bf16 or f16"),
        ((1, 256, 2, 96), jnp.bfloat16, _layout(), mosaic.MosaicConfig(), "multiple of 64"),
        ((1, 256, 2, 128), jnp.bfloat16, _layout(64, 64), mosaic.MosaicConfig(), "rows per CTA"),
        ((1, 256, 2, 128), jnp.bfloat16, _layout(128, 64), mosaic.MosaicConfig(), "block_kv"),
        ((1, 256, 2, 256), jnp.bfloat16, _layout(), mosaic.MosaicConfig(stages=3), "shared memory"),
    ],
)
def test_unsupported_reason(shape, dtype, layout, cfg, match):
    reason = mosaic.unsupported_reason(shape, dtype, layout, cfg)
    assert reason is not None and match in reason


def test_supported_shapes_have_no_reason():
    for d, dtype in itertools.product((64, 128), (jnp.bfloat16, jnp.float16)):
        assert mosaic.unsupported_reason((1, 512, 4, d), dtype, _layout(), mosaic.MosaicConfig()) is None
    assert mosaic.unsupported_reason((1, 512, 4, 128), jnp.bfloat16, _layout(256, 128), mosaic.MosaicConfig()) is None


@pytest.mark.parametrize(
    "rule",
    [
        MaskRule(),
        MaskRule(causal=False),
        MaskRule(window=5, num_global=2, has_k_critical=True, has_q_critical=True, has_segments=True),
        MaskRule(causal=False, window=3, has_k_critical=True),
    ],
)
def test_tile_visible_matches_shared_rule(rule):
    """The Mosaic tile rule (written without abs / implicit broadcasting) equals token_mask.visible."""
    rng = np.random.default_rng(0)
    n = 40
    qp, kp = (rng.integers(-2, 30, n) for _ in range(2))
    qs, ks = (rng.integers(0, 2, n) for _ in range(2))
    qc, kc = (rng.integers(0, 2, n) for _ in range(2))
    full = lambda x, axis: jnp.broadcast_to(jnp.asarray(x)[:, None] if axis == 0 else jnp.asarray(x)[None, :], (n, n))
    got = mosaic.tile_visible(
        rule, full(qp, 0), full(kp, 1), full(qs, 0), full(ks, 1), full(qc, 0), full(kc, 1)
    )
    want = visible(rule, qp[:, None], kp[None, :], qs[:, None], ks[None, :], qc[:, None], kc[None, :])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_auto_backend_choice(monkeypatch):
    lay = _layout()
    q = jnp.zeros((1, 512, 4, 128), jnp.bfloat16)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(mosaic_common, "available", lambda: True)
    assert dispatch.resolve_backend("auto", q, lay) == dispatch.AUTO_GPU_FORWARD
    # f32 and unsupported tilings fall back to Triton on the same GPU
    assert dispatch.resolve_backend("auto", q.astype(jnp.float32), lay) == "triton"
    assert dispatch.resolve_backend("auto", q, _layout(64, 64)) == "triton"
    monkeypatch.setattr(mosaic_common, "available", lambda: False)
    assert dispatch.resolve_backend("auto", q, lay) == "triton"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert dispatch.resolve_backend("auto", q, lay) == "reference"
    assert dispatch.resolve_backend("mosaic_gpu", q, lay) == "mosaic_gpu"


def test_mosaic_backend_rejects_unsupported_inputs_clearly():
    q = jnp.zeros((1, 256, 2, 128), jnp.float32)
    with pytest.raises(ValueError, match="mosaic_gpu backend: dtype float32"):
        pk.block_sparse_attention(q, q, q, _layout(n=2), backend="mosaic_gpu")


# ---------------------------------------------------------------- the kernel (GPU only)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


CASES = [
    # (b, s, hq, hkv, d, dtype, block, density, rule kwargs)
    (1, 1024, 4, 4, 128, jnp.bfloat16, 128, 1.0, {}),
    (1, 1024, 4, 4, 128, jnp.bfloat16, 128, 0.4, {}),
    (2, 512, 8, 2, 64, jnp.float16, 128, 1.0, {}),
    (1, 1000, 8, 2, 128, jnp.bfloat16, 128, None, {"window": 100, "num_global": 4, "critical": True}),
    (2, 384, 4, 1, 64, jnp.bfloat16, 128, None, {"window": 64, "critical": True, "segments": True}),
    (1, 1024, 16, 8, 128, jnp.bfloat16, 128, 0.25, {}),
]


def _case(b, s, hq, hkv, d, dtype, block, density, rule):
    ks = jax.random.split(jax.random.PRNGKey(s + hq + d), 6)
    q = jax.random.normal(ks[0], (b, s, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), dtype)
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    # Ragged batch rows: the second sequence ends early (padding positions -1 give empty rows).
    if b > 1:
        pos = pos.at[1, s - 100 :].set(-1)
    kw = {}
    if density is None:
        crit = jax.random.uniform(ks[3], (b, s)) < 0.1
        seg = (jnp.arange(s) >= s // 2).astype(jnp.int32)[None].repeat(b, 0) if rule.get("segments") else None
        kw = {"window": rule.get("window"), "num_global": rule.get("num_global", 0)}
        if rule.get("critical"):
            kw.update(k_critical=crit, q_critical=crit)
        if seg is not None:
            kw["segment_ids"] = seg
        lay = pk.sra_layout(pos, block_q=block, block_k=128, **kw)
    else:
        n = -(-s // block)
        if density < 1:
            mask = pk.random_causal_block_mask(ks[4], n, density, batch=b)
        else:
            mask = pk.causal_block_mask(n, n)[None, None]
        if block != 128:  # expand to 128-wide kv blocks
            mask = jnp.repeat(mask, block // 128, axis=-1)[..., : -(-s // 128)]
        mask = jnp.broadcast_to(mask, (b, 1, *mask.shape[-2:]))
        lay = pk.layout_from_block_mask(mask, block_q=block, block_k=128)
    return q, k, v, pos, lay, kw


@gpu_only
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"b{c[0]}s{c[1]}h{c[2]}kv{c[3]}d{c[4]}{jnp.dtype(c[5]).name}"
)
def test_mosaic_forward_and_grads_match_reference(case):
    q, k, v, pos, lay, kw = _case(*case)
    kw = {**kw, "q_positions": pos}
    w = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32)

    def loss(backend, q, k, v):
        out = pk.block_sparse_attention(q, k, v, lay, backend=backend, **kw)
        return (out.astype(jnp.float32) * w).sum(), out

    f32 = lambda x: x.astype(jnp.float32)
    grad = jax.value_and_grad(lambda *a: loss("mosaic_gpu", *a), argnums=(0, 1, 2), has_aux=True)
    (_, out), g = jax.jit(grad)(q, k, v)
    (_, ref), g_ref = jax.value_and_grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2), has_aux=True)(
        f32(q), f32(k), f32(v)
    )
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert _rel(out, ref) < TOL
    for a, r in zip(g, g_ref):
        assert np.isfinite(np.asarray(a, np.float32)).all()
        assert _rel(a, r) < TOL
    # Padding rows (position -1) see nothing: zeros, never NaN.
    if q.shape[0] > 1:
        np.testing.assert_array_equal(np.asarray(out[1, -100:], np.float32), 0.0)


@gpu_only
def test_mosaic_forward_with_256_row_layout_blocks():
    """Two 128-row CTAs share one layout row (forward only: the Triton backward tiles want 128-row blocks)."""
    q, k, v, pos, lay, kw = _case(1, 1024, 8, 2, 128, jnp.bfloat16, 256, 1.0, {})
    out = jax.jit(lambda q, k, v: pk.block_sparse_attention(q, k, v, lay, backend="mosaic_gpu"))(q, k, v)
    ref = pk.block_sparse_attention(*(x.astype(jnp.float32) for x in (q, k, v)), lay, backend="reference")
    assert _rel(out, ref) < TOL


@gpu_only
def test_mosaic_forward_equals_triton_forward_and_lse():
    q, k, v, pos, lay, kw = _case(1, 1024, 4, 2, 128, jnp.bfloat16, 128, 0.5, {})
    rule, tokens = token_mask.make_rule_and_tokens(
        q, k, causal=True, window=None, num_global=0, q_positions=None, k_positions=None,
        segment_ids=None, k_segment_ids=None, q_critical=None, k_critical=None,
    )
    qt, qf = dispatch.pack_fields({"pos": tokens.q_positions})
    kt, kf = dispatch.pack_fields({"pos": tokens.k_positions})
    kw = dict(rule=rule, sm_scale=128**-0.5, fields=(qf, kf))
    o_m, lse_m = jax.jit(lambda q, k, v: mosaic.forward(q, k, v, lay, qt, kt, **kw))(q, k, v)
    triton = lambda q, k, v: pk.block_sparse.gpu.forward(q, k, v, lay, qt, kt, config=pk.GpuConfig(), **kw)
    o_t, lse_t = jax.jit(triton)(q, k, v)
    assert _rel(o_m, o_t) < TOL
    np.testing.assert_allclose(np.asarray(lse_m), np.asarray(lse_t), atol=2e-2)


# ---------------------------------------------------------------- the Mosaic GPU backward (mosaic_bwd.py)
#
# Host side (CPU): its configuration, the inputs it refuses (they fall back to the Triton backward), and the
# dispatch. GPU: gradients against the f32 reference across density (full blocks on the unmasked path, empty query
# rows and unvisited key blocks, ragged lengths), window / globals / critical / segments, GQA 1/4/8, head_dim 64/128,
# bf16/f16, per-head layouts; and against the Triton backward from the same forward residuals. Tolerance: the same
# relative L2 < 2e-2 as the forward (dS is rounded to the input dtype before the dQ / dK products, as in Triton).


def test_backward_config_validation():
    with pytest.raises(ValueError, match="backward"):
        mosaic.MosaicConfig(backward="cudnn")
    with pytest.raises(ValueError, match="dq_block_kv"):
        mosaic.MosaicConfig(dq_block_kv=96)
    with pytest.raises(ValueError, match="dkv_block_q"):
        mosaic.MosaicConfig(dkv_block_q=32)
    with pytest.raises(ValueError, match="bwd_stages"):
        mosaic.MosaicConfig(bwd_stages=1)
    dq, dkv = mosaic_bwd.smem_bytes(mosaic.MosaicConfig(), 128, 2, 1)
    # dQ: Q + dO for two warpgroups (2 x 2 x 64 x 128 bf16) + a 2-slot ring of 128-key K and V tiles
    assert dq == 65536 + 2 * 2 * 128 * 128 * 2 + 4 * (2 * 3 * 64 + 2 * 128)
    # dK/dV: K + V for two warpgroups + a 2-slot ring of 64-query Q and dO tiles (+ lse/delta and positions)
    assert dkv == 65536 + 2 * 2 * 64 * 128 * 2 + 4 * (2 * 64 + 2 * 3 * 64)


@pytest.mark.parametrize(
    ("shape", "dtype", "layout", "cfg", "match"),
    [
        ((1, 256, 2, 128), jnp.float32, _layout(), mosaic.MosaicConfig(), "bf16 or f16"),
        ((1, 256, 2, 256), jnp.bfloat16, _layout(), mosaic.MosaicConfig(), "registers"),
        ((1, 256, 2, 128), jnp.bfloat16, _layout(64, 128), mosaic.MosaicConfig(), "block_q"),
        ((1, 256, 2, 128), jnp.bfloat16, _layout(128, 64), mosaic.MosaicConfig(), "block_k"),
        ((1, 256, 2, 128), jnp.bfloat16, _layout(), mosaic.MosaicConfig(bwd_stages=3), "shared"),
    ],
)
def test_backward_unsupported_reason(shape, dtype, layout, cfg, match):
    reason = mosaic_bwd.unsupported_reason(shape, dtype, layout, cfg)
    assert reason is not None and match in reason


def test_backward_supported_shapes_have_no_reason():
    for d, dtype in itertools.product((64, 128), (jnp.bfloat16, jnp.float16)):
        for cfg in (mosaic.MosaicConfig(), mosaic.MosaicConfig(dq_block_kv=128, dkv_block_q=128)):
            assert mosaic_bwd.unsupported_reason((1, 512, 4, d), dtype, _layout(), cfg) is None


@pytest.mark.parametrize(
    ("d", "cfg", "want"),
    [
        (128, mosaic.MosaicConfig(), "mosaic"),
        (256, mosaic.MosaicConfig(), "triton"),  # dK/dV would not fit in registers: the Triton backward runs
        (128, mosaic.MosaicConfig(backward="triton"), "triton"),
    ],
)
def test_backward_dispatch(monkeypatch, d, cfg, want):
    """mosaic.backward runs the Mosaic kernels when they take the inputs, else the Triton ones (same arguments)."""
    called = []
    monkeypatch.setattr(mosaic_bwd, "backward", lambda *a, **k: called.append("mosaic") or (None,) * 3)
    monkeypatch.setattr(pk.block_sparse.gpu, "backward", lambda *a, **k: called.append("triton") or (None,) * 3)
    q = jnp.zeros((1, 256, 2, d), jnp.bfloat16)
    tok = jnp.zeros((1, 1, 256), jnp.int32)
    mosaic.backward(q, q, q, q, None, q, _layout(n=2), tok, tok, config=pk.GpuConfig(), mosaic_config=cfg,
                    rule=MaskRule(), sm_scale=1.0, fields=(("pos",), ("pos",)))
    assert called == [want]


def _grads(backend, q, k, v, lay, kw, cfg=None):
    w = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32)

    def loss(q, k, v):
        out = pk.block_sparse_attention(q, k, v, lay, backend=backend, mosaic_config=cfg, **kw)
        return (out.astype(jnp.float32) * w).sum()

    fn = jax.grad(loss, argnums=(0, 1, 2))
    return jax.jit(fn)(q, k, v) if backend != "reference" else fn(*(x.astype(jnp.float32) for x in (q, k, v)))


def _density_layout(key, b, s, heads, density, *, drop_rows=0):
    """Random causal block mask per (batch, head) with the strictly-lower blocks full (unmasked path); the last
    `drop_rows` query blocks are emptied (zero dQ rows, key blocks nobody visits)."""
    n = s // 128
    mask = pk.random_causal_block_mask(key, n, density, batch=b, heads=heads)
    if drop_rows:
        mask = mask.at[..., n - drop_rows :, :].set(False)
    full = mask & ~jnp.eye(n, dtype=bool)
    return pk.layout_from_block_mask(mask, full_mask=full, block_q=128, block_k=128)


BWD_CASES = [
    # (b, s, hq, hkv, d, dtype, layout heads, density, drop_rows, cfg)
    (1, 1024, 4, 4, 128, jnp.bfloat16, 1, 1.0, 0, mosaic.MosaicConfig(dq_block_kv=64)),
    (1, 1024, 8, 2, 128, jnp.bfloat16, 8, 0.3, 2, mosaic.MosaicConfig()),
    (2, 512, 16, 2, 64, jnp.float16, 2, 0.5, 1, mosaic.MosaicConfig(dq_block_kv=64, bwd_stages=3)),
    (1, 768, 8, 1, 128, jnp.float16, 1, 1.0, 0, mosaic.MosaicConfig(dkv_block_q=128)),
]


@gpu_only
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: f"h{c[2]}kv{c[3]}d{c[4]}lh{c[6]}p{c[7]}drop{c[8]}")
def test_mosaic_backward_matches_reference_across_density(case):
    b, s, hq, hkv, d, dtype, lh, density, drop, cfg = case
    ks = jax.random.split(jax.random.PRNGKey(s + hq), 4)
    q = jax.random.normal(ks[0], (b, s, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), dtype)
    lay = _density_layout(ks[3], b, s, lh, density, drop_rows=drop)
    got = _grads("mosaic_gpu", q, k, v, lay, {}, cfg)
    want = _grads("reference", q, k, v, lay, {})
    for a, r in zip(got, want):
        assert np.isfinite(np.asarray(a, np.float32)).all()
        assert _rel(a, r) < TOL
    if drop:  # empty query rows give zero dQ; key blocks that no query block visits give zero dK/dV
        np.testing.assert_array_equal(np.asarray(got[0][:, s - drop * 128 :], np.float32), 0.0)
        visited_by = np.asarray(lay.q_counts).sum(axis=(0, 1))
        for blk in np.flatnonzero(visited_by == 0):
            np.testing.assert_array_equal(np.asarray(got[1][:, blk * 128 : (blk + 1) * 128], np.float32), 0.0)


SRA_BWD_CASES = [
    # (b, s, hq, hkv, d, dtype, rule kwargs): ragged lengths, padding rows, window, globals, critical, segments
    (2, 1000, 8, 2, 128, jnp.bfloat16, {"window": 100, "num_global": 4, "critical": True}),
    (2, 640, 4, 4, 64, jnp.float16, {"window": 64, "critical": True, "segments": True}),
    (1, 900, 16, 2, 64, jnp.bfloat16, {"window": 200, "critical": True, "q_critical": False}),
]


@gpu_only
@pytest.mark.parametrize("case", SRA_BWD_CASES, ids=lambda c: f"s{c[1]}h{c[2]}kv{c[3]}d{c[4]}")
def test_mosaic_backward_sra_rule_matches_reference(case):
    b, s, hq, hkv, d, dtype, rule = case
    ks = jax.random.split(jax.random.PRNGKey(s + d), 4)
    q = jax.random.normal(ks[0], (b, s, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), dtype)
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    if b > 1:
        pos = pos.at[1, s - 150 :].set(-1)  # a ragged row: its padding queries see nothing
    crit = jax.random.uniform(ks[3], (b, s)) < 0.1
    kw = {"window": rule["window"], "num_global": rule.get("num_global", 0), "k_critical": crit}
    if rule.get("q_critical", True):
        kw["q_critical"] = crit
    if rule.get("segments"):
        kw["segment_ids"] = (jnp.arange(s) >= s // 3).astype(jnp.int32)[None].repeat(b, 0)
    lay = pk.sra_layout(pos, block_q=128, block_k=128, **kw)
    kw["q_positions"] = pos
    got = _grads("mosaic_gpu", q, k, v, lay, kw)
    want = _grads("reference", q, k, v, lay, kw)
    for a, r in zip(got, want):
        assert np.isfinite(np.asarray(a, np.float32)).all()
        assert _rel(a, r) < TOL
    if b > 1:
        np.testing.assert_array_equal(np.asarray(got[0][1, s - 150 :], np.float32), 0.0)


@gpu_only
def test_mosaic_backward_equals_triton_backward():
    """Same forward residuals through both backward implementations."""
    q, k, v, pos, lay, kw = _case(2, 1024, 8, 2, 128, jnp.bfloat16, 128, 0.5, {})
    rule, tokens = token_mask.make_rule_and_tokens(
        q, k, causal=True, window=None, num_global=0, q_positions=pos, k_positions=None,
        segment_ids=None, k_segment_ids=None, q_critical=None, k_critical=None,
    )
    qt, qf = dispatch.pack_fields({"pos": tokens.q_positions})
    kt, kf = dispatch.pack_fields({"pos": tokens.k_positions})
    kw = dict(rule=rule, sm_scale=128**-0.5, fields=(qf, kf))
    out, lse = jax.jit(lambda q, k, v: mosaic.forward(q, k, v, lay, qt, kt, **kw))(q, k, v)
    do = jax.random.normal(jax.random.PRNGKey(3), q.shape, q.dtype)
    args = (q, k, v, out, lse, do)
    got = jax.jit(lambda *a: mosaic_bwd.backward(*a, lay, qt, kt, **kw))(*args)
    want = jax.jit(lambda *a: pk.block_sparse.gpu.backward(*a, lay, qt, kt, config=pk.GpuConfig(), **kw))(*args)
    for a, r in zip(got, want):
        assert _rel(a, r) < TOL
