"""Specs for sra_jax.ops.attention: the implementations agree, empty rows are zeros, no NaN, clear errors."""

from __future__ import annotations

import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sra_jax.ops.attention import attention, attention_flops
from sra_jax.ops.masks import SRAMaskSpec, causal_mask

from .test_masks import packed_positions

# float32 with softmax in float32 over <= 16 keys: implementations differ only in summation order (~1e-6).
TOL = dict(rtol=2e-5, atol=2e-5)


def qkv(seed: int, b: int, sq: int, sk: int, hq: int, hkv: int, d: int = 8, dtype=jnp.float32):
    """Random q, k, v from numpy (no per-shape compile, unlike jax.random)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d)))


def naive_attention(q, k, v, mask):
    """Textbook attention in float64 numpy: repeat kv heads, softmax over visible keys, zeros for empty rows."""
    q, k, v, mask = (np.asarray(x, np.float64) for x in (q, k, v)), None, None, np.asarray(mask)
    q, k, v = q
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    mask = mask[:, None] if mask.ndim == 3 else mask
    logits = np.where(mask, logits, -np.inf)
    peak = np.max(logits, -1, keepdims=True)
    weights = np.where(mask, np.exp(logits - np.where(np.isfinite(peak), peak, 0)), 0)
    weights /= np.maximum(weights.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


# Most tests share one shape so compiled executables are reused across tests (each compile costs ~1 s of CPU).
B, S, HQ, HKV = 2, 8, 4, 2
MAX_CRITICAL = 3


@st.composite
def spec_cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # Packed rows need segment ids (else position 0 of the next sequence would look like a sink of this one).
    packed = draw(st.booleans())
    positions, segments = packed_positions(rng, B, S, max_extra_segments=2 if packed else 0)
    critical = np.zeros((B, S), bool)
    for row in critical:  # at most MAX_CRITICAL per row, as a top-k router gives
        row[rng.choice(S, size=rng.integers(0, MAX_CRITICAL + 1), replace=False)] = True
    spec = SRAMaskSpec.create(
        jnp.asarray(positions),
        jnp.asarray(critical),
        window=draw(st.sampled_from([1, 3])),
        num_global=draw(st.sampled_from([0, 2])),
        queries=draw(st.sampled_from(["critical", "all"])),
        segment_ids=jnp.asarray(segments) if packed else None,
        # The bound nn passes (k of the top-k), or None: gather then considers every key.
        max_critical=draw(st.sampled_from([MAX_CRITICAL, None])),
    )
    return seed, spec


@settings(max_examples=10)  # gather compiles once per rule (window, num_global, queries, max_critical)
@given(spec_cases())
def test_reference_gather_and_xla_agree_with_textbook_attention_on_sra_specs(case):
    seed, spec = case
    q, k, v = qkv(seed, B, S, S, HQ, HKV)
    expected = naive_attention(q, k, v, spec.to_mask())
    for impl in ("reference", "gather", "xla"):
        np.testing.assert_allclose(attention(q, k, v, spec=spec, impl=impl), expected, err_msg=impl, **TOL)


@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2), (8, 2)])  # GQA groups 1, 2, 4
def test_gqa_groups_match_repeated_kv_heads(hq, hkv):
    q, k, v = qkv(0, B, S, S, hq, hkv)
    mask = causal_mask(jnp.broadcast_to(jnp.arange(S), (B, S)))
    expected = naive_attention(q, k, v, mask)
    for impl in ("reference", "xla"):
        np.testing.assert_allclose(attention(q, k, v, mask=mask, impl=impl), expected, err_msg=impl, **TOL)
    np.testing.assert_allclose(attention(q, k, v), expected, **TOL)  # neither mask nor spec: causal by index


def test_rows_that_see_only_themselves_return_their_own_value():
    q, k, v = qkv(1, B, S, S, HQ, HKV)
    spec = SRAMaskSpec.create(jnp.broadcast_to(jnp.arange(S), (B, S)), jnp.zeros((B, S), bool), window=1, num_global=0)
    expected = np.repeat(np.asarray(v), 2, axis=2)  # query head h reads kv head h // 2
    for impl in ("reference", "gather", "xla"):
        np.testing.assert_allclose(attention(q, k, v, spec=spec, impl=impl), expected, err_msg=impl, **TOL)


@pytest.mark.parametrize("impl", ["reference", "gather", "xla"])
def test_padded_rows_are_exact_zeros_and_no_gradient_is_nan(impl):
    positions = jnp.array([[-1, -1, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
    spec = SRAMaskSpec.create(
        positions, jnp.zeros((B, S), bool).at[:, 3].set(True), window=3, num_global=2, max_critical=MAX_CRITICAL
    )
    q, k, v = qkv(2, B, S, S, HQ, HKV)
    out = attention(q, k, v, spec=spec, impl=impl)
    np.testing.assert_array_equal(out[0, :2], 0.0)
    grads = jax.grad(lambda *x: jnp.sum(attention(*x, spec=spec, impl=impl) ** 2), argnums=(0, 1, 2))(q, k, v)
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(grads[0][0, :2], 0.0)  # padded queries get no gradient
    np.testing.assert_array_equal(grads[1][0, :2], 0.0)  # nor do padded keys


def test_gather_and_reference_gradients_agree():
    positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    critical = jnp.array([[0, 0, 1, 0, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0, 1, 0]], bool)
    spec = SRAMaskSpec.create(positions, critical, window=3, num_global=2, max_critical=MAX_CRITICAL)
    q, k, v = qkv(3, B, S, S, HQ, HKV)

    def grads(impl):
        return jax.grad(lambda *x: jnp.sum(jnp.sin(attention(*x, spec=spec, impl=impl))), argnums=(0, 1, 2))(q, k, v)

    for ours, theirs in zip(grads("gather"), grads("reference")):
        np.testing.assert_allclose(ours, theirs, **TOL)


def test_gather_handles_kv_cache_keys_with_padding_and_empty_slots():
    """Decoding: 3 new queries over a cache with 2 left-padding slots, 9 tokens, 3 empty slots at the end."""
    k_positions = jnp.array([[-1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, -1, -1, -1]])
    k_critical = jnp.zeros((1, 14), bool).at[0, jnp.array([3, 6, 9])].set(True)
    q_positions = jnp.array([[6, 7, 8]])
    spec = SRAMaskSpec.create(
        q_positions, k_critical[:, 8:11], window=2, num_global=1,
        k_positions=k_positions, k_critical=k_critical, max_critical=3,
    )
    q, k, v = qkv(4, 1, 3, 14, 4, 2)
    expected = naive_attention(q, k, v, spec.to_mask())
    for impl in ("reference", "gather", "xla"):
        np.testing.assert_allclose(attention(q, k, v, spec=spec, impl=impl), expected, err_msg=impl, **TOL)


def test_gather_refuses_more_critical_keys_than_max_critical():
    """Eager: a ValueError naming the count and the bound; under jit (count unknown at trace time) the row that
    overflows is NaN and the other row is exact, never a silent drop of critical keys."""
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    critical = jnp.zeros((2, 12), bool).at[0, jnp.array([1, 4, 7])].set(True).at[1, 2].set(True)
    spec = SRAMaskSpec.create(positions, critical, window=2, num_global=0, max_critical=2)
    q, k, v = qkv(9, 2, 12, 12, 2, 1)
    with pytest.raises(ValueError, match="3 critical keys, more than spec.max_critical=2"):
        attention(q, k, v, spec=spec, impl="gather")
    got = jax.jit(lambda q, k, v, spec: attention(q, k, v, spec=spec, impl="gather"))(q, k, v, spec)
    assert np.isnan(np.asarray(got[0])).all()
    np.testing.assert_allclose(got[1], attention(q, k, v, spec=spec)[1], **TOL)


def test_per_head_masks_and_decode_alignment():
    q, k, v = qkv(5, B, 2, S, HQ, HKV)
    mask = jnp.asarray(np.random.default_rng(6).random((B, HQ, 2, S)) < 0.5)
    for impl in ("reference", "xla"):
        np.testing.assert_allclose(attention(q, k, v, mask=mask, impl=impl), naive_attention(q, k, v, mask), err_msg=impl, **TOL)
    # Causal by index with fewer queries than keys: the last query sees every key.
    last = np.broadcast_to(np.tril(np.ones((2, S), bool), S - 2), (B, 2, S))
    np.testing.assert_allclose(attention(q, k, v), naive_attention(q, k, v, last), **TOL)


def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float32():
    q, k, v = qkv(7, B, S, S, HQ, HKV)
    out = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    # bfloat16 inputs carry ~3 significant digits; outputs are convex combinations of values of size ~1.
    np.testing.assert_allclose(np.asarray(out, np.float32), attention(q, k, v), atol=5e-2)


def test_attention_flops_count_four_head_dim_per_visible_pair_and_head():
    mask = causal_mask(jnp.arange(4)[None])  # 10 visible pairs
    np.testing.assert_allclose(attention_flops(mask, num_heads=2, head_dim=8), [10 * 4 * 8 * 2])
    np.testing.assert_allclose(attention_flops(10, num_heads=2, head_dim=8), 640)


def _bad(**overrides):
    q, k, v = qkv(0, 1, 4, 4, 4, 2)
    args = dict(q=q, k=k, v=v)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args, message",
    [
        (_bad(q=jnp.zeros((1, 4, 4))), r"q must have rank 4"),
        (_bad(k=jnp.zeros((1, 4, 2, 8, 1)), v=jnp.zeros((1, 4, 2, 8, 1))), r"k must have rank 4"),
        (_bad(k=jnp.zeros((1, 4, 2, 6)), v=jnp.zeros((1, 4, 2, 6))), r"head_dim \(8\) must equal k/v head_dim \(6\)"),
        (_bad(k=jnp.zeros((1, 4, 3, 8)), v=jnp.zeros((1, 4, 3, 8))), r"kv heads \(3\) must divide query heads \(4\)"),
        (_bad(v=jnp.zeros((1, 5, 2, 8))), r"k shape .* must equal v shape"),
        (_bad(k=jnp.zeros((2, 4, 2, 8)), v=jnp.zeros((2, 4, 2, 8))), r"q batch \(1\) must equal k/v batch \(2\)"),
        (_bad(v=jnp.zeros((1, 4, 2, 8), jnp.bfloat16)), r"share a dtype"),
        (_bad(mask=jnp.ones((1, 4, 5), bool)), r"mask shape \(1, 4, 5\)"),
        (_bad(mask=jnp.ones((1, 4, 4), jnp.int32)), r"mask must be boolean"),
        (_bad(impl="flash"), r"unknown attention impl 'flash'"),
        (_bad(impl="gather"), r"impl='gather' needs spec="),
        (_bad(spec=SRAMaskSpec.create(jnp.arange(3)[None], jnp.zeros((1, 3), bool), window=1, num_global=0)), r"spec describes"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_problem(args, message):
    with pytest.raises(ValueError, match=message):
        attention(**args)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error message")
def test_cudnn_on_cpu_says_it_needs_a_gpu():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        attention(**_bad(impl="cudnn"))


def test_pallas_without_its_module_raises_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sra_jax.ops.attention_pallas", None)  # makes the import fail
    with pytest.raises(ImportError, match="impl='pallas' needs sra_jax/ops/attention_pallas.py"):
        attention(**_bad(impl="pallas"))


def test_gather_never_builds_a_query_by_key_array():
    """Memory O(s * (window + num_global + max_critical)): no intermediate in its program has an s x s block."""
    s = 512
    positions = jnp.arange(s)[None]
    spec = SRAMaskSpec.create(positions, positions % 64 == 0, window=16, num_global=4, max_critical=8)
    q, k, v = qkv(8, 1, s, s, 2, 1)
    jaxpr = jax.make_jaxpr(lambda q, k, v: attention(q, k, v, spec=spec, impl="gather"))(q, k, v)

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (var.aval.shape for var in eqn.outvars)
            for param in eqn.params.values():  # nested programs: jit, scan, while, cond branches
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from shapes(sub)

    largest = max(np.prod(shape) for shape in shapes(jaxpr.jaxpr))
    assert largest <= s * (16 + 4 + 8) * 2 * 8  # [s, window + globals + critical, heads, head_dim]


def _assert_xla_matches_textbook(spec, q, k, v):
    """impl="xla" (whichever branch it takes) against the textbook softmax, forward and gradients vs the reference."""
    want = naive_attention(q, k, v, spec.to_mask())
    np.testing.assert_allclose(attention(q, k, v, spec=spec, impl="xla"), want, **TOL)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, spec=spec, impl=impl)))

    got = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, **TOL)


@pytest.mark.parametrize(
    "positions, fast",
    [
        ([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, -1, -1, -1]], True),  # right padding: the fused causal path
        ([[0, 1, 2, 3, 4, 5, 6, 7], [-1, -1, -1, 0, 1, 2, 3, 4]], False),  # left padding: mask path
        ([[3, 4, 5, 6, 7, 8, 9, 10], [0, 1, 2, 3, 4, 5, 6, 7]], False),  # offset positions: mask path
        ([[-1] * 8, [0, 1, 2, 3, 4, 5, 6, 7]], True),  # an all-padding row
    ],
)
def test_dense_causal_spec_fast_path_matches_the_mask_path(positions, fast):
    """xla/cudnn take jax.nn.dot_product_attention(is_causal=True, key_value_seq_lengths) only when the positions
    are 0..n-1 followed by padding; any other layout falls back to the mask. Both agree with the textbook."""
    from sra_jax.ops.attention import _is_prefix_causal, _may_be_prefix_causal

    positions = jnp.asarray(positions, jnp.int32)
    spec = SRAMaskSpec.create(positions, jnp.zeros((B, S), bool), window=2**30, num_global=0, max_critical=0)
    assert _may_be_prefix_causal(spec)
    assert bool(_is_prefix_causal(spec)) == fast
    _assert_xla_matches_textbook(spec, *qkv(11, B, S, S, HQ, HKV))


@pytest.mark.parametrize(
    "q_positions, k_positions, fast",
    [
        ([[0, 1, 2, 3], [0, 1, -1, -1]], [[0, 1, 2, 3, -1, -1, -1, -1], [0, 1, -1, -1, -1, -1, -1, -1]], True),
        # the cache already holds earlier tokens: the queries are not the first slots
        ([[2, 3, 4, 5], [2, 3, 4, 5]], [[0, 1, 2, 3, 4, 5, -1, -1], [0, 1, 2, 3, 4, 5, -1, -1]], False),
        # a stale entry after the prefill slots
        ([[0, 1, 2, 3], [0, 1, 2, 3]], [[0, 1, 2, 3, -1, -1, -1, -1], [0, 1, 2, 3, 7, -1, -1, -1]], False),
        # left-padded prompts (what generate builds): the mask path
        ([[0, 1, 2, 3], [-1, -1, 0, 1]], [[0, 1, 2, 3, -1, -1, -1, -1], [-1, -1, 0, 1, -1, -1, -1, -1]], False),
    ],
)
def test_prefill_into_a_cache_takes_the_fused_causal_path_only_when_it_is_plain_causal(q_positions, k_positions,
                                                                                        fast):
    """A dense prefill writes its tokens to the first cache slots and attends over the whole cache: the fused causal
    kernel (top-left causal over the row's length) is exact then, and every other layout takes the mask path."""
    from sra_jax.ops.attention import _is_prefix_causal, _may_be_prefix_causal

    q_pos, k_pos = jnp.asarray(q_positions, jnp.int32), jnp.asarray(k_positions, jnp.int32)
    sq, sk = q_pos.shape[1], k_pos.shape[1]
    spec = SRAMaskSpec.create(q_pos, jnp.zeros((B, sq), bool), k_positions=k_pos, k_critical=jnp.zeros((B, sk), bool),
                              window=2**30, num_global=0)
    assert _may_be_prefix_causal(spec)
    assert bool(_is_prefix_causal(spec)) == fast
    _assert_xla_matches_textbook(spec, *qkv(13, B, sq, sk, HQ, HKV))


def test_causal_by_index_without_mask_uses_the_fused_path_and_agrees():
    q, k, v = qkv(12, B, S, S, HQ, HKV)
    want = naive_attention(q, k, v, np.tril(np.ones((B, S, S), bool)))
    np.testing.assert_allclose(attention(q, k, v, impl="xla"), want, **TOL)


def _poisoned_keys(k, v, future: int, padding: int):
    """NaN k and -inf v at key `future` (invisible to earlier rows), inf v at the padding slot `padding`."""
    return k.at[:, future].set(jnp.nan), v.at[:, future].set(-jnp.inf).at[:, padding].set(jnp.inf)


@pytest.mark.parametrize(
    "impl, use_spec",
    [("reference", True), ("gather", True), ("xla", True), ("xla", False), ("pallas", True), ("pallas", False)],
)
def test_nonfinite_keys_reach_only_the_rows_that_see_them(impl, use_spec):
    """Issue 16: NaN k and -inf v at key 5 (rows 0..4 cannot see it, a later position) and inf in the v of a padding
    slot: rows 0..4 and every row of the clean batch entry are exactly the clean output, with the clean
    gradients; the rows that do see key 5 are NaN (as in exact arithmetic). xla without a spec is the fused
    causal path (cuDNN's on a GPU); pallas runs the kernels' dense backend here (tests/pallas_kernels: Triton)."""
    positions = jnp.array([[0, 1, 2, 3, 4, 5, 6, -1], [0, 1, 2, 3, 4, 5, 6, 7]])
    spec = None
    if use_spec:
        critical = jnp.zeros((B, S), bool).at[:, 2].set(True)
        spec = SRAMaskSpec.create(positions, critical, window=3, num_global=1, max_critical=MAX_CRITICAL)
    q, k, v = qkv(11, B, S, S, HQ, HKV)
    bad_k, bad_v = _poisoned_keys(k, v, future=5, padding=7)
    bad_k, bad_v = bad_k.at[1].set(k[1]), bad_v.at[1].set(v[1])  # batch entry 1 stays clean
    run = jax.jit(lambda q, k, v: attention(q, k, v, spec=spec, impl=impl))
    loss = jax.jit(jax.grad(lambda q, k, v: jnp.sum(run(q, k, v)[:, :5] ** 2), argnums=(0, 1, 2)))
    got, want = run(q, bad_k, bad_v), run(q, k, v)
    np.testing.assert_array_equal(got[:, :5], want[:, :5])
    np.testing.assert_array_equal(got[1], want[1])
    assert np.isnan(np.asarray(got[0, 5:7])).all()  # rows 5 and 6 see key 5 (window 3)
    for g, w in zip(loss(q, bad_k, bad_v), loss(q, k, v)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)  # same program on the same finite values


@settings(max_examples=10)
@given(spec_cases(), st.booleans())
def test_a_spec_mask_over_the_size_limit_is_built_a_block_of_queries_at_a_time(case, prefix_causal_window):
    """Above `_MASK_CHUNK_ELEMENTS` the xla path builds and attends the spec's mask per block of queries (`lax.map`,
    also in the prefix-causal conditional's fallback branch): the same forward and gradients as the whole mask."""
    import sra_jax.ops.attention as attention_module

    seed, spec = case
    if prefix_causal_window:  # a dense spec: the runtime prefix-causal check, whose fallback is the mask path
        spec = SRAMaskSpec.create(spec.q_positions, spec.q_critical, window=2**30, num_global=0,
                                  segment_ids=spec.q_segment_ids)
    q, k, v = qkv(seed, B, S, S, HQ, HKV)

    def loss(impl, q, k, v):
        out = attention(q, k, v, spec=spec, impl=impl)
        return jnp.sum(out * jnp.cos(out)), out

    want = jax.grad(partial(loss, "reference"), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_module, "_MASK_CHUNK_ELEMENTS", B * 2 * S)  # blocks of 2 queries
        assert "scan" in str(jax.make_jaxpr(partial(loss, "xla"))(q, k, v))
        got = jax.grad(partial(loss, "xla"), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, **TOL)
