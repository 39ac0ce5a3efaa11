"""Deterministic training batches: batch number `step` is a pure function of (config, step), so the data position
saved in a checkpoint is just the step and resuming replays exactly the same stream.

Streams: `SyntheticStream` (the built-in multi-hop task), `LonghopStream`, and `TextTaskStream` (GSM8K / MATH jsonl
with Llama 3 tokens, or the user's own jsonl / `datasets` examples with the model's tokenizer).
Unpacked (the default), row g of the stream holds example g alone, right-padded. With `data.pack` row g of the stream
is row g of a `sra_jax.data.packing.PackingPlan`: each epoch's examples (in that epoch's order) packed first-fit into
rows of data.seq_len, whole, with segment ids; batches then also carry "segment_ids" [accum, micro, seq].
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from sra_jax.data import longhop, synthetic
from sra_jax.data.packing import PackingPlan, pack_rows
from sra_jax.train.config import RECORD_TASKS, DataConfig, TrainConfig

# The synthetic task is endless; with data.pack it is packed in chunks of this many problems (its "epochs").
SYNTHETIC_PACK_CHUNK = 1024
BATCH_KEYS = ("tokens", "positions", "loss_mask")


def stream_rows(step: int, batch_size: int, grad_accum: int) -> list[list[int]]:
    """Stream row numbers of batch `step` that this process feeds, as [micro-batch][row]: rows
    [step * batch_size, (step + 1) * batch_size) split into `grad_accum` micro-batches, each split evenly (in order)
    over the processes."""
    micro = batch_size // grad_accum
    per_process = micro // jax.process_count()
    first = jax.process_index() * per_process
    return [[step * batch_size + a * micro + first + r for r in range(per_process)] for a in range(grad_accum)]


class SyntheticExample(NamedTuple):
    """One synthetic problem as `bos question sep target eos` ids, with the loss on target and eos."""

    tokens: np.ndarray
    loss_mask: np.ndarray


def _packing_summary(plan: PackingPlan, lengths: np.ndarray, seq_len: int, unit: str) -> str:
    rows = plan.epoch_start(1)
    return (f"packed: {unit} 0 fills {rows} rows of {seq_len} ({lengths.sum() / (rows * seq_len):.1%} real tokens; "
            f"one example per row would give {lengths.mean() / seq_len:.1%})")


def _packed_batch(rows: list[list[list]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """[micro-batch][row][examples] -> arrays [accum, micro, seq] with segment_ids."""
    micro = [pack_rows(r, seq_len, pad_id=pad_id) for r in rows]
    return {name: np.stack([m[name] for m in micro]) for name in (*BATCH_KEYS, "segment_ids")}


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

    def example(self, index: int) -> SyntheticExample:
        """Training problem `index` as `bos question sep target eos` with the loss on target and eos."""
        problem = synthetic.make_problem(self.data.synthetic, "train", self.data.seed, index)
        prompt = self.tokenizer.prompt_ids(problem)
        target = self.tokenizer.encode(problem.target(self.data.form)) + [self.tokenizer.eos_id]
        loss_mask = np.zeros(len(prompt) + len(target), bool)
        loss_mask[len(prompt):] = True
        return SyntheticExample(np.asarray(prompt + target, np.int32), loss_mask)

    @functools.cached_property
    def packing(self) -> PackingPlan | None:
        """With data.pack: the plan over chunks of SYNTHETIC_PACK_CHUNK consecutive problems (chunk c = problems
        [c * chunk, (c + 1) * chunk), packed first-fit in index order); None otherwise."""
        if not self.data.pack:
            return None

        def chunk(c: int) -> tuple[np.ndarray, np.ndarray]:
            ids = np.arange(c * SYNTHETIC_PACK_CHUNK, (c + 1) * SYNTHETIC_PACK_CHUNK)
            return ids, np.array([len(self.example(int(i)).tokens) for i in ids])

        return PackingPlan(chunk, self.data.seq_len, max_items=self.data.max_segments)

    def describe(self) -> str:
        """One line for the run's log: what a row holds and, packed, how full rows are."""
        head = f"data: synthetic {self.data.form!r} problems (train split, seed {self.data.seed})"
        if self.packing is None:
            return f"{head}, one per row of {self.data.seq_len}"
        lengths = np.array([len(self.example(int(i)).tokens) for i in range(SYNTHETIC_PACK_CHUNK)])
        return f"{head}, {_packing_summary(self.packing, lengths, self.data.seq_len, 'chunk')}"

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch number `step`: problems [step * batch_size, (step + 1) * batch_size) of the training split, one per
        row; with data.pack, packed rows [step * batch_size, (step + 1) * batch_size) of `packing`."""
        rows = stream_rows(step, self.batch_size, self.grad_accum)
        if self.packing is not None:
            return _packed_batch([[[self.example(int(i)) for i in self.packing.row(r)] for r in micro]
                                  for micro in rows], self.data.seq_len, self.tokenizer.pad_id)
        batches = [
            synthetic.make_batch([synthetic.make_problem(self.data.synthetic, "train", self.data.seed, i) for i in idx],
                                 self.tokenizer, self.data.seq_len, form=self.data.form)
            for idx in rows
        ]
        return {name: np.stack([getattr(b, name) for b in batches]) for name in BATCH_KEYS}

    def eval_batch(self, size: int | None = None, split: synthetic.Split = "test") -> synthetic.SyntheticBatch:
        """The first `size` (default data.eval_size) held-out problems as one batch."""
        problems = synthetic.generate(self.data.synthetic, size or self.data.eval_size, split=split,
                                      seed=self.data.seed)
        return synthetic.make_batch(problems, self.tokenizer, self.data.seq_len, form=self.data.form)


@dataclasses.dataclass(frozen=True)
class LonghopStream:
    """The longhop task (sra_jax.data.longhop) as [grad_accum, micro_batch, seq_len] numpy batches: stream row g is
    train problem g of data.seed, one per row, right-padded."""

    data: DataConfig
    batch_size: int
    grad_accum: int = 1

    def __post_init__(self):
        needed = longhop.sequence_length(self.data.longhop, self.data.form)
        if needed > self.data.seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} is too short: {self.data.form!r} longhop problems "
                             f"need {needed} tokens")
        if self.batch_size % (self.grad_accum * jax.process_count()):
            raise ValueError(f"batch_size={self.batch_size} must divide evenly into grad_accum={self.grad_accum} "
                             f"micro-batches over {jax.process_count()} processes")

    @property
    def tokenizer(self) -> longhop.LonghopTokenizer:
        return longhop.LonghopTokenizer(self.data.longhop)

    def describe(self) -> str:
        cfg = self.data.longhop
        return (f"data: longhop {self.data.form!r} problems (train split, seed {self.data.seed}), "
                f"{cfg.context_len}-token contexts, {cfg.min_hops}-{cfg.max_hops} hops, one per row of {self.data.seq_len}")

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch number `step`: train problems [step * batch_size, (step + 1) * batch_size), one per row."""
        batches = [self.rows(idx) for idx in stream_rows(step, self.batch_size, self.grad_accum)]
        return {name: np.stack([getattr(b, name) for b in batches]) for name in BATCH_KEYS}

    def rows(self, indices: list[int], split: str = "train") -> longhop.LonghopBatch:
        examples = [longhop.make_example(self.data.longhop, split, self.data.seed, i) for i in indices]
        return longhop.make_batch(examples, self.data.longhop, self.data.seq_len, self.data.form)

    def eval_batch(self, size: int | None = None, split: str = "test") -> longhop.LonghopBatch:
        """The first `size` (default data.eval_size) problems of `split`, padded to that split's own length."""
        cfg = self.data.longhop
        examples = longhop.generate(cfg, size or self.data.eval_size, split=split, seed=self.data.seed)
        seq_len = max(self.data.seq_len, longhop.sequence_length(cfg, self.data.form, split))
        return longhop.make_batch(examples, cfg, seq_len, self.data.form)


def default_data_dir() -> Path:
    """`$SRA_JAX_DATA`, else `../shared/data` beside the checkout (folders gsm8k/, math/, llama3/)."""
    return Path(os.environ.get("SRA_JAX_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


@functools.lru_cache(maxsize=2)
def _tokenized_train_split(root: str, task: str, form: str):
    """(tokenizer, every train example tokenised), computed once per process for a (data folder, task, form)."""
    from sra_jax.data import datasets as task_data
    from sra_jax.data.tokenizer import Llama3Tokenizer

    tokenizer = Llama3Tokenizer(Path(root) / "llama3" / "tokenizer.model")
    cot = form == "cot"
    examples = tuple(
        task_data.tokenize_example(tokenizer, task_data.format_prompt(task, row["question"], cot=cot),
                                   task_data.format_target(task, row, cot=cot))
        for row in task_data.load_task(task, Path(root) / task, "train")
    )
    return tokenizer, examples


def load_records(data: DataConfig) -> list:
    """The `sra_jax.data.records.Record`s of data.task "jsonl" / "datasets"."""
    from sra_jax.data import records

    fields = records.Fields(prompt=data.prompt_field, answer=data.answer_field, messages=data.messages_field)
    if data.task == "jsonl":
        return records.read_jsonl(data.path, fields)
    if data.task == "datasets":
        return records.load_dataset_records(data.path, name=data.name, split=data.split, data_files=data.data_files,
                                            fields=fields)
    raise ValueError(f"data.task={data.task!r} has no records (only {', '.join(RECORD_TASKS)})")


def record_examples(data: DataConfig, tokenizer) -> list:
    """The examples of data.task "jsonl" / "datasets" (sra_jax.data.records), tokenised with `tokenizer`."""
    from sra_jax.data import records

    return [records.tokenize_record(row, tokenizer, chat=data.chat) for row in load_records(data)]


def train_tokenizer(config: TrainConfig):
    """The tokenizer of data.task "jsonl" / "datasets": data.tokenizer, else the one of the init.from model
    (`sra_jax.data.text_tokenizer.model_tokenizer`)."""
    from sra_jax.data.text_tokenizer import load_tokenizer, model_tokenizer

    if config.data.tokenizer:
        return load_tokenizer(config.data.tokenizer)
    found = model_tokenizer(config.init.from_) if config.init.from_ else None
    if found is None:
        where = f" and init.from={config.init.from_!r} has none beside it" if config.init.from_ else ""
        raise ValueError(f"data.task={config.data.task!r} needs a tokenizer: data.tokenizer is null{where}; set "
                         f"data.tokenizer to a tokenizer.json / tokenizer.model (or a folder or hf://org/name "
                         f"holding one)")
    return load_tokenizer(found)


class TextTaskStream:
    """The GSM8K / MATH train split, or the user's jsonl / `datasets` examples (data.task "jsonl" / "datasets",
    tokenised with `tokenizer`, see `record_examples`), as [grad_accum, micro_batch, seq_len] numpy batches (only
    this process's rows).

    Each example is `<bos>Question: q\nAnswer: target<eos>` (MATH: Problem / Solution), tokenised with the Llama 3
    tokenizer; the loss mask covers the target (the worked solution ending in its answer when data.form is "cot",
    the answer alone when "direct") and the eos. Unpacked, each row holds one example, right-padded (positions -1);
    with data.pack, rows hold whole examples packed first-fit with segment ids (positions restart per example), which
    the train step passes to the model so examples never attend to each other. Examples longer than data.seq_len are
    left out (`skipped` counts them).

    Example number g of the stream is row g % N of the permutation seeded by (data.seed, g // N) over the N kept
    examples, and batch `step` holds examples [step * batch_size, (step + 1) * batch_size): a pure function of
    (config, step), so the checkpoint's data position is the step, exactly as for `SyntheticStream`. Packed, batch
    `step` holds rows [step * batch_size, (step + 1) * batch_size) of `packing`: epoch e's permutation packed first-fit.
    """

    def __init__(self, data: DataConfig, batch_size: int, grad_accum: int = 1, tokenizer=None):
        if data.task not in ("gsm8k", "math", *RECORD_TASKS):
            raise ValueError(f"TextTaskStream reads data.task 'gsm8k', 'math', 'jsonl' or 'datasets', got {data.task!r}")
        if batch_size % (grad_accum * jax.process_count()):
            raise ValueError(f"batch_size={batch_size} must divide evenly into grad_accum={grad_accum} "
                             f"micro-batches over {jax.process_count()} processes")
        self.data, self.batch_size, self.grad_accum = data, batch_size, grad_accum
        if data.task in RECORD_TASKS:
            if tokenizer is None:
                raise ValueError(f"data.task={data.task!r} needs the model's tokenizer (see train_tokenizer)")
            self.tokenizer, examples = tokenizer, record_examples(data, tokenizer)
        else:
            root = Path(data.path) if data.path else default_data_dir()
            folder, tokenizer_file = root / data.task, root / "llama3" / "tokenizer.model"
            for needed in (folder, tokenizer_file):
                if not needed.exists():
                    raise FileNotFoundError(f"data.path: {needed} not found (data.path names the folder holding "
                                            f"{data.task}/ and llama3/tokenizer.model; default $SRA_JAX_DATA or "
                                            f"../shared/data)")
            self.tokenizer, examples = _tokenized_train_split(str(root.resolve()), data.task, data.form)
        self.source_index = [i for i, e in enumerate(examples) if len(e.tokens) <= data.seq_len]
        self.examples = [examples[i] for i in self.source_index]
        self.skipped = len(examples) - len(self.examples)
        self._order: tuple[int, np.ndarray] | None = None
        if not self.examples:
            shortest = min(len(e.tokens) for e in examples)
            raise ValueError(f"data.seq_len={data.seq_len}: no {data.task} example fits (the shortest needs "
                             f"{shortest} tokens)")

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.data.seed, epoch]).permutation(len(self.examples)))
        return self._order[1]

    @functools.cached_property
    def packing(self) -> PackingPlan | None:
        """With data.pack: epoch e's kept examples in the order of its permutation, packed first-fit into rows of
        data.seq_len (item ids index `examples`); None otherwise."""
        if not self.data.pack:
            return None
        lengths = np.array([len(e.tokens) for e in self.examples])

        def epoch(e: int) -> tuple[np.ndarray, np.ndarray]:
            order = np.random.default_rng([self.data.seed, e]).permutation(len(self.examples))
            return order, lengths[order]

        return PackingPlan(epoch, self.data.seq_len, max_items=self.data.max_segments)

    def describe(self) -> str:
        """One line for the run's log: examples kept / left out and, packed, how full rows are."""
        what = self.data.path if self.data.task in RECORD_TASKS else "train"
        head = (f"data: {self.data.task} {what}, {len(self.examples)} examples of <= {self.data.seq_len} tokens "
                f"({self.skipped} longer ones left out)")
        if self.packing is None:
            return f"{head}, one per row"
        lengths = np.array([len(e.tokens) for e in self.examples])
        return f"{head}, {_packing_summary(self.packing, lengths, self.data.seq_len, 'epoch')}"

    def example_index(self, g: int) -> int:
        """Index into `examples` of stream example number `g`."""
        epoch, offset = divmod(g, len(self.examples))
        return int(self._epoch_order(epoch)[offset])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch number `step` (see the class docstring): tokens, positions, loss_mask (and segment_ids when packed)
        of shape [accum, micro, seq]."""
        from sra_jax.data.datasets import pad_batch

        rows = stream_rows(step, self.batch_size, self.grad_accum)
        if self.packing is not None:
            return _packed_batch([[[self.examples[int(i)] for i in self.packing.row(r)] for r in micro]
                                  for micro in rows], self.data.seq_len, self.tokenizer.pad_id)
        batches = [pad_batch([self.examples[self.example_index(g)] for g in micro], len(micro), self.data.seq_len,
                             pad_id=self.tokenizer.pad_id) for micro in rows]
        return {name: np.stack([getattr(b, name) for b in batches]) for name in BATCH_KEYS}


def make_stream(config: TrainConfig) -> SyntheticStream | LonghopStream | TextTaskStream:
    """The training stream of `config.data.task`."""
    if config.data.task == "synthetic":
        return SyntheticStream(config.data, config.batch_size, config.grad_accum)
    if config.data.task == "longhop":
        return LonghopStream(config.data, config.batch_size, config.grad_accum)
    tokenizer = train_tokenizer(config) if config.data.task in RECORD_TASKS else None
    stream = TextTaskStream(config.data, config.batch_size, config.grad_accum, tokenizer)
    if config.model.vocab_size < stream.tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                         f"{stream.tokenizer.vocab_size}")
    return stream
