"""sra_jax.data.packing: first-fit plans, the endless numbered rows over epochs, and the packed layout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sra_jax.data.packing import PackingPlan, first_fit, pack_rows, real_token_fraction


def naive_first_fit(lengths, capacity):
    """The textbook O(n * rows) first-fit, to check the segment-tree one against."""
    free, rows = [], []
    for i, n in enumerate(lengths):
        j = next((j for j, f in enumerate(free) if f >= n), None)
        if j is None:
            free.append(capacity)
            rows.append([])
            j = len(free) - 1
        free[j] -= n
        rows[j].append(i)
    return rows


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40).flatmap(lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=60))))
def test_first_fit_equals_the_textbook_algorithm_and_covers_every_item_once(case):
    capacity, lengths = case
    rows = first_fit(np.array(lengths, np.int64), capacity)
    assert [r.tolist() for r in rows] == naive_first_fit(lengths, capacity)
    flat = np.concatenate(rows) if rows else np.array([], np.int64)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every item exactly once
    assert all(np.array(lengths)[r].sum() <= capacity for r in rows)
    assert all(np.all(np.diff(r) > 0) for r in rows)  # items keep their order within a row


def test_first_fit_rejects_items_that_cannot_fit():
    with pytest.raises(ValueError, match="item 1 has length 9; every length must lie in \\[1, capacity=8\\]"):
        first_fit(np.array([3, 9, 2]), 8)
    with pytest.raises(ValueError, match="item 0 has length 0"):
        first_fit(np.array([0]), 8)
    with pytest.raises(ValueError, match="capacity=0"):
        first_fit(np.array([1]), 0)
    assert first_fit(np.array([], np.int64), 4) == []


def _epochs(n=50, capacity=16, seed=3):
    lengths = np.random.default_rng(seed).integers(1, capacity + 1, n)
    calls = []

    def epoch_items(e):
        calls.append(e)
        order = np.random.default_rng([seed, e]).permutation(n)
        return order, lengths[order]

    return epoch_items, lengths, calls


def test_plan_rows_cover_every_item_once_per_epoch_and_are_a_pure_function_of_the_row_number():
    epoch_items, lengths, calls = _epochs()
    plan = PackingPlan(epoch_items, 16)
    starts = [plan.epoch_start(e) for e in range(4)]
    for e in range(3):
        rows = [plan.row(r) for r in range(starts[e], starts[e + 1])]
        assert sorted(np.concatenate(rows).tolist()) == list(range(len(lengths)))
        assert all(lengths[r].sum() <= 16 for r in rows)
        assert plan.locate(starts[e]) == (e, 0)
    assert [r.tolist() for r in plan.epoch_rows(0)] != [r.tolist() for r in plan.epoch_rows(1)]  # reshuffled
    # A fresh plan asked for a late row first gives the same rows (no hidden iterator state).
    fresh = PackingPlan(_epochs()[0], 16, keep=1)
    late = starts[3] + 2
    assert fresh.row(late).tolist() == plan.row(late).tolist()
    assert all(fresh.row(r).tolist() == plan.row(r).tolist() for r in (0, 5, starts[1], starts[2] - 1))
    calls.clear()
    plan.row(starts[2])
    plan.row(starts[2] + 1)
    assert calls.count(2) <= 1  # a cached epoch is not planned again
    with pytest.raises(ValueError, match="row=-1"):
        plan.row(-1)


def test_pack_rows_restarts_positions_numbers_segments_and_pads_with_segment_0():
    class Ex:
        def __init__(self, tokens, loss):
            self.tokens, self.loss_mask = np.array(tokens), np.array(loss, bool)

    a, b, c = Ex([1, 2, 3], [0, 1, 1]), Ex([4, 5], [1, 1]), Ex([6, 7, 8, 9], [0, 0, 1, 1])
    out = pack_rows([[a, b], [c]], 6, pad_id=0)
    np.testing.assert_array_equal(out["tokens"], [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 0, 1, -1], [0, 1, 2, 3, -1, -1]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    # b's first token loses its loss: it would be predicted from a's last token, across the segment boundary.
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]])
    assert real_token_fraction(out["positions"]) == pytest.approx(9 / 12)
    with pytest.raises(ValueError, match="row 0: examples of \\[3, 4\\] tokens exceed seq_len=6"):
        pack_rows([[a, c]], 6)
