"""Per-row k in the fixed-k selection modes: a row selects ceil(critical_fraction * its valid tokens), never a share
of the padded length, in the mask, the aux, the log-prob and the decode threshold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kv_cache import left_padded, prefill_and_decode

from sra_jax.config import SRAConfig
from sra_jax.nn import critical_counts, select
from sra_jax.nn.router import decode_threshold
from sra_jax.ops.selection import topk_log_prob

LENGTHS = [3, 7, 12, 16]  # prompt lengths of one left-padded batch of 16 slots (the padded row fractions differ a lot)


def _sra(selection: str, **kw) -> SRAConfig:
    return SRAConfig(**{**dict(critical_fraction=0.25, window=3, num_global=1, router_hidden=8), "selection": selection,
                        **kw})


@settings(max_examples=25, deadline=None)
@given(st.floats(0.01, 1.0), st.integers(1, 40), st.integers(0, 2**16))
def test_critical_counts_is_num_critical_of_each_rows_valid_count(fraction, n, seed):
    sra = SRAConfig(critical_fraction=fraction)
    valid = np.random.default_rng(seed).random((5, n)) < np.linspace(0.0, 1.0, 5)[:, None]
    counts = np.asarray(critical_counts(sra, jnp.asarray(valid)))
    want = [sra.num_critical(int(v)) if v else 0 for v in valid.sum(-1)]
    np.testing.assert_array_equal(counts, want)


def test_critical_counts_rounds_exactly_like_the_config_at_float_edges():
    # 0.1 * 100 = 10.000000000000002 and 0.3 * 10 = 3.0000000000000004 in float64: ceil must still give 10 and 3.
    for fraction, n in [(0.1, 100), (0.3, 10), (0.7, 10), (0.15, 20)]:
        sra = SRAConfig(critical_fraction=fraction)
        assert int(critical_counts(sra, jnp.ones((1, n), bool))[0]) == sra.num_critical(n)


@pytest.mark.parametrize("selection,with_key", [("topk", False), ("gumbel_topk", True), ("gumbel_topk", False),
                                                ("sparsemax", False)])
def test_a_ragged_batch_selects_k_row_of_each_rows_valid_tokens(selection, with_key):
    sra = _sra(selection, tau=0.5)
    model = make_model(sra)
    tokens, positions = left_padded(LENGTHS, total=16, seed=3)
    _, aux = forward(model, tokens, positions, key=jax.random.key(4) if with_key else None)
    valid = np.asarray(positions) >= 0
    k_rows = np.array([sra.num_critical(n) for n in LENGTHS])
    counts = np.asarray(aux.critical).sum(-1)  # [L, b]
    assert not np.asarray(aux.critical)[:, ~valid].any()
    if selection == "sparsemax":  # top-k_row restricted to sparsemax's support: at most k_row, at least 1
        assert np.all((counts >= 1) & (counts <= k_rows))
    else:
        np.testing.assert_array_equal(counts, np.broadcast_to(k_rows, counts.shape))
        np.testing.assert_allclose(aux.selected_fraction, np.broadcast_to(k_rows / np.array(LENGTHS), counts.shape),
                                   rtol=1e-6)
    np.testing.assert_allclose(aux.selected_fraction, counts / np.array(LENGTHS), rtol=1e-6)
    assert np.all(np.isfinite(aux.selection_log_prob)) and np.all(aux.selection_log_prob <= 0)


def _hand_log_prob(scores: np.ndarray, order: np.ndarray) -> float:
    """Plackett-Luce in float64: sum_t log softmax over the items not drawn yet."""
    scores, total = scores.astype(np.float64), 0.0
    remaining = np.ones(len(scores), bool)
    for item in order:
        total += scores[item] - np.log(np.exp(scores[remaining]).sum())
        remaining[item] = False
    return total


def test_topk_log_prob_of_a_ragged_batch_is_the_plackett_luce_prob_of_each_rows_own_k_draws():
    sra = _sra("topk")
    model = make_model(sra)
    tokens, positions = left_padded(LENGTHS, total=16, seed=5)
    _, aux = forward(model, tokens, positions)
    valid = np.asarray(positions) >= 0
    for layer in aux.sra_layers:
        for row, n in enumerate(LENGTHS):
            scores = np.asarray(aux.router_logits[layer, row])[valid[row]]
            order = np.argsort(-scores, kind="stable")[: sra.num_critical(n)]
            np.testing.assert_allclose(aux.selection_log_prob[layer, row], _hand_log_prob(scores, order),
                                       rtol=1e-5, atol=1e-5)


def test_the_old_padded_length_k_would_over_select_short_rows():
    """The regression itself: at fraction 0.25 a 3-token row of a 16-slot batch gets k = 1, not 4."""
    sra = _sra("topk")
    valid = jnp.asarray(np.arange(16)[None, :] >= 16 - np.array(LENGTHS)[:, None])
    np.testing.assert_array_equal(critical_counts(sra, valid), [1, 2, 3, 4])
    assert sra.num_critical(16) == 4


def test_router_select_and_threshold_with_per_row_counts():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 10)), jnp.float32)
    valid = jnp.ones((3, 10), bool).at[1, :6].set(False).at[2].set(False)  # 10, 4, 0 valid tokens
    k_rows = jnp.array([3, 2, 0], jnp.int32)
    chosen = select(logits, k_rows, SRAConfig(selection="topk"), valid=valid, k_max=3)
    np.testing.assert_array_equal(np.asarray(chosen.critical).sum(-1), [3, 2, 0])
    masked = np.where(valid, logits, -np.inf)
    kth = -np.sort(-masked, axis=-1)
    threshold = np.asarray(decode_threshold(logits, k_rows, valid=valid, k_max=3))
    np.testing.assert_array_equal(threshold, [kth[0, 2], kth[1, 1], np.inf])
    # the log-prob counts each row's own draws only (0 for the empty row)
    order = jax.lax.top_k(jnp.where(valid, logits, -jnp.inf), 3)[1]
    np.testing.assert_allclose(chosen.log_prob, topk_log_prob(logits, order, valid=valid, k=k_rows), rtol=1e-6)
    assert float(chosen.log_prob[2]) == 0.0


@pytest.mark.parametrize("selection", ["topk", "gumbel_topk"])
def test_ragged_prefill_sets_each_rows_threshold_from_its_own_k_and_decodes_like_the_full_pass(selection):
    sra = _sra(selection)
    model = make_model(sra)
    tokens, positions = left_padded([7, 9, 12], total=12, seed=7)  # prompts of 3, 5, 8 tokens in slots 0..7; 4 decoded
    got, cache, scores = prefill_and_decode(model, tokens, positions)
    scores, valid = np.asarray(scores), np.asarray(positions) >= 0
    for layer in range(model.config.num_hidden_layers):
        for row in range(3):
            prompt = scores[layer, row, :8][valid[row, :8]]
            n = len(prompt)
            kth = -np.sort(-prompt)[sra.num_critical(n) - 1]
            assert cache.threshold[layer, row] == kth
            np.testing.assert_array_equal(np.asarray(cache.critical)[layer, row, 8:], scores[layer, row, 8:] >= kth)
            assert np.asarray(cache.critical)[layer, row, :8].sum() == sra.num_critical(n)
    want, _ = forward(model, tokens, positions, critical=cache.critical)
    # float32, the same arithmetic over a different key count: rounding only
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=1e-5)


def test_gumbel_router_gradient_flows_on_a_ragged_batch():
    from flax import nnx

    model = make_model(_sra("gumbel_topk", hard=True))
    tokens, positions = left_padded(LENGTHS, total=16, seed=9)

    def loss(model):
        logits, _ = model(tokens, positions, key=jax.random.key(0))
        return (jax.nn.log_softmax(logits) * (positions >= 0)[..., None]).mean()

    grads = nnx.jit(nnx.grad(loss))(model)
    router = [np.asarray(v[...]) for p, v in nnx.to_flat_state(grads) if "router" in p]
    assert router and all(np.all(np.isfinite(g)) and np.abs(g).sum() > 0 for g in router)


def test_forced_sets_of_different_sizes_get_the_log_prob_of_their_own_size():
    """A forced row with fewer critical tokens than the static k counts only its own draws (not extra non-critical
    ones), ordered by the current logits."""
    from sra_jax.nn.router import forced_selection

    logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8)), jnp.float32)
    valid = jnp.ones((2, 8), bool).at[1, :3].set(False)
    critical = jnp.zeros((2, 8), bool).at[0, jnp.array([1, 4, 6])].set(True).at[1, 5].set(True)
    chosen = forced_selection(logits, critical, 3, valid=valid, sra=SRAConfig(selection="topk"))
    for row in range(2):
        members = np.flatnonzero(np.asarray(critical[row]))
        order = members[np.argsort(-np.asarray(logits[row])[members], kind="stable")]
        scores = np.where(np.asarray(valid[row]), np.asarray(logits[row]), -np.inf)
        np.testing.assert_allclose(chosen.log_prob[row], _hand_log_prob(scores, order), rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([0.1, 0.25, 0.5]), st.sampled_from(["topk", "gumbel_topk", "sparsemax"]),
       st.integers(0, 2**16))
def test_select_with_per_row_counts_over_random_ragged_rows(fraction, selection, seed):
    """Any padding pattern (left, right, holes, all padding): exactly k_row valid tokens per row (at most k_row for
    sparsemax), and the log-prob of the fixed-k modes is the Plackett-Luce probability of the row's own draw."""
    rng = np.random.default_rng(seed)
    sra = SRAConfig(critical_fraction=fraction, selection=selection, tau=0.5)
    logits = jnp.asarray(rng.normal(size=(4, 12)), jnp.float32)
    valid = rng.random((4, 12)) < rng.random((4, 1))
    valid[0] = True
    k_rows = critical_counts(sra, jnp.asarray(valid))
    chosen = select(logits, k_rows, sra, valid=jnp.asarray(valid), key=jax.random.key(seed), k_max=sra.num_critical(12))
    counts, k_rows = np.asarray(chosen.critical).sum(-1), np.asarray(k_rows)
    assert not np.asarray(chosen.critical)[~valid].any()
    if selection == "sparsemax":
        assert np.all((counts <= k_rows) & (counts >= np.minimum(k_rows, 1)))
    else:
        np.testing.assert_array_equal(counts, k_rows)
    if selection == "topk":
        for row in range(4):
            scores = np.where(valid[row], np.asarray(logits[row]), -np.inf)
            order = np.argsort(-scores, kind="stable")[: k_rows[row]]
            np.testing.assert_allclose(chosen.log_prob[row], _hand_log_prob(scores, order), rtol=1e-5, atol=1e-6)
