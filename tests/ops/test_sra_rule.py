"""`SRARule`: the static key rule an `SRAMaskSpec` carries, its validation, and its conversion to the kernels'
`MaskRule` (the rule the block-sparse kernels evaluate is the one the spec describes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.block_sparse.token_mask import make_rule_and_tokens, token_mask
from sra_jax.ops.attention_pallas import kernel_rule
from sra_jax.ops.masks import SRAMaskSpec, SRARule

RNG = np.random.default_rng(0)
POSITIONS = jnp.asarray(np.tile(np.arange(12), (2, 1)), jnp.int32).at[1, 9:].set(-1)
CRITICAL = jnp.asarray(RNG.random((2, 12)) < 0.3)
SEGMENTS = jnp.asarray(np.repeat([[0] * 5 + [1] * 7], 2, 0), jnp.int32)


def test_a_rule_is_one_static_hashable_value_carried_by_the_spec():
    rule = SRARule(window=3, num_global=1, queries="all", max_critical=4)
    spec = SRAMaskSpec.create(POSITIONS, CRITICAL, rule=rule)
    assert spec.rule is rule and hash(rule) == hash(SRARule(3, 1, "all", 4))
    assert (spec.window, spec.num_global, spec.queries, spec.max_critical) == (3, 1, "all", 4)
    leaves, treedef = jax.tree.flatten(spec)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)  # the rule is static, never a leaf
    assert jax.tree.unflatten(treedef, leaves).rule == rule


def test_the_keyword_form_builds_the_same_spec_as_the_rule_form():
    by_keywords = SRAMaskSpec.create(POSITIONS, CRITICAL, window=3, num_global=1, max_critical=4)
    by_rule = SRAMaskSpec.create(POSITIONS, CRITICAL, rule=SRARule(3, 1, "critical", 4))
    assert by_keywords.rule == by_rule.rule
    np.testing.assert_array_equal(by_keywords.to_mask(), by_rule.to_mask())
    with pytest.raises(ValueError, match="not both"):
        SRAMaskSpec.create(POSITIONS, CRITICAL, rule=by_rule.rule, window=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(window=0), "window"),
        (dict(window=2, num_global=-1), "num_global"),
        (dict(window=2, queries="some"), "queries"),
        (dict(window=2, max_critical=-1), "max_critical"),
    ],
)
def test_a_bad_rule_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SRARule(**fields)


@pytest.mark.parametrize("queries", ["critical", "all"])
@pytest.mark.parametrize("segments", [False, True])
def test_the_kernel_rule_is_the_rule_the_spec_describes(queries, segments):
    """`kernel_rule(spec)` equals the MaskRule the kernels build from the arguments the spec is passed as, and
    evaluating it on the spec's tokens gives the spec's own mask."""
    segment_ids = SEGMENTS if segments else None
    spec = SRAMaskSpec.create(POSITIONS, CRITICAL, rule=SRARule(3, 2, queries), segment_ids=segment_ids)
    rule = kernel_rule(spec)
    assert isinstance(rule, pallas_kernels.MaskRule)
    q = jnp.zeros((2, 12, 1, 16))
    built, tokens = make_rule_and_tokens(
        q, q, causal=True, window=spec.window, num_global=spec.num_global, q_positions=spec.q_positions,
        k_positions=spec.k_positions, segment_ids=spec.q_segment_ids, k_segment_ids=spec.k_segment_ids,
        q_critical=spec.q_critical if rule.has_q_critical else None, k_critical=spec.k_critical,
    )
    assert built == rule
    np.testing.assert_array_equal(token_mask(rule, tokens), spec.to_mask())
