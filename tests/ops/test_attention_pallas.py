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
