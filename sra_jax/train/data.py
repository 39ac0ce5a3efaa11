"""Deterministic training batches: batch number `step` is a pure function of (config, step), so the data position
saved in a checkpoint is just the step and resuming replays exactly the same stream."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from sra_jax.data import synthetic
from sra_jax.train.config import DataConfig


@dataclasses.dataclass(frozen=True)
class SyntheticStream:
    """The synthetic task as [grad_accum, micro_batch, seq_len] numpy batches (only this process's rows)."""

    data: DataConfig
    batch_size: int
    grad_accum: int = 1

    def __post_init__(self):
        needed = synthetic.max_length(self.data.synthetic, self.data.form)
        if needed > self.data.seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} is too short: {self.data.form!r} problems of this "
                             f"difficulty need up to {needed} tokens")
        if self.batch_size % (self.grad_accum * jax.process_count()):
            raise ValueError(f"batch_size={self.batch_size} must divide evenly into grad_accum={self.grad_accum} "
                             f"micro-batches over {jax.process_count()} processes")

    @property
    def tokenizer(self) -> synthetic.SyntheticTokenizer:
        return synthetic.SyntheticTokenizer()

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch number `step`: problems [step * batch_size, (step + 1) * batch_size) of the training split."""
        micro = self.batch_size // self.grad_accum
        per_process = micro // jax.process_count()
        first = jax.process_index() * per_process
        rows = [
            [step * self.batch_size + a * micro + first + r for r in range(per_process)]
            for a in range(self.grad_accum)
        ]
        batches = [
            synthetic.make_batch([synthetic.make_problem(self.data.synthetic, "train", self.data.seed, i) for i in idx],
                                 self.tokenizer, self.data.seq_len, form=self.data.form)
            for idx in rows
        ]
        return {name: np.stack([getattr(b, name) for b in batches]) for name in ("tokens", "positions", "loss_mask")}

    def eval_batch(self, size: int | None = None, split: synthetic.Split = "test") -> synthetic.SyntheticBatch:
        """The first `size` (default data.eval_size) held-out problems as one batch."""
        problems = synthetic.generate(self.data.synthetic, size or self.data.eval_size, split=split,
                                      seed=self.data.seed)
        return synthetic.make_batch(problems, self.tokenizer, self.data.seq_len, form=self.data.form)
