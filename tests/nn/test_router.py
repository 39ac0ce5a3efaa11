"""Router scoring, the three selection modes, and the decode threshold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sra_jax.config import SRAConfig
from sra_jax.nn import Router, select
from sra_jax.nn.router import decode_threshold

LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=(3, 10)), jnp.float32)
VALID = jnp.ones((3, 10), bool).at[2, :6].set(False)  # row 2: 4 valid tokens (left padding)


@pytest.mark.parametrize("router_hidden", [0, 8])
def test_router_scores_each_token_in_float32_and_reports_its_flops(router_hidden):
    router = Router(16, router_hidden, rngs=nnx.Rngs(0))
    scores = router(jnp.ones((2, 5, 16), jnp.bfloat16))
    assert scores.shape == (2, 5) and scores.dtype == jnp.float32
    want = 2 * 16 * 8 + 4 * 8 if router_hidden else 2 * 16
    assert router.flops_per_token() == want


def test_topk_selects_the_k_highest_valid_scores_deterministically():
    chosen = select(LOGITS, 3, SRAConfig(selection="topk"), valid=VALID)
    order = np.argsort(-np.where(VALID, LOGITS, -np.inf), axis=-1)[:, :3]
    want = np.zeros((3, 10), bool)
    np.put_along_axis(want, order, True, axis=-1)
    np.testing.assert_array_equal(chosen.critical, want)
    np.testing.assert_array_equal(chosen.gate, want.astype(np.float32))
    assert np.all(np.asarray(chosen.log_prob) < 0)


def test_gumbel_topk_without_a_key_is_plain_topk():
    sra = SRAConfig(selection="gumbel_topk")
    np.testing.assert_array_equal(
        select(LOGITS, 3, sra, valid=VALID).critical, select(LOGITS, 3, SRAConfig(selection="topk"), valid=VALID).critical
    )


@pytest.mark.parametrize("hard", [True, False])
def test_gumbel_topk_samples_k_valid_tokens_and_its_gate_matches_the_sample(hard):
    sra = SRAConfig(selection="gumbel_topk", hard=hard, tau=0.5)
    chosen = select(LOGITS, 3, sra, valid=VALID, key=jax.random.key(7))
    np.testing.assert_array_equal(chosen.critical.sum(-1), 3)
    assert not np.asarray(chosen.critical)[~np.asarray(VALID)].any()
    if hard:  # the straight-through forward value is the sampled set itself
        np.testing.assert_array_equal(chosen.gate, chosen.critical.astype(np.float32))
    draws = [select(LOGITS, 3, sra, valid=VALID, key=jax.random.key(s)).critical for s in range(4)]
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])


def test_gumbel_topk_gate_passes_a_gradient_to_the_logits():
    sra = SRAConfig(selection="gumbel_topk", hard=True)
    weights = jnp.arange(10.0)
    grad = jax.grad(lambda x: (select(x, 3, sra, valid=VALID, key=jax.random.key(0)).gate * weights).sum())(LOGITS)
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


def test_sparsemax_selects_within_its_support_and_at_most_k():
    sra = SRAConfig(selection="sparsemax", tau=0.5)
    chosen = select(LOGITS, 3, sra, valid=VALID)
    top3 = select(LOGITS, 3, SRAConfig(selection="topk"), valid=VALID).critical
    assert np.all(np.asarray(chosen.critical) <= np.asarray(top3))
    assert np.all(np.asarray(chosen.critical).sum(-1) >= 1)


def test_decode_threshold_is_the_kth_largest_valid_score():
    threshold = decode_threshold(LOGITS, 3, valid=VALID)
    kth = -np.sort(-np.where(VALID, LOGITS, -np.inf), axis=-1)[:, 2]
    np.testing.assert_array_equal(threshold, kth)
    # fewer valid tokens than k: the lowest valid score; no valid token: nothing ever qualifies
    few = decode_threshold(LOGITS, 6, valid=VALID)
    np.testing.assert_array_equal(few[2], np.asarray(LOGITS)[2, 6:].min())
    assert decode_threshold(LOGITS, 3, valid=jnp.zeros_like(VALID))[0] == np.inf


def test_bernoulli_selects_a_variable_number_of_tokens_up_to_the_cap_with_its_exact_log_prob():
    from sra_jax.ops.selection import bernoulli_log_prob

    sra = SRAConfig(selection="bernoulli", tau=0.5)
    chosen = select(LOGITS, 4, sra, valid=VALID, key=jax.random.key(3))
    counts = np.asarray(chosen.critical).sum(-1)
    assert np.all(counts <= 4) and not np.asarray(chosen.critical)[~np.asarray(VALID)].any()
    np.testing.assert_array_equal(chosen.gate, np.asarray(chosen.critical, np.float32))
    np.testing.assert_allclose(chosen.log_prob, bernoulli_log_prob(LOGITS, chosen.critical, 4, tau=0.5, valid=VALID))
    # without a key: the mode, logit > 0 (capped)
    greedy = select(LOGITS, 10, sra, valid=VALID)
    np.testing.assert_array_equal(greedy.critical, (np.asarray(LOGITS) > 0) & np.asarray(VALID))
    # a traced temperature gives the same result as the config's
    np.testing.assert_array_equal(select(LOGITS, 4, sra, valid=VALID, key=jax.random.key(3), tau=jnp.float32(0.5))
                                  .critical, chosen.critical)


@pytest.mark.parametrize("selection", ["gumbel_topk", "bernoulli"])
def test_a_traced_tau_changes_the_soft_gate_without_retracing(selection):
    sra = SRAConfig(selection=selection, hard=False)
    traces = []

    @jax.jit
    def gate(tau):
        traces.append(tau)
        return select(LOGITS, 3, sra, valid=VALID, key=jax.random.key(5), tau=tau).gate

    cold, hot = gate(jnp.float32(0.3)), gate(jnp.float32(3.0))
    assert len(traces) == 1
    assert np.abs(np.asarray(cold) - np.asarray(hot)).max() > 0.05
    np.testing.assert_allclose(gate(jnp.float32(1.0)), select(LOGITS, 3, sra, valid=VALID, key=jax.random.key(5)).gate,
                               rtol=1e-6)  # default tau = sra.tau = 1
