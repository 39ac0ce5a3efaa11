"""GSM8K and MATH: loading (local jsonl or the hub), few-shot prompts, tokenisation, padding or packing into
fixed-shape batches with loss masks, and a deterministic, resumable batch iterator.

Both tasks load into one schema: `question`, `solution` (worked solution) and `answer` (the final answer).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from jaxtyping import Bool, Int

from sra_jax.data.grading import extract_gsm8k_answer
from sra_jax.extras import require

datasets = require("datasets", "data", needed_by="GSM8K / MATH loading (sra_jax.data.datasets)")

_HUB = {"gsm8k": ("openai/gsm8k", "main"), "math": ("HuggingFaceH4/MATH-500", None)}
_CALCULATOR_RE = re.compile(r"<<[^>]*>>")


def load_task(task: str, source: str | Path, split: str = "test") -> datasets.Dataset:
    """Load `task` as a Dataset with columns question, solution, answer (plus the source's extra columns).

    `source` is a jsonl file, or a folder holding `{split}.jsonl` (GSM8K) or `*{split}*.jsonl` (MATH), or
    `"hub"` (openai/gsm8k, HuggingFaceH4/MATH-500) or `"hub:NAME"`: the hub needs the network, so it is never
    reached by accident through a mistyped path."""
    _check_task(task)
    if str(source) == "hub" or str(source).startswith("hub:"):
        name = _HUB[task][0] if str(source) == "hub" else str(source).removeprefix("hub:")
        raw = datasets.load_dataset(name, _HUB[task][1], split=split)
    else:
        path = Path(source)
        if path.is_dir():
            matches = sorted(path.glob(f"{split}.jsonl")) or sorted(path.glob(f"*{split}*.jsonl"))
            if not matches:
                raise FileNotFoundError(f"no {split}.jsonl (or *{split}*.jsonl) in {path}")
            path = matches[0]
        if not path.is_file():
            raise FileNotFoundError(f"{task} data not found at {path} (use 'hub' or 'hub:NAME' for the hub)")
        raw = datasets.Dataset.from_json(str(path), keep_in_memory=True)
    if task == "gsm8k":
        _require_columns(raw, ("question", "answer"), source)
        finals = [extract_gsm8k_answer(solution) for solution in raw["answer"]]
        return raw.rename_column("answer", "solution").add_column("answer", finals)
    _require_columns(raw, ("problem", "solution", "answer"), source)
    return raw.rename_column("problem", "question")


def _check_task(task: str) -> None:
    if task not in _HUB:
        raise ValueError(f"task must be one of {sorted(_HUB)}, got {task!r}")


def _require_columns(dataset: datasets.Dataset, columns: Sequence[str], source: str | Path) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{source}: missing columns {missing}; has {dataset.column_names}")


def format_target(task: str, example: Mapping[str, str], *, cot: bool) -> str:
    """What the model should write: the worked solution ending in the answer (cot) or the answer alone."""
    _check_task(task)
    if task == "gsm8k":
        if not cot:
            return f"The answer is {example['answer']}."
        reasoning = _CALCULATOR_RE.sub("", example["solution"]).rsplit("####", 1)[0].strip()
        return f"{reasoning}\nThe answer is {example['answer']}."
    return example["solution"].strip() if cot else f"The final answer is ${example['answer']}$."


def format_prompt(
    task: str, question: str, shots: Sequence[Mapping[str, str]] = (), *, cot: bool = True
) -> str:
    """Few-shot prompt: shots as `Question: ...\\nAnswer: target` (GSM8K) or `Problem: ...\\nSolution: target`
    (MATH), then the question with an open answer. The target follows after one space."""
    _check_task(task)
    question_label, answer_label = ("Question", "Answer") if task == "gsm8k" else ("Problem", "Solution")
    blocks = [
        f"{question_label}: {shot['question'].strip()}\n{answer_label}: {format_target(task, shot, cot=cot)}"
        for shot in shots
    ]
    blocks.append(f"{question_label}: {question.strip()}\n{answer_label}:")
    return "\n\n".join(blocks)


def sample_shots(
    dataset: datasets.Dataset, k: int, *, seed: int = 0, exclude: int | None = None
) -> list[dict]:
    """`k` examples of `dataset` chosen by a seeded permutation, never row `exclude`."""
    order = [i for i in np.random.default_rng(seed).permutation(len(dataset)).tolist() if i != exclude]
    if k > len(order):
        raise ValueError(f"k ({k}) exceeds the {len(order)} available shots")
    return [dataset[i] for i in order[:k]]


@runtime_checkable
class TextTokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """`bos prompt target eos` as ids, with the loss on target and eos."""

    tokens: Int[np.ndarray, " n"]
    loss_mask: Bool[np.ndarray, " n"]


def tokenize_example(
    tokenizer: TextTokenizer, prompt: str, target: str, *, max_len: int | None = None
) -> TokenizedExample:
    """Tokenise one example. Beyond `max_len`, the prompt loses its first tokens (the target stays whole)."""
    prompt_ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    target_ids = [*tokenizer.encode(" " + target.lstrip()), tokenizer.eos_id]
    if max_len is not None:
        if len(target_ids) > max_len:
            raise ValueError(f"target needs {len(target_ids)} tokens but max_len is {max_len}")
        prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(target_ids) - max_len) :]
    tokens = np.array(prompt_ids + target_ids, dtype=np.int32)
    loss_mask = np.zeros(len(tokens), dtype=bool)
    loss_mask[len(prompt_ids) :] = True
    return TokenizedExample(tokens, loss_mask)


def tokenize_task(
    task: str,
    dataset: datasets.Dataset,
    tokenizer: TextTokenizer,
    *,
    cot: bool = True,
    shots: Sequence[Mapping[str, str]] = (),
    max_len: int | None = None,
) -> list[TokenizedExample]:
    """Every row of `dataset` as a supervised example: few-shot prompt, then its target."""
    return [
        tokenize_example(
            tokenizer,
            format_prompt(task, row["question"], shots, cot=cot),
            format_target(task, row, cot=cot),
            max_len=max_len,
        )
        for row in dataset
    ]


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Fixed-shape batch. Loss for token t uses logits at t-1: CE(logits[:, :-1], tokens[:, 1:]) with
    loss_mask[:, 1:]. Packed rows hold several examples, told apart by segment_ids; positions restart."""

    tokens: Int[np.ndarray, "b s"]
    positions: Int[np.ndarray, "b s"]  # -1 on padding
    segment_ids: Int[np.ndarray, "b s"]  # 1, 2, ... per example in a row; 0 on padding
    loss_mask: Bool[np.ndarray, "b s"]


def _empty_batch(batch_size: int, seq_len: int, pad_id: int) -> TokenBatch:
    return TokenBatch(
        tokens=np.full((batch_size, seq_len), pad_id, dtype=np.int32),
        positions=np.full((batch_size, seq_len), -1, dtype=np.int32),
        segment_ids=np.zeros((batch_size, seq_len), dtype=np.int32),
        loss_mask=np.zeros((batch_size, seq_len), dtype=bool),
    )


def _place(batch: TokenBatch, row: int, offset: int, segment: int, example: TokenizedExample) -> None:
    end = offset + len(example.tokens)
    batch.tokens[row, offset:end] = example.tokens
    batch.positions[row, offset:end] = np.arange(len(example.tokens))
    batch.segment_ids[row, offset:end] = segment
    batch.loss_mask[row, offset:end] = example.loss_mask


def _check_fits(example: TokenizedExample, seq_len: int) -> None:
    if len(example.tokens) > seq_len:
        raise ValueError(
            f"an example of {len(example.tokens)} tokens does not fit seq_len={seq_len}; "
            "tokenize with max_len=seq_len"
        )


def pad_batch(
    examples: Sequence[TokenizedExample], batch_size: int, seq_len: int, *, pad_id: int = 0
) -> TokenBatch:
    """One example per row, right-padded; rows beyond `len(examples)` are all padding."""
    if len(examples) > batch_size:
        raise ValueError(f"{len(examples)} examples exceed batch_size={batch_size}")
    batch = _empty_batch(batch_size, seq_len, pad_id)
    for row, example in enumerate(examples):
        _check_fits(example, seq_len)
        _place(batch, row, 0, 1, example)
    return batch


def pack_batch(
    examples: Iterable[TokenizedExample], batch_size: int, seq_len: int, *, pad_id: int = 0
) -> tuple[TokenBatch, int]:
    """Pack examples in order into rows (next-fit: an example goes into the current row, else the next one).
    Returns the batch and how many examples it consumed (a prefix of `examples`, read lazily)."""
    batch = _empty_batch(batch_size, seq_len, pad_id)
    row, offset, segment = 0, 0, 0
    consumed = 0
    for example in examples:
        _check_fits(example, seq_len)
        if offset + len(example.tokens) > seq_len:
            row, offset, segment = row + 1, 0, 0
            if row == batch_size:
                break
        segment += 1
        _place(batch, row, offset, segment, example)
        offset += len(example.tokens)
        consumed += 1
    return batch, consumed


class BatchIterator:
    """Endless, deterministic batches over `examples`: epoch e visits them in the order of a permutation
    seeded by (seed, e). Batches never straddle epochs: an epoch's last batch may be padded. The state is
    (epoch, position, seed), so a checkpointed `get_state()` resumes the exact sequence of batches.

    With `num_shards > 1` (one per data-parallel process), shard i reads every num_shards-th example of the
    permutation, and all shards see the same number of examples per epoch."""

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        pack: bool = False,
        pad_id: int = 0,
        shard_index: int = 0,
        num_shards: int = 1,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be >= 1")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index ({shard_index}) must lie in [0, num_shards={num_shards})")
        if len(examples) < num_shards:
            raise ValueError(f"{len(examples)} examples cannot feed {num_shards} shards")
        for example in examples:
            _check_fits(example, seq_len)
        self.examples = examples
        self.batch_size, self.seq_len, self.pack, self.pad_id = batch_size, seq_len, pack, pad_id
        self.shard_index, self.num_shards = shard_index, num_shards
        self.seed, self.epoch, self.position = seed, 0, 0
        self._cached_order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This shard's example indices for `epoch`, in visiting order (computed once per epoch)."""
        if self._cached_order is None or self._cached_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            per_shard = len(self.examples) // self.num_shards
            self._cached_order = (epoch, order[self.shard_index :: self.num_shards][:per_shard])
        return self._cached_order[1]

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def set_state(self, state: Mapping[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state seed ({state['seed']}) differs from this iterator's seed ({self.seed})")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.examples) // self.num_shards:
            raise ValueError(f"state epoch={epoch}, position={position} is outside this data set")
        self.epoch, self.position = epoch, position

    def __iter__(self) -> Iterator[TokenBatch]:
        return self

    def __next__(self) -> TokenBatch:
        order = self._epoch_order(self.epoch)
        if self.position >= len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self._epoch_order(self.epoch)
        if self.pack:
            pending = (self.examples[i] for i in order[self.position :])
            batch, consumed = pack_batch(pending, self.batch_size, self.seq_len, pad_id=self.pad_id)
        else:
            chosen = [self.examples[i] for i in order[self.position : self.position + self.batch_size]]
            batch, consumed = (
                pad_batch(chosen, self.batch_size, self.seq_len, pad_id=self.pad_id),
                len(chosen),
            )
        self.position += consumed
        return batch
