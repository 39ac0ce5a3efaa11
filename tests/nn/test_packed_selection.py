"""Per-segment selection for packed rows (segment_ids, no cache): every example selects sra.num_critical(its length)
of its own tokens, ranked against them only, so a packed row gives each example exactly what it gets alone in a row:
critical sets, straight-through gate, Plackett-Luce log-prob (summed over a row's segments) and the model's outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, make_model, random_tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from sra_jax.config import SRAConfig
from sra_jax.nn import critical_counts, select
from sra_jax.nn.router import forced_selection
from sra_jax.ops.selection import relaxed_topk, topk_log_prob, topk_mask

S = 16


def _sra(selection: str = "gumbel_topk", **kw) -> SRAConfig:
    return SRAConfig(**{**dict(critical_fraction=0.25, window=2, num_global=1, router_hidden=8, tau=0.5),
                        "selection": selection, **kw})


def _pack(lengths_per_row: list[list[int]], n: int = S):
    """segment_ids / positions of rows packed with segments of the given lengths (then padding), and the pieces
    (row, token indices) of every example."""
    segment_ids = np.zeros((len(lengths_per_row), n), np.int32)
    positions = np.full((len(lengths_per_row), n), -1, np.int32)
    pieces = []
    for r, lengths in enumerate(lengths_per_row):
        start = 0
        for g, length in enumerate(lengths, start=1):
            segment_ids[r, start:start + length] = g
            positions[r, start:start + length] = np.arange(length)
            pieces.append((r, np.arange(start, start + length)))
            start += length
    return segment_ids, positions, pieces


@st.composite
def packed_batches(draw):
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        lengths, room = [], S
        while room > 0 and (not lengths or draw(st.booleans())):
            lengths.append(draw(st.integers(1, room)))
            room -= lengths[-1]
        rows.append(lengths)
    return rows, draw(st.integers(0, 2**16)), draw(st.sampled_from([0.1, 0.25, 0.5]))


@settings(max_examples=15, deadline=None)
@given(packed_batches(), st.sampled_from(["topk", "gumbel_topk"]), st.booleans())
def test_router_selects_per_segment_as_each_example_alone(case, selection, with_key):
    rows, seed, fraction = case
    sra = _sra(selection, critical_fraction=fraction, hard=False)
    segment_ids, positions, pieces = _pack(rows)
    valid = jnp.asarray(positions >= 0)
    logits = jnp.asarray(np.random.default_rng(seed).normal(size=segment_ids.shape), jnp.float32)
    key = jax.random.key(seed) if with_key else None
    chosen = select(logits, critical_counts(sra, valid), sra, valid=valid, key=key, k_max=S,
                    segment_ids=jnp.asarray(segment_ids))
    sampled = selection == "gumbel_topk" and with_key
    # The draw's per-token noise is jax.random.gumbel(key, logits.shape): each example alone sees its own slice.
    scores = logits + jax.random.gumbel(key, logits.shape, jnp.float32) if sampled else logits
    want_log_prob = np.zeros(len(rows))
    for r, where in pieces:
        k = sra.num_critical(where.size)
        alone_logits, alone_scores = logits[r, where][None], scores[r, where][None]
        np.testing.assert_array_equal(chosen.critical[r, where], topk_mask(alone_scores, k)[0])
        if sampled:  # soft gate (hard=False): the relaxation of the example's own draw
            np.testing.assert_allclose(chosen.gate[r, where], relaxed_topk(alone_scores, k, tau=0.5)[0], atol=1e-5)
        want_log_prob[r] += float(topk_log_prob(alone_logits, jax.lax.top_k(alone_scores, k)[1])[0])
    assert not np.asarray(chosen.critical)[positions < 0].any()
    np.testing.assert_allclose(chosen.log_prob, want_log_prob, rtol=1e-5, atol=1e-5)  # f32 sums, <= 16 terms
    # A forced set is scored per segment as well (replay of the same sets without a key gives the same log-prob
    # exactly when they were drawn in descending-logit order, i.e. without noise).
    forced = forced_selection(logits, chosen.critical, S, valid=valid, sra=sra, segment_ids=jnp.asarray(segment_ids))
    if not sampled:
        np.testing.assert_allclose(forced.log_prob, chosen.log_prob, rtol=1e-5, atol=1e-5)


def test_one_top_k_over_a_packed_row_would_mix_the_examples():
    """The per-row selection (no segment_ids) gives a packed row a different set: the tests above can fail."""
    sra = _sra("topk")
    segment_ids, positions, _ = _pack([[4, 4, 4, 4]])
    valid = jnp.asarray(positions >= 0)
    logits = jnp.asarray([[9.0, 8, 7, 6, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]])
    per_row = select(logits, critical_counts(sra, valid), sra, valid=valid, k_max=S)
    per_segment = select(logits, critical_counts(sra, valid), sra, valid=valid, k_max=S,
                         segment_ids=jnp.asarray(segment_ids))
    np.testing.assert_array_equal(np.flatnonzero(per_row.critical[0]), [0, 1, 2, 3])
    np.testing.assert_array_equal(np.flatnonzero(per_segment.critical[0]), [0, 4, 8, 12])


@pytest.mark.parametrize("mask", ["dynamic", "static"])
def test_packed_sra_model_gives_each_example_what_it_gets_alone(mask):
    sra = _sra("gumbel_topk", mask=mask)
    model = make_model(sra)
    segment_ids, positions, pieces = _pack([[5, 7, 3], [9, 6]])
    tokens = np.asarray(random_tokens(2, S, seed=1))
    logits, aux = forward(model, jnp.asarray(tokens), jnp.asarray(positions), segment_ids=jnp.asarray(segment_ids))
    alone_tokens = np.zeros((len(pieces), S), np.int32)
    alone_positions = np.full((len(pieces), S), -1, np.int32)
    for i, (r, where) in enumerate(pieces):
        alone_tokens[i, :where.size] = tokens[r, where]
        alone_positions[i, :where.size] = np.arange(where.size)
    alone_logits, alone_aux = forward(model, jnp.asarray(alone_tokens), jnp.asarray(alone_positions))
    log_probs = np.asarray(jax.nn.log_softmax(logits, -1))
    alone_log_probs = np.asarray(jax.nn.log_softmax(alone_logits, -1))
    want_log_prob = np.zeros_like(np.asarray(aux.selection_log_prob))
    for i, (r, where) in enumerate(pieces):
        # f32 on CPU: masked keys get exactly zero weight, so packed and alone differ only by summation order.
        np.testing.assert_allclose(log_probs[r, where], alone_log_probs[i, :where.size], atol=2e-5, rtol=0)
        np.testing.assert_array_equal(aux.critical[:, r, where], alone_aux.critical[:, i, :where.size])
        assert int(aux.critical[0, r, where].sum()) == sra.num_critical(where.size)
        want_log_prob[:, r] += np.asarray(alone_aux.selection_log_prob[:, i])
    np.testing.assert_allclose(aux.selection_log_prob, want_log_prob, rtol=1e-5, atol=1e-5)
    selected = np.asarray(aux.critical).sum(-1) / (positions >= 0).sum(-1)
    np.testing.assert_allclose(aux.selected_fraction, selected, rtol=1e-6)
    # Each segment takes its own num_critical: more than one row budget num_critical(15) = 4 here.
    assert (np.asarray(aux.critical[0]).sum(-1) == [2 + 2 + 1, 3 + 2]).all()


def test_packed_sra_training_draw_takes_each_segments_own_count():
    sra = _sra("gumbel_topk")
    model = make_model(sra)
    segment_ids, positions, pieces = _pack([[5, 7, 3], [9, 6]])
    tokens = random_tokens(2, S, seed=2)
    _, aux = forward(model, tokens, jnp.asarray(positions), segment_ids=jnp.asarray(segment_ids),
                     key=jax.random.key(0))
    for r, where in pieces:
        assert int(aux.critical[0, r, where].sum()) == sra.num_critical(where.size)
    assert np.isfinite(np.asarray(aux.selection_log_prob)).all()


@pytest.mark.parametrize("selection", ["bernoulli", "sparsemax"])
def test_per_segment_selection_refuses_modes_without_a_per_segment_top_k(selection):
    sra = _sra(selection)
    segment_ids, positions, _ = _pack([[5, 7]])
    valid = jnp.asarray(positions >= 0)
    logits = jnp.zeros(segment_ids.shape)
    with pytest.raises(ValueError, match=rf"per-segment selection .* not '{selection}'"):
        select(logits, critical_counts(sra, valid), sra, valid=valid, k_max=S, segment_ids=jnp.asarray(segment_ids))
    with pytest.raises(ValueError, match=rf"not '{selection}'"):
        forced_selection(logits, valid, S, valid=valid, sra=sra, segment_ids=jnp.asarray(segment_ids))
