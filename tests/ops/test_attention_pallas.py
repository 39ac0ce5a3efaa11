"""`attention(impl="pallas")` agrees with the dense reference: the SRA spec becomes a block layout plus the same
token rule (on CPU the kernels' dense reference backend runs; tests/pallas_kernels checks the kernels themselves)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sra_jax.ops.attention import attention
from sra_jax.ops.masks import SRAMaskSpec


def _inputs(seed, b=2, s=40, hq=4, hkv=2, d=16):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (
        jax.random.normal(ks[0], (b, s, hq, d)),
        jax.random.normal(ks[1], (b, s, hkv, d)),
        jax.random.normal(ks[2], (b, s, hkv, d)),
        jax.random.uniform(ks[3], (b, s)) < 0.2,
    )


@pytest.mark.parametrize("queries", ["critical", "all"])
def test_pallas_matches_reference_on_an_sra_spec_with_padding_and_segments(queries):
    q, k, v, critical = _inputs(0)
    b, s = critical.shape
    positions = jnp.broadcast_to(jnp.where(jnp.arange(s) < 35, jnp.arange(s), -1), (b, s))
    segments = jnp.broadcast_to((jnp.arange(s) >= 17).astype(jnp.int32), (b, s))
    spec = SRAMaskSpec.create(
        positions, critical, window=6, num_global=2, queries=queries, segment_ids=segments
    )
    got = jax.jit(lambda q, k, v, spec: attention(q, k, v, spec=spec, impl="pallas"))(q, k, v, spec)
    want = attention(q, k, v, spec=spec, impl="reference")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)  # both f32: summation order only


def test_pallas_is_causal_by_index_without_spec_or_mask():
    q, k, v, _ = _inputs(1)
    np.testing.assert_allclose(
        jax.jit(lambda q, k, v: attention(q, k, v, impl="pallas"))(q, k, v),
        attention(q, k, v, impl="reference"),
        atol=1e-5,
        rtol=1e-5,
    )


def test_pallas_takes_a_token_mask():
    q, k, v, _ = _inputs(2)
    mask = jax.random.uniform(jax.random.PRNGKey(3), (2, 40, 40)) < 0.3
    np.testing.assert_allclose(
        jax.jit(lambda q, k, v, mask: attention(q, k, v, mask=mask, impl="pallas"))(q, k, v, mask),
        attention(q, k, v, mask=mask, impl="reference"),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("queries", ["critical", "all"])
def test_pallas_compact_path_matches_reference(queries):
    """The compact path (critical tokens gathered, band + compact parts merged) on a spec with max_critical."""
    from sra_jax.ops.attention_pallas import pallas_attention

    q, k, v, critical = _inputs(4)
    b, s = critical.shape
    positions = jnp.broadcast_to(jnp.where(jnp.arange(s) < 35, jnp.arange(s), -1), (b, s))
    critical = critical & (positions >= 0)
    spec = SRAMaskSpec.create(
        positions, critical, window=6, num_global=2, queries=queries, max_critical=int(critical.sum(1).max())
    )
    # jitted: one compile of the whole path instead of op-by-op eager compiles (~27 s -> ~5 s on CPU)
    got = jax.jit(lambda q, k, v, spec: pallas_attention(q, k, v, spec=spec, compact=True))(q, k, v, spec)
    want = attention(q, k, v, spec=spec, impl="reference")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)  # both f32: summation order only
    with pytest.raises(ValueError, match="max_critical"):
        unbounded = SRAMaskSpec.create(positions, critical, window=6, num_global=2)
        pallas_attention(q, k, v, spec=unbounded, compact=True)


def _scattered_spec(seed, count, queries, s=256, max_critical=None):
    """One row of s tokens, `count` scattered critical tokens, window 4: compact is cheaper at block 16."""
    rng = np.random.default_rng(seed)
    critical = np.zeros((1, s), bool)
    critical[0, rng.choice(s, count, replace=False)] = True
    positions = jnp.arange(s)[None]
    return SRAMaskSpec.create(
        positions, jnp.asarray(critical), window=4, num_global=0, queries=queries, max_critical=max_critical
    )


def test_default_bound_is_counted_and_rounded_up_to_a_compact_bucket(monkeypatch):
    """No max_critical, eager: the counted critical tokens (20) go to the first bucket above them (32), a count
    above every bucket (100) to the plain layout; both agree with the reference."""
    import pallas_kernels
    from sra_jax.ops.attention_pallas import pallas_attention

    assert pallas_kernels.compact_bounds(192, 192, window=4, num_global=0, queries="critical", block=16) == (16, 32, 64)
    seen = []
    real = pallas_kernels.sra_compact_attention
    monkeypatch.setattr(pallas_kernels, "sra_compact_attention", lambda *a, **kw: seen.append(kw["max_critical"])
                        or real(*a, **kw))
    q, k, v, _ = _inputs(5, b=1, s=192, hq=2, hkv=1, d=16)
    for count, bound in ((20, [32]), (100, [])):
        seen.clear()
        spec = _scattered_spec(0, count, "critical", s=192)
        got = pallas_attention(q, k, v, spec=spec, block_q=16, block_k=16)
        assert seen == bound
        np.testing.assert_allclose(got, attention(q, k, v, spec=spec), atol=1e-5, rtol=1e-5)  # f32 order only


def test_default_bound_under_jit_switches_on_the_count_and_is_exact_with_gradients():
    """Under jit the count is not known at trace time: a lax.switch over the buckets and the plain layout runs
    the branch of the counted tokens. Forward and gradients equal the reference's for a bucketed and an
    over-every-bucket count."""
    from sra_jax.ops.attention_pallas import pallas_attention

    q, k, v, _ = _inputs(6, b=1, s=256, hq=2, hkv=1, d=16)
    loss = lambda f: jax.jit(jax.value_and_grad(lambda q, k, v, spec: jnp.sum(f(q, k, v, spec) ** 2), (0, 1, 2)))
    fast = loss(lambda q, k, v, spec: pallas_attention(q, k, v, spec=spec, block_q=16, block_k=16))
    slow = loss(lambda q, k, v, spec: attention(q, k, v, spec=spec))
    for count in (20, 200):
        spec = _scattered_spec(1, count, "all")
        (got, got_grads), (want, want_grads) = fast(q, k, v, spec), slow(q, k, v, spec)
        np.testing.assert_allclose(got, want, rtol=1e-5)  # f32: summation order only
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("queries", ["critical", "all"])
def test_compact_path_takes_cache_slots_with_their_own_positions(queries):
    """Chunked prefill into a cache: 40 key slots, slots 0..23 written earlier, the 12 queries at positions
    24..35 written to slots 24..35, slots 36..39 empty (-1); critical keys in earlier chunks and this one."""
    from sra_jax.ops.attention_pallas import pallas_attention

    q, _, _, _ = _inputs(7, b=2, s=12)
    _, k, v, flags = _inputs(8, b=2, s=40)
    k_positions = jnp.broadcast_to(jnp.where(jnp.arange(40) < 36, jnp.arange(40), -1), (2, 40))
    q_positions = jnp.broadcast_to(jnp.arange(24, 36), (2, 12))
    k_critical = flags & (k_positions >= 0)
    spec = SRAMaskSpec.create(
        q_positions, k_critical[:, 24:36], k_positions=k_positions, k_critical=k_critical, window=3, num_global=2,
        queries=queries, max_critical=int(k_critical.sum(1).max()),
    )
    got = jax.jit(lambda q, k, v, spec: pallas_attention(q, k, v, spec=spec, compact=True))(q, k, v, spec)
    np.testing.assert_allclose(got, attention(q, k, v, spec=spec), atol=1e-5, rtol=1e-5)  # f32 order only
