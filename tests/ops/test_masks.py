"""Specs for sra_jax.ops.masks: the SRA rule against a brute-force loop, block layouts, density, pattern masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sra_jax.ops.masks import (
    SRAMaskSpec,
    causal_mask,
    global_mask,
    mask_density,
    random_mask,
    segment_mask,
    sra_mask,
    strided_mask,
    to_block_layout,
    visible_pair_counts,
    window_mask,
)


def brute_force_sra(q_pos, q_crit, k_pos, k_crit, q_seg, k_seg, window, num_global, queries):
    """DESIGN.md's rule, one (i, j) pair at a time."""
    b, num_q, num_k = q_pos.shape[0], q_pos.shape[1], k_pos.shape[1]
    out = np.zeros((b, num_q, num_k), bool)
    for n in range(b):
        for i in range(num_q):
            for j in range(num_k):
                qp, kp = q_pos[n, i], k_pos[n, j]
                if q_seg[n, i] != k_seg[n, j] or not 0 <= kp <= qp:
                    continue
                near, sink = qp - kp < window, kp < num_global
                critical = k_crit[n, j] and (q_crit[n, i] or queries == "all")
                out[n, i, j] = near or sink or critical
    return out


def packed_positions(rng: np.random.Generator, b: int, s: int, max_extra_segments: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Positions restarting at each segment start, with left padding (position -1, its own segment)."""
    positions, segments = np.zeros((b, s), np.int32), np.zeros((b, s), np.int32)
    for n in range(b):
        pad = rng.integers(0, s // 2 + 1)
        starts = np.sort(rng.choice(np.arange(pad + 1, s), size=min(rng.integers(0, max_extra_segments + 1), s - pad - 1), replace=False))
        segment = np.cumsum(np.isin(np.arange(s), starts)) + 1
        segment[:pad] = 0
        for seg_id in np.unique(segment[pad:]):
            where = np.flatnonzero(segment == seg_id)
            positions[n, where] = np.arange(len(where))
        positions[n, :pad] = -1
        segments[n] = segment
    return positions, segments


@st.composite
def sra_cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # A handful of sizes (each new shape compiles every op once), edge cases 1 and 2 included.
    b, s = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 5, 9, 12]))
    positions, segments = packed_positions(rng, b, s)
    return dict(
        positions=positions,
        segments=segments if draw(st.booleans()) else None,
        critical=rng.random((b, s)) < draw(st.sampled_from([0.0, 0.3, 1.0])),
        window=draw(st.integers(1, s + 1)),
        num_global=draw(st.integers(0, 3)),
        queries=draw(st.sampled_from(["critical", "all"])),
    )


@settings(max_examples=25)
@given(sra_cases())
def test_sra_mask_equals_the_brute_force_rule_with_padding_and_segments(case):
    positions, segments, critical = case["positions"], case["segments"], case["critical"]
    seg = segments if segments is not None else np.zeros_like(positions)
    # Without segment ids, padding (position -1) still sees nothing: the rule needs k_pos >= 0.
    expected = brute_force_sra(positions, critical, positions, critical, seg, seg, case["window"], case["num_global"], case["queries"])
    mask = sra_mask(
        jnp.asarray(positions),
        jnp.asarray(critical),
        window=case["window"],
        num_global=case["num_global"],
        queries=case["queries"],
        segment_ids=None if segments is None else jnp.asarray(segments),
    )
    np.testing.assert_array_equal(mask, expected)


@settings(max_examples=25)
@given(sra_cases())
def test_sra_mask_never_leaves_a_valid_row_empty_and_padding_rows_see_nothing(case):
    positions = case["positions"]
    mask = np.asarray(
        sra_mask(jnp.asarray(positions), jnp.asarray(case["critical"]), window=case["window"], num_global=case["num_global"])
    )
    valid = positions >= 0
    assert mask.any(-1)[valid].all()
    assert not mask.any(-1)[~valid].any()
    assert not mask.any(-2)[~valid].any()  # padding keys are never visible either
    # The diagonal (the token itself) is always there for valid tokens.
    assert np.diagonal(mask, axis1=1, axis2=2)[valid].all()


@settings(max_examples=20)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(1, 10), st.integers(0, 4), st.integers(1, 6), st.integers(0, 2))
def test_sra_mask_with_kv_cache_keys_equals_the_brute_force_rule(seed, num_new, num_prefix, num_empty, window, num_global):
    """Queries are the newest tokens; keys are cache slots at their own positions, empty slots at -1."""
    rng = np.random.default_rng(seed)
    total = num_prefix + num_new
    k_pos = np.concatenate([np.arange(total), -np.ones(num_empty, int)])[None].astype(np.int32)
    k_crit = rng.random(k_pos.shape) < 0.4
    q_pos = np.arange(num_prefix, total, dtype=np.int32)[None]
    q_crit = k_crit[:, num_prefix:total]
    zeros_q, zeros_k = np.zeros_like(q_pos), np.zeros_like(k_pos)
    expected = brute_force_sra(q_pos, q_crit, k_pos, k_crit, zeros_q, zeros_k, window, num_global, "critical")
    mask = sra_mask(
        jnp.asarray(q_pos), jnp.asarray(q_crit), window=window, num_global=num_global,
        k_positions=jnp.asarray(k_pos), k_critical=jnp.asarray(k_crit),
    )
    np.testing.assert_array_equal(mask, expected)


def test_spec_is_a_pytree_with_static_rule_fields_and_survives_jit():
    positions = jnp.arange(6)[None]
    spec = SRAMaskSpec.create(positions, positions % 3 == 0, window=2, num_global=1, max_critical=2)
    leaves, treedef = jax.tree_util.tree_flatten(spec)
    assert len(leaves) == 4  # the two None segment ids are empty subtrees
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.window, rebuilt.num_global, rebuilt.max_critical) == (2, 1, 2)
    np.testing.assert_array_equal(jax.jit(lambda s: s.to_mask())(spec), spec.to_mask())


@settings(max_examples=20)
@given(st.integers(0, 2**31 - 1), st.integers(1, 13), st.integers(1, 13), st.integers(1, 5), st.integers(1, 5), st.booleans())
def test_block_layout_is_exactly_the_any_of_each_block_with_ragged_tails(seed, num_q, num_k, block_q, block_k, with_heads):
    rng = np.random.default_rng(seed)
    shape = (2, 3, num_q, num_k) if with_heads else (2, num_q, num_k)
    mask = rng.random(shape) < 0.15
    layout = np.asarray(to_block_layout(jnp.asarray(mask), block_q, block_k))
    assert layout.shape == (*shape[:-2], -(-num_q // block_q), -(-num_k // block_k))
    for index in np.ndindex(*layout.shape):
        *lead, bi, bj = index
        block = mask[(*lead, slice(bi * block_q, (bi + 1) * block_q), slice(bj * block_k, (bj + 1) * block_k))]
        assert layout[index] == block.any()


def test_block_layout_covers_every_allowed_pair_of_an_sra_mask():
    positions = jnp.arange(37)[None]
    mask = np.asarray(sra_mask(positions, positions % 7 == 3, window=4, num_global=2))
    layout = np.asarray(to_block_layout(jnp.asarray(mask), 8, 16))
    i, j = np.nonzero(mask[0])
    assert layout[0, i // 8, j // 16].all()


def test_mask_density_counts_visible_over_causal_pairs():
    positions = jnp.arange(8)[None]
    window = window_mask(positions, 2)  # 8 diagonal + 7 sub-diagonal pairs out of 36 causal ones
    np.testing.assert_allclose(mask_density(window), [15 / 36])
    spec = SRAMaskSpec.create(positions, jnp.zeros((1, 8), bool), window=2, num_global=0)
    np.testing.assert_allclose(spec.density(), [15 / 36])
    np.testing.assert_allclose(mask_density(causal_mask(positions)), [1.0])


def test_pattern_masks_follow_their_definitions():
    positions = jnp.arange(10)[None]
    i, j = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    np.testing.assert_array_equal(causal_mask(positions)[0], j <= i)
    np.testing.assert_array_equal(window_mask(positions, 3)[0], (j <= i) & (i - j < 3))
    np.testing.assert_array_equal(global_mask(positions, 2)[0], (j <= i) & (j < 2))
    np.testing.assert_array_equal(strided_mask(positions, 4)[0], (j <= i) & ((i - j) % 4 == 0))
    segments = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(segment_mask(segments)[0], segments[0][:, None] == segments[0][None, :])
    random = np.asarray(random_mask(jax.random.key(0), positions, 3)[0])
    assert not random[j > i].any()
    np.testing.assert_array_equal(random.sum(-1), np.minimum(np.arange(10) + 1, 3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=0, num_global=0), r"window \(0\) must be an integer >= 1"),
        (dict(window=-3, num_global=0), r"window \(-3\)"),
        (dict(window=2, num_global=-1), r"num_global \(-1\)"),
        (dict(window=2, num_global=0, queries="some"), r"queries \('some'\)"),
        (dict(window=2, num_global=0, k_positions=jnp.zeros((1, 3), jnp.int32)), "without k_critical"),
        (dict(window=2, num_global=0, segment_ids=jnp.zeros((1, 4), jnp.int32), k_positions=jnp.zeros((1, 3), jnp.int32),
              k_critical=jnp.zeros((1, 3), bool)), "segment ids"),
    ],
)
def test_bad_mask_arguments_raise_value_errors_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sra_mask(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), bool), **kwargs)


def test_bad_block_sizes_are_rejected():
    with pytest.raises(ValueError, match=r"block_k \(0\)"):
        to_block_layout(jnp.ones((1, 4, 4), bool), 2, 0)


@settings(deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 5]), st.sampled_from([1, 7, 12]), st.booleans(), st.booleans(),
       st.sampled_from(["critical", "all"]), st.integers(1, 6), st.integers(0, 3))
def test_visible_pair_counts_equal_the_mask_sums(seed, num_q, num_k, packed, cache_layout, queries, window, num_global):
    """Counts from sorted (segment, position) keys equal the [b, q, k] mask sums: padding (negative positions), any
    positions (gaps, duplicates), segments, cache-shaped keys (more slots than queries) and both query modes."""
    rng = np.random.default_rng(seed)
    b = 2
    if cache_layout:  # a cache: keys at slots holding positions 0..n-1 after left padding, queries the last ones
        pad = rng.integers(0, 3, b)
        k_pos = np.array([[p - pad[r] if p >= pad[r] else -1 for p in range(num_k)] for r in range(b)])
        q_pos = k_pos[:, -min(num_q, num_k):]
    else:
        k_pos = rng.integers(-2, 10, (b, num_k))
        q_pos = rng.integers(-2, 10, (b, num_q))
    segments = dict(segment_ids=jnp.asarray(rng.integers(0, 3, q_pos.shape)),
                    k_segment_ids=jnp.asarray(rng.integers(0, 3, k_pos.shape))) if packed else {}
    spec = SRAMaskSpec.create(
        jnp.asarray(q_pos), jnp.asarray(rng.random(q_pos.shape) < 0.4), window=window, num_global=num_global,
        queries=queries, k_positions=jnp.asarray(k_pos), k_critical=jnp.asarray(rng.random(k_pos.shape) < 0.4),
        **segments,
    )
    causal, visible = visible_pair_counts(spec)
    np.testing.assert_array_equal(causal, spec.dense_mask().sum((1, 2)))
    np.testing.assert_array_equal(visible, spec.to_mask().sum((1, 2)))
    self_spec = SRAMaskSpec.create(jnp.asarray(q_pos), spec.q_critical, window=window, num_global=num_global,
                                   queries=queries)  # keys are the queries
    causal, visible = visible_pair_counts(self_spec)
    np.testing.assert_array_equal(causal, self_spec.dense_mask().sum((1, 2)))
    np.testing.assert_array_equal(visible, self_spec.to_mask().sum((1, 2)))


def test_visible_pair_counts_run_when_the_program_runs_even_for_constant_positions():
    """Positions from a shape (arange, a fresh cache's slots) are compile-time constants: the statistics keep their
    sort in the compiled program (XLA would otherwise evaluate it while compiling, in every layer of a prefill), and
    their values are unchanged. Constant key flags too (a dense layer's), so only the barrier keeps the sort."""
    n = 96
    slots = np.arange(n + 8, dtype=np.int32)[None]

    @jax.jit
    def counts(critical):
        spec = SRAMaskSpec.create(jnp.asarray(slots[:, :n]), critical, window=8, num_global=2,
                                  k_positions=jnp.asarray(np.where(slots < n, slots, -1)),
                                  k_critical=jnp.asarray(slots % 5 == 0))
        return visible_pair_counts(spec), spec.dense_mask().sum((1, 2)), spec.to_mask().sum((1, 2))

    critical = jnp.arange(n)[None] % 3 == 0
    compiled = counts.lower(critical).compile()
    assert " sort(" in compiled.as_text()
    (causal, visible), causal_sum, visible_sum = compiled(critical)
    np.testing.assert_array_equal(causal, causal_sum)
    np.testing.assert_array_equal(visible, visible_sum)
