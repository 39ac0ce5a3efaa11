"""Compact (gathered critical tokens) SRA attention against a dense reference of the SRA rule.

The reference mask is written here from DESIGN.md's rule (numpy), the forward reference is float64 numpy, the
gradient reference is jax.grad of the dense masked softmax. Backend "reference" runs the real split (band part +
compact critical part), gathers, merge and union-softmax backward with dense jnp per part (fast: hypothesis
draws shapes); the Triton kernels run in interpret mode on fixed shapes (one compile each, hypothesis draws data).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import TOL, dense_softmax_attention, qkv, rel_err

import pallas_kernels as pk
from pallas_kernels.reference import masked_attention

TINY = pk.GpuConfig(
    fwd_block_q=16, fwd_block_k=16, dq_block_q=16, dq_block_k=16, dkv_block_q=16, dkv_block_k=16
)


def rule_mask(pos, crit, seg, *, window, num_global, queries):
    """DESIGN.md: j visible to i iff same segment, 0 <= pos_j <= pos_i, and (pos_i - pos_j < window, or
    pos_j < num_global, or (j critical and (i critical or queries == "all")))."""
    qp, kp = pos[:, :, None], pos[:, None, :]
    ok = (qp >= 0) & (kp >= 0) & (kp <= qp) & (seg[:, :, None] == seg[:, None, :])
    c = crit[:, None, :] & (crit[:, :, None] if queries == "critical" else True)
    return ok & ((qp - kp < window) | (kp < num_global) | c)


def _run(q, k, v, pos, crit, seg, *, window, num_global, queries, max_critical, backend="reference", **extra):
    w = jax.random.normal(jax.random.PRNGKey(11), q.shape, jnp.float32)

    def f(q, k, v):
        return pk.sra_compact_attention(
            q, k, v, q_positions=pos, k_positions=pos, q_critical=crit, k_critical=crit, window=window,
            num_global=num_global, queries=queries, max_critical=max_critical, segment_ids=seg,
            backend=backend, **extra,
        )

    loss = lambda q, k, v: (f(q, k, v).astype(jnp.float32) * w).sum()
    out = f(q, k, v)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return out, grads, w


# Jitted (one compile per shape and static rule): eager dispatch of the many small ops is what costs on CPU.
_run_jit = jax.jit(_run, static_argnames=("window", "num_global", "queries", "max_critical", "backend"))


@jax.jit
def _reference_grads(q, k, v, mask, w):
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    loss = lambda q, k, v: (masked_attention(q, k, v, mask[:, None], q.shape[-1] ** -0.5) * w).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(f32(q), f32(k), f32(v))


def _reference(q, k, v, mask, w):
    out = dense_softmax_attention(q, k, v, mask, q.shape[-1] ** -0.5)
    return out, _reference_grads(q, k, v, jnp.asarray(mask), w)


def _assert_close(got, ref, tol):
    out, grads = got
    ref_out, ref_grads = ref
    errs = [rel_err(out, ref_out)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errs) < tol, f"rel errors out/dq/dk/dv {errs} (tol {tol})"


def _draw_tokens(rng, b, s, *, fraction, ragged, segments):
    pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    seg = np.zeros((b, s), np.int32)
    for i in range(b):
        if ragged:
            pos[i, rng.integers(1, s + 1) :] = -1  # padding tail
        if segments:
            cut = rng.integers(1, s)
            seg[i, cut:] = 1
            pos[i, cut:] = np.where(pos[i, cut:] >= 0, pos[i, cut:] - cut, -1)  # positions restart per segment
    crit = (rng.random((b, s)) < fraction) & (pos >= 0)
    return pos, crit, seg


@settings(max_examples=6, deadline=None)
@given(
    s=st.sampled_from([5, 24, 33]),
    groups=st.sampled_from([(2, 2), (4, 1)]),
    window=st.sampled_from([1, 5, 12]),
    num_global=st.sampled_from([0, 3]),
    queries=st.sampled_from(["critical", "all"]),
    fraction=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    ragged=st.booleans(),
    segments=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_compact_matches_sra_rule_f32(s, groups, window, num_global, queries, fraction, ragged, segments, seed):
    """Forward and dq/dk/dv, f32: GQA 1 and 4, windows that hold critical keys (part B must not count them
    twice), no critical tokens (fraction 0), every token critical (fraction 1), ragged padding, segments (globals
    in the band part) or none (globals as their own part). Lengths and rules come from small sets: each distinct
    one is a compile."""
    rng = np.random.default_rng(seed)
    hq, hkv = groups
    q, k, v = qkv(jax.random.PRNGKey(seed % 1000), 2, s, s, hq, hkv, 16, jnp.float32)
    pos, crit, seg = _draw_tokens(rng, 2, s, fraction=fraction, ragged=ragged, segments=segments)
    kw = dict(window=window, num_global=num_global, queries=queries)
    pos_, crit_ = jnp.asarray(pos), jnp.asarray(crit)
    seg_ = jnp.asarray(seg) if segments else None  # without segment ids the globals take part G
    out, grads, w = _run_jit(q, k, v, pos_, crit_, seg_, max_critical=s, **kw)
    mask = rule_mask(pos, crit, seg, **kw)
    _assert_close((out, grads), _reference(q, k, v, mask, w), TOL[jnp.float32])
    padding_rows = np.asarray(out)[pos < 0]
    assert np.all(padding_rows == 0), "padding queries must give zeros"


@settings(max_examples=4, deadline=None)
@given(queries=st.sampled_from(["critical", "all"]), seed=st.integers(0, 2**31 - 1))
def test_compact_bf16(queries, seed):
    """bf16 inputs: each part's output and gradients are rounded to bf16 once more than in one fused kernel (the
    merge reads two bf16 outputs), well inside the kernels' bf16 tolerance (3e-2: a few bf16 roundings)."""
    rng = np.random.default_rng(seed)
    s = 37
    q, k, v = qkv(jax.random.PRNGKey(seed % 1000), 1, s, s, 4, 1, 16, jnp.bfloat16)
    pos, crit, seg = _draw_tokens(rng, 1, s, fraction=0.3, ragged=True, segments=False)
    kw = dict(window=6, num_global=2, queries=queries)
    out, grads, w = _run_jit(q, k, v, jnp.asarray(pos), jnp.asarray(crit), None, max_critical=s, **kw)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    mask = rule_mask(pos, crit, np.zeros_like(pos), **kw)
    _assert_close((out, grads), _reference(q, k, v, mask, w), TOL[jnp.bfloat16])


def test_critical_keys_inside_the_window_are_counted_once():
    """Every other token critical, window 8: most critical keys of a critical query lie inside its window,
    so a merge that also counted them in the compact part would give them double weight."""
    s = 32
    q, k, v = qkv(jax.random.PRNGKey(3), 1, s, s, 2, 2, 16, jnp.float32)
    pos = np.arange(s, dtype=np.int32)[None]
    crit = (np.arange(s) % 2 == 0)[None]
    kw = dict(window=8, num_global=1, queries="critical")
    out, grads, w = _run_jit(q, k, v, jnp.asarray(pos), jnp.asarray(crit), None, max_critical=16, **kw)
    _assert_close((out, grads), _reference(q, k, v, rule_mask(pos, crit, np.zeros_like(pos), **kw), w), 2e-5)
    # What a merge without the window exclusion would compute (critical keys inside a critical query's window
    # counted twice) is a different softmax, far outside that tolerance: the check above can tell.
    mask = rule_mask(pos, crit, np.zeros_like(pos), **kw)
    dist = pos[:, :, None] - pos[:, None, :]
    twice = mask & crit[:, :, None] & crit[:, None, :] & (pos[:, None, :] >= 1) & (dist < 8)
    assert twice.any()
    doubled = dense_softmax_attention(
        q, np.concatenate([k, k], 1), np.concatenate([v, v], 1), np.concatenate([mask, twice], 2), 16**-0.5
    )
    assert rel_err(doubled, out) > 1e-2


def test_max_critical_zero_and_overflow():
    s = 24
    q, k, v = qkv(jax.random.PRNGKey(4), 1, s, s, 2, 1, 16, jnp.float32)
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    none = jnp.zeros((1, s), bool)
    kw = dict(q_positions=pos, k_positions=pos, window=4, num_global=2, queries="critical", backend="reference")
    out = pk.sra_compact_attention(q, k, v, q_critical=none, k_critical=none, max_critical=0, **kw)
    mask = rule_mask(np.asarray(pos), np.asarray(none), np.zeros((1, s), np.int32), window=4, num_global=2,
                     queries="critical")
    assert rel_err(out, dense_softmax_attention(q, k, v, mask, 0.25)) < 2e-5
    crit = jnp.ones((1, s), bool)
    with pytest.raises(ValueError, match="exceed max_critical"):
        pk.sra_compact_attention(q, k, v, q_critical=crit, k_critical=crit, max_critical=5, **kw)
    jitted = jax.jit(lambda c: pk.sra_compact_attention(q, k, v, q_critical=c, k_critical=c, max_critical=5, **kw))
    assert np.isnan(np.asarray(jitted(crit))).all(), "an overflowing row must be NaN under jit, not silently wrong"


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(window=0), "window"),
        (dict(num_global=-1), "num_global"),
        (dict(queries="some"), "queries"),
        (dict(max_critical=-2), "max_critical"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments_are_named(bad, match):
    q, k, v = qkv(jax.random.PRNGKey(0), 1, 8, 8, 2, 1, 16, jnp.float32)
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    crit = jnp.zeros((1, 8), bool)
    kw = dict(window=4, num_global=1, queries="all", max_critical=2, backend="reference") | bad
    with pytest.raises(ValueError, match=match):
        pk.sra_compact_attention(q, k, v, q_positions=pos, k_positions=pos, q_critical=crit, k_critical=crit, **kw)


def test_compact_is_cheaper_rule():
    """Scattered 10% at 32k with a 64 window: far fewer blocks; a window as long as the sequence: not cheaper."""
    kw = dict(num_global=4, queries="critical")
    assert pk.compact_is_cheaper(32768, 32768, window=64, max_critical=3277, **kw)
    assert pk.compact_is_cheaper(32768, 32768, window=1024, max_critical=3277, queries="all", num_global=4)
    assert not pk.compact_is_cheaper(512, 512, window=512, max_critical=51, **kw)
    assert not pk.compact_is_cheaper(32768, 32768, window=64, max_critical=None, **kw)


@pytest.mark.parametrize("queries", ["critical", "all"])
def test_compact_bounds_cover_ten_percent_at_32k(queries):
    """The public op's default at S=32k, window 1024, 10% critical (3277 tokens): rounded up to 4096, still the
    compact path; bounds are ascending powers of two times the block, each one cheaper than the plain layout."""
    bounds = pk.compact_bounds(32768, 32768, window=1024, num_global=4, queries=queries)
    assert bounds[0] == 128 and list(bounds) == sorted(bounds) and 4096 in bounds
    kw = dict(window=1024, num_global=4, queries=queries)
    assert all(pk.compact_is_cheaper(32768, 32768, max_critical=m, **kw) for m in bounds)
    assert not pk.compact_is_cheaper(32768, 32768, max_critical=2 * bounds[-1], **kw)
    assert pk.compact_bounds(512, 512, window=512, num_global=4, queries=queries) == ()


@functools.partial(jax.jit, static_argnames=("queries", "window", "num_global"))
def _triton_case(q, k, v, pos, crit, seg, *, queries, window, num_global):
    kw = dict(window=window, num_global=num_global, queries=queries)
    return _run(q, k, v, pos, crit, seg, max_critical=20, backend="triton", interpret=True, block=16,
                config=TINY, **kw)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), fraction=st.sampled_from([0.0, 0.3, 0.5]))
def test_triton_interpret_gqa4_f32_critical_queries(seed, fraction):
    """The Triton kernels (interpret mode) behind both parts: 45 tokens (ragged against the 16-token blocks),
    GQA 4, segments, padding tails, queries == "critical"; exact up to f32 summation order."""
    rng = np.random.default_rng(seed)
    q, k, v = qkv(jax.random.PRNGKey(seed % 1000), 2, 45, 45, 4, 1, 16, jnp.float32)
    pos, crit, seg = _draw_tokens(rng, 2, 45, fraction=fraction, ragged=True, segments=True)
    crit &= np.cumsum(crit, 1) <= 20  # at most max_critical
    kw = dict(window=5, num_global=2, queries="critical")
    out, grads, w = _triton_case(q, k, v, jnp.asarray(pos), jnp.asarray(crit), jnp.asarray(seg), **kw)
    _assert_close((out, grads), _reference(q, k, v, rule_mask(pos, crit, seg, **kw), w), TOL[jnp.float32])


@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_triton_interpret_bf16_all_queries(seed):
    """Triton (interpret), bf16, GQA 1, queries == "all" (every query against the compact keys)."""
    rng = np.random.default_rng(seed)
    q, k, v = qkv(jax.random.PRNGKey(seed % 1000), 1, 40, 40, 2, 2, 16, jnp.bfloat16)
    pos, crit, seg = _draw_tokens(rng, 1, 40, fraction=0.3, ragged=True, segments=False)
    crit &= np.cumsum(crit, 1) <= 20
    kw = dict(window=7, num_global=1, queries="all")
    out, grads, w = _triton_case(q, k, v, jnp.asarray(pos), jnp.asarray(crit), None, **kw)
    ref = _reference(q, k, v, rule_mask(pos, crit, np.zeros_like(pos), **kw), w)
    _assert_close((out, grads), ref, TOL[jnp.bfloat16])


def test_nonfinite_keys_reach_only_the_rows_that_see_them():
    """Compact path (reference parts, then the Triton kernels in interpret mode): NaN in the k and v of critical
    token 21 (future for rows 0..20) and inf in the v of a padding slot; rows 0..20 and their gradients are the clean
    ones; critical rows after 21 see it and are NaN."""
    q, k, v = qkv(jax.random.PRNGKey(4), 1, 40, 40, 2, 1, 16, jnp.float32)
    pos = jnp.where(jnp.arange(40) < 32, jnp.arange(40), -1)[None]
    crit = jnp.zeros((1, 40), bool).at[0, jnp.array([3, 21, 25, 30])].set(True)
    bad_k, bad_v = k.at[:, 21].set(jnp.nan), v.at[:, 21].set(jnp.nan).at[:, 35].set(jnp.inf)
    kw = dict(window=4, num_global=1, queries="critical", max_critical=8)
    for extra in ({"backend": "reference"}, {"backend": "triton", "interpret": True, "block": 16, "config": TINY}):

        def loss(q, k, v, extra=extra):
            out = pk.sra_compact_attention(
                q, k, v, q_positions=pos, k_positions=pos, q_critical=crit, k_critical=crit, **kw, **extra
            )
            return jnp.sum(out[:, :21] ** 2), out

        run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        ((_, got), got_grads), ((_, want), want_grads) = run(q, bad_k, bad_v), run(q, k, v)
        np.testing.assert_array_equal(got[:, :21], want[:, :21])
        assert np.isnan(np.asarray(got[:, jnp.array([21, 25, 30])])).all()
        assert np.isfinite(np.asarray(got[:, 26:30])).all()  # not critical, window 4: cannot see 21
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)  # same program on the same finite values
