"""Sequence packing: several whole examples per fixed-length row, told apart by segment ids.

`first_fit` plans one epoch: each example, in the epoch's (shuffled) order, goes into the first row that still has
room for it (examples are never split). `PackingPlan` chains the per-epoch plans into one endless, numbered sequence
of rows, so row number r is a pure function of (the epochs' orders and lengths, r): a training batch built from rows
[step * batch, (step + 1) * batch) is a pure function of the step, which is all a checkpoint needs to resume exactly.
`pack_rows` lays the rows out: positions restart at 0 in every segment, segment ids are 1, 2, ... within a row and
0 on the padding tail (positions -1 there).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from jaxtyping import Bool, Int


@runtime_checkable
class Example(Protocol):
    """What packing needs of an example (`datasets.TokenizedExample` is one)."""

    tokens: Int[np.ndarray, " n"]
    loss_mask: Bool[np.ndarray, " n"]


def first_fit(lengths: Int[np.ndarray, " n"], capacity: int, max_items: int | None = None
              ) -> list[Int[np.ndarray, " k"]]:
    """First-fit bin packing in the given order: item i goes into the lowest-numbered row whose free space is
    >= lengths[i] (a new row when none has room). Returns the rows as arrays of item indices, each in item order.
    `max_items`: a row holding this many items is closed (no free space for later items); None: no limit.

    O(n log n): a max segment tree over the free space of n potential rows (unopened rows are full-capacity, and they
    all come after the opened ones, so "the first row with room" is also the right new row when none has room)."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {lengths.shape}")
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items={max_items} must be None or >= 1")
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        bad = int(np.flatnonzero((lengths < 1) | (lengths > capacity))[0])
        raise ValueError(f"item {bad} has length {int(lengths[bad])}; every length must lie in "
                         f"[1, capacity={capacity}]")
    n = int(lengths.size)
    if n == 0:
        return []
    size = 1 << (n - 1).bit_length()
    tree = [0] * (2 * size)  # tree[size + j] = free space of row j; inner nodes hold the max of their children
    for j in range(n):
        tree[size + j] = capacity
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    row_of = np.empty(n, np.int64)
    held = [0] * n
    for i, length in enumerate(lengths.tolist()):
        node = 1
        while node < size:  # descend to the leftmost leaf with room (the root always has room: n rows suffice)
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        row_of[i] = node - size
        held[node - size] += 1
        tree[node] = 0 if held[node - size] == max_items else tree[node] - length
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    order = np.argsort(row_of, kind="stable")  # stable: items keep their order within a row
    bounds = np.flatnonzero(np.diff(row_of[order])) + 1
    return np.split(order, bounds)


class PackingPlan:
    """Endless numbered rows: epoch e's items, packed by `first_fit`, follow epoch e - 1's rows.

    `epoch_items(e)` returns (item ids in visiting order, their lengths). Plans are computed once per epoch, in
    order (row r of epoch e needs the row counts of epochs < e), and the last `keep` epochs' plans are cached.
    """

    def __init__(self, epoch_items: Callable[[int], tuple[np.ndarray, np.ndarray]], capacity: int, *, keep: int = 2,
                 max_items: int | None = None):
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        self.epoch_items, self.capacity, self.max_items = epoch_items, capacity, max_items
        self._starts = [0]  # _starts[e] = global index of epoch e's first row (known for planned epochs + 1)
        self._plans: collections.OrderedDict[int, list[np.ndarray]] = collections.OrderedDict()
        self._keep = keep

    def epoch_rows(self, epoch: int) -> list[np.ndarray]:
        """Epoch `epoch`'s rows as arrays of item ids (the ids `epoch_items` returned, not their positions)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        if epoch in self._plans:
            self._plans.move_to_end(epoch)
            return self._plans[epoch]
        ids, lengths = (np.asarray(x) for x in self.epoch_items(epoch))
        if ids.shape != lengths.shape or ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"epoch {epoch}: epoch_items must return two equal, non-empty 1-d arrays, got shapes "
                             f"{ids.shape} and {lengths.shape}")
        rows = [ids[r] for r in first_fit(lengths, self.capacity, self.max_items)]
        if epoch == len(self._starts) - 1:
            self._starts.append(self._starts[-1] + len(rows))
        self._plans[epoch] = rows
        while len(self._plans) > self._keep:
            self._plans.popitem(last=False)
        return rows

    def epoch_start(self, epoch: int) -> int:
        """Global number of epoch `epoch`'s first row (plans the epochs before it if needed)."""
        while len(self._starts) <= epoch:
            self.epoch_rows(len(self._starts) - 1)
        return self._starts[epoch]

    def locate(self, row: int) -> tuple[int, int]:
        """(epoch, row within the epoch) of global row `row`."""
        if row < 0:
            raise ValueError(f"row={row} must be >= 0")
        while self._starts[-1] <= row:
            self.epoch_rows(len(self._starts) - 1)
        epoch = int(np.searchsorted(self._starts, row, side="right")) - 1
        return epoch, row - self._starts[epoch]

    def row(self, row: int) -> np.ndarray:
        """The item ids packed into global row `row`, in order."""
        epoch, local = self.locate(row)
        return self.epoch_rows(epoch)[local]


def pack_rows(rows: Sequence[Sequence[Example]], seq_len: int, *, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Lay out packed rows as arrays [len(rows), seq_len]: tokens, positions (0.. per segment, -1 on padding),
    segment_ids (1.. per example within a row, 0 on padding) and loss_mask (the examples' masks, except that a
    segment's first token never carries loss: nothing in its own segment predicts it)."""
    tokens = np.full((len(rows), seq_len), pad_id, np.int32)
    positions = np.full((len(rows), seq_len), -1, np.int32)
    segment_ids = np.zeros((len(rows), seq_len), np.int32)
    loss_mask = np.zeros((len(rows), seq_len), bool)
    for r, examples in enumerate(rows):
        offset = 0
        for segment, example in enumerate(examples, start=1):
            n = len(example.tokens)
            if offset + n > seq_len:
                raise ValueError(f"row {r}: examples of {[len(e.tokens) for e in examples]} tokens exceed "
                                 f"seq_len={seq_len}")
            tokens[r, offset:offset + n] = example.tokens
            positions[r, offset:offset + n] = np.arange(n)
            segment_ids[r, offset:offset + n] = segment
            loss_mask[r, offset:offset + n] = example.loss_mask
            loss_mask[r, offset] = False
            offset += n
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "loss_mask": loss_mask}


def real_token_fraction(positions: Int[np.ndarray, "*b s"]) -> float:
    """Fraction of a batch's slots that hold real tokens (position >= 0)."""
    positions = np.asarray(positions)
    return float((positions >= 0).sum() / max(positions.size, 1))
