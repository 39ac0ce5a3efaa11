"""Top-k gather attention (Triton and TPU kernels in interpret mode, and lowered for their platforms) against the gathered jnp reference and a float64 dense
oracle written from the rule: forward and gradients, GQA groups, lists shared or per kv head, empty slots (fewer
visible keys than k), padding, packed segments, non-causal; bad arguments name the problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import reference, topk_attention
from tests.pallas_kernels.kernel_testing import TOL, dense_softmax_attention, rel_err

KERNEL = dict(backend="triton", interpret=True, block_k=16)


def _case(seed, b, s, hq, hkv, top_k, per_head, pad):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, s, hq, 16))
    k = jax.random.normal(ks[1], (b, s, hkv, 16))
    v = jax.random.normal(ks[2], (b, s, hkv, 16))
    heads = hkv if per_head else 1
    # distinct indices per list (as a top-k gives), drawn from -2 .. s - 1: negative entries are empty slots
    draw = lambda key: jax.random.permutation(key, s + 2)[:top_k] - 2
    idx = jax.vmap(draw)(jax.random.split(ks[3], b * s * heads)).reshape(b, s, heads, top_k)
    idx = idx[:, :, 0] if not per_head else idx
    valid = jax.random.uniform(ks[4], idx.shape) < 0.9
    i = np.arange(s)
    # row 0: one segment, the last `pad` tokens padding; row 1: two packed segments with their own positions
    pos = np.stack([np.where(i < s - pad, i, -1), np.where(i < s // 2, i, i - s // 2)])
    seg = np.stack([0 * i, (i >= s // 2).astype(int)])
    return q, k, v, idx, valid, jnp.asarray(pos[:b], jnp.int32), jnp.asarray(seg[:b], jnp.int32)


def _oracle_mask(idx, valid, pos, seg, hkv, hq, causal):
    """[b, hq, q, k] from the rule, one slot at a time."""
    idx, valid, pos, seg = map(np.asarray, (idx, valid, pos, seg))
    b, s = pos.shape
    per = idx.reshape(b, s, -1, idx.shape[-1])
    mask = np.zeros((b, hq, s, s), bool)
    for bi in range(b):
        for t in range(s):
            for h in range(hq):
                lst = per[bi, t, h // (hq // hkv) if per.shape[2] > 1 else 0]
                ok = valid[bi, t].reshape(-1, idx.shape[-1])[h // (hq // hkv) if per.shape[2] > 1 else 0]
                for j, live in zip(lst, ok):
                    if not live or j < 0 or j >= s or pos[bi, t] < 0 or pos[bi, j] < 0 or seg[bi, t] != seg[bi, j]:
                        continue
                    if causal and pos[bi, j] > pos[bi, t]:
                        continue
                    mask[bi, h, t, j] = True
    return mask


@settings(max_examples=3)  # each example compiles the forward and backward kernels in interpret mode
@given(
    s=st.sampled_from([8, 13]),
    group=st.sampled_from([(2, 1), (4, 2)]),
    top_k=st.sampled_from([3, 9, 17]),
    per_head=st.booleans(),
    causal=st.booleans(),
    pad=st.integers(0, 3),
    seed=st.integers(0, 1000),
)
def test_kernel_matches_reference_and_oracle(s, group, top_k, per_head, causal, pad, seed):
    hq, hkv = group
    top_k = min(top_k, s + 2)
    q, k, v, idx, valid, pos, seg = _case(seed, 2, s, hq, hkv, top_k, per_head, pad)
    kw = dict(valid=valid, causal=causal, q_positions=pos, k_positions=pos, segment_ids=seg)
    ref = reference.topk_attention(q, k, v, idx, **kw)
    got = topk_attention(q, k, v, idx, **KERNEL, **kw)
    oracle = dense_softmax_attention(q, k, v, _oracle_mask(idx, valid, pos, seg, hkv, hq, causal), 16**-0.5)
    assert rel_err(ref, oracle) < TOL[jnp.float32]
    assert rel_err(got, ref) < TOL[jnp.float32]
    w = jnp.cos(jnp.arange(16.0))
    loss = lambda backend, extra: (
        lambda q, k, v: (topk_attention(q, k, v, idx, backend=backend, **extra, **kw) * w).sum()
    )
    gr = jax.grad(loss("reference", {}), (0, 1, 2))(q, k, v)
    gk = jax.grad(loss("triton", {"interpret": True, "block_k": 16}), (0, 1, 2))(q, k, v)
    for a, b_ in zip(gk, gr):
        assert rel_err(a, b_) < TOL[jnp.float32]


def test_rows_with_nothing_visible_give_zeros_and_zero_gradients():
    q, k, v, idx, valid, pos, seg = _case(1, 2, 8, 2, 1, 4, False, 0)
    idx = idx.at[:, :3].set(-1)  # the first three queries list nothing
    f = lambda q, k, v: topk_attention(q, k, v, idx, q_positions=pos, k_positions=pos, **KERNEL)
    out = f(q, k, v)
    assert float(jnp.abs(out[:, :3]).max()) == 0
    dq = jax.grad(lambda q: f(q, k, v).sum())(q)
    assert float(jnp.abs(dq[:, :3]).max()) == 0


def test_bf16_inputs_within_the_rounding_tolerance():
    q, k, v, idx, valid, pos, seg = _case(2, 2, 13, 4, 2, 9, True, 2)
    kw = dict(valid=valid, q_positions=pos, k_positions=pos, segment_ids=seg)
    as16 = lambda x: x.astype(jnp.bfloat16)
    ref = topk_attention(q, k, v, idx, backend="reference", **kw)
    got = topk_attention(as16(q), as16(k), as16(v), idx, **KERNEL, **kw)
    assert rel_err(got, ref) < TOL[jnp.bfloat16]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(backend="cuda"), "backend"),
        (dict(block_k=24), "block_k"),
        (dict(k=jnp.zeros((2, 8, 3, 16))), "must divide"),
        (dict(k=jnp.zeros((2, 8, 1, 16), jnp.bfloat16)), "dtypes differ"),
    ],
)
def test_bad_arguments_name_the_problem(change, match):
    # (wrong ranks and shape mismatches between annotated arguments are caught by the jaxtyping annotations)
    q, k, v, idx, *_ = _case(0, 2, 8, 2, 1, 4, False, 0)
    args = dict(q=q, k=k, v=v, indices=idx) | change
    if "k" in change:
        args["v"] = change["k"]
    with pytest.raises(ValueError, match=match):
        topk_attention(**args)


def test_triton_kernels_lower_for_the_gpu_platform_on_cpu():
    # jax's Pallas -> Triton lowering runs without a GPU (the Triton compiler itself does not): odd sizes, a GQA
    # group of 3 padded to 16 rows, a list length that is not a multiple of block_k
    q = jnp.zeros((2, 300, 6, 64), jnp.bfloat16)
    k = jnp.zeros((2, 300, 2, 64), jnp.bfloat16)
    idx = jnp.zeros((2, 300, 100), jnp.int32)
    loss = lambda q, k, v: topk_attention(q, k, v, idx, backend="triton").astype(jnp.float32).sum()
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel


@pytest.mark.parametrize("per_head, causal", [(False, True), (True, False)])
def test_tpu_kernel_matches_reference_forward_and_gradients(per_head, causal):
    q, k, v, idx, valid, pos, seg = _case(3, 2, 13, 4, 2, 9, per_head, 2)
    kw = dict(valid=valid, causal=causal, q_positions=pos, k_positions=pos, segment_ids=seg)
    w = jnp.cos(jnp.arange(16.0))
    run = lambda backend, extra: lambda q, k, v: topk_attention(q, k, v, idx, backend=backend, **extra, **kw)
    tpu = run("tpu", {"interpret": True, "block_k": 16})
    ref = run("reference", {})
    assert rel_err(tpu(q, k, v), ref(q, k, v)) < TOL[jnp.float32]
    gt = jax.grad(lambda q, k, v: (tpu(q, k, v) * w).sum(), (0, 1, 2))(q, k, v)
    gr = jax.grad(lambda q, k, v: (ref(q, k, v) * w).sum(), (0, 1, 2))(q, k, v)
    for a, b_ in zip(gt, gr):
        assert rel_err(a, b_) < TOL[jnp.float32]


def test_tpu_kernels_lower_for_the_tpu_platform_on_cpu():
    # jax needs a chip description to lower Mosaic kernels; on a CPU host none exists, so register one (v5e) for
    # the "cpu" device kind. This checks jax's Mosaic lowering only: the TPU compiler itself never runs here.
    from jax._src.pallas.mosaic import tpu_info

    tpu_info.registry.setdefault("cpu", lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
    q = jnp.zeros((1, 256, 16, 128), jnp.bfloat16)
    k = jnp.zeros((1, 256, 1, 128), jnp.bfloat16)
    idx = jnp.zeros((1, 256, 128), jnp.int32)
    loss = lambda q, k, v: topk_attention(q, k, v, idx, backend="tpu").astype(jnp.float32).sum()
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 2  # the forward and the backward kernel
