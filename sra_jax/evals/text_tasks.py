"""Few-shot GSM8K / MATH evaluation (and the user's own prompt / answer data): prompts, a completion function,
grading, and results files.

The harness is model-agnostic: `evaluate(task, items, complete)` sends batches of `EvalItem`s to `complete` (a model
through `ModelCompleter`, or any scripted function in tests) and grades each completion with the same path:
cut at the first stop string (GSM8K / MATH), then a grader of `sra_jax.data.grading.GRADERS` (GSM8K: "numeric",
MATH: "math"; the user's data: `data.grader`) extracts the final answer and compares it with the gold one. Shots come from the train split with a fixed seed and never repeat the evaluated
question; MATH has no train split in the shared data, so its shots come from the test split, leaving the evaluated
problem out (the summary says which source was used).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sra_jax.data import datasets as task_data
from sra_jax.data.grading import grade_answer
from sra_jax.evals.stats import wilson_interval


TASKS = ("gsm8k", "math")
# The few-shot format starts every block with its label, so a model that carries on writes the next label.
STOP_STRINGS = {"gsm8k": ("Question:",), "math": ("Problem:",)}
TASK_GRADERS = {"gsm8k": "numeric", "math": "math"}  # names in sra_jax.data.grading.GRADERS


@dataclasses.dataclass(frozen=True)
class EvalItem:
    id: str
    question: str
    gold: str  # the final answer
    prompt: str
    prompt_ids: tuple[int, ...] | None = None  # the prompt already tokenised (chat templates); else `prompt` + bos


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str  # raw model output (stop tokens removed), before cutting at a stop string
    tokens: int  # tokens the model generated for it
    stopped: bool = False  # a stop token or stop string ended it (else the token limit did)


Complete = Callable[[Sequence[EvalItem]], list[Completion]]


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _same_question(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def shot_indices(pool_questions: Sequence[str], k: int, question: str, *, seed: int) -> list[int]:
    """The first `k` rows of a seeded permutation of the pool whose question is not `question` (so the same `k`
    shots for every problem, unless one of them is the evaluated problem: then the next row takes its place)."""
    chosen: list[int] = []
    for i in np.random.default_rng(seed).permutation(len(pool_questions)).tolist():
        if len(chosen) == k:
            break
        if not _same_question(pool_questions[i], question):
            chosen.append(i)
    if len(chosen) < k:
        raise ValueError(f"--shots {k} exceeds the {len(chosen)} usable examples in the shot pool")
    return chosen


def load_items(
    task: str, data_dir: str | Path, *, shots: int, cot: bool, seed: int = 0, limit: int | None = None
) -> tuple[list[EvalItem], str]:
    """Test problems of `task` under `data_dir/<task>/` with their few-shot prompts, and where the shots came from."""
    _check_task(task)
    folder = Path(data_dir) / task
    if not folder.is_dir():
        raise FileNotFoundError(f"no {task} data folder at {folder} (set --data-dir or SRA_JAX_DATA)")
    test = task_data.load_task(task, folder, "test")
    try:
        pool, source = task_data.load_task(task, folder, "train"), f"{task} train split"
    except FileNotFoundError:
        if task == "gsm8k":
            raise
        pool, source = test, f"{task} test split, the evaluated problem left out"
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit {limit} must be >= 1")
        test = test.select(range(min(limit, len(test))))
    pool_questions = pool["question"]
    headers: dict[tuple[int, ...], list[dict]] = {}  # shot rows by choice (usually one choice for all problems)
    items = []
    for index, row in enumerate(test):
        chosen = tuple(shot_indices(pool_questions, shots, row["question"], seed=seed) if shots else ())
        if chosen not in headers:
            headers[chosen] = [pool[i] for i in chosen]
        prompt = task_data.format_prompt(task, row["question"], headers[chosen], cot=cot)
        item_id = row.get("unique_id") or f"{task}-test-{index}"
        items.append(EvalItem(id=str(item_id), question=row["question"], gold=str(row["answer"]), prompt=prompt))
    return items, source


def cut_at_stop(task: str, text: str) -> str:
    """`text` up to the first stop string of `task`."""
    _check_task(task)
    cut = min((i for s in STOP_STRINGS[task] if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def grade(task: str, text: str, gold: str, grader: str | None = None) -> tuple[str, str | None, bool]:
    """(completion cut at the stop string, extracted answer, correct) for one raw completion. grader: a name of
    `sra_jax.data.grading.GRADERS` (default: the task's own, TASK_GRADERS); only GSM8K / MATH have stop strings."""
    completion = cut_at_stop(task, text) if task in STOP_STRINGS else text
    extracted, correct = grade_answer(grader or TASK_GRADERS[task], completion, gold)
    return completion, extracted, correct


def evaluate(
    task: str,
    items: Sequence[EvalItem],
    complete: Complete,
    *,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    grader: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Complete every item (batches of similar prompt length), grade, and return (per-problem records in item order,
    summary with accuracy, Wilson 95% CI, n, generated tokens and wall time). `progress(done, total)` is called
    after each batch. grader: see `grade` (a task other than GSM8K / MATH names its data set and needs one)."""
    if grader is None:
        _check_task(task)
    if not items:
        raise ValueError("no items to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    start = time.perf_counter()
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt))
    completions: dict[int, Completion] = {}
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        outputs = complete([items[i] for i in batch])
        if len(outputs) != len(batch):
            raise ValueError(f"the completion function returned {len(outputs)} completions for {len(batch)} prompts")
        completions.update(zip(batch, outputs))
        if progress is not None:
            progress(len(completions), len(items))
    records = []
    for index, item in enumerate(items):
        completion, extracted, correct = grade(task, completions[index].text, item.gold, grader)
        records.append({
            "id": item.id, "prompt": item.prompt, "completion": completion, "extracted": extracted,
            "gold": item.gold, "correct": correct, "generated_tokens": completions[index].tokens,
            "stopped": completions[index].stopped,
        })
    n, hits = len(records), sum(r["correct"] for r in records)
    low, high = wilson_interval(hits, n)
    tokens = [r["generated_tokens"] for r in records]
    summary = {
        "task": task, "grader": grader or TASK_GRADERS[task], "n": n, "correct": hits, "accuracy": hits / n, "ci95_wilson": [low, high],
        "generated_tokens": int(sum(tokens)), "generated_tokens_mean": float(np.mean(tokens)),
        "stopped_fraction": float(np.mean([r["stopped"] for r in records])),
        "wall_time_s": time.perf_counter() - start,
    }
    return records, summary


def write_results(records: Sequence[dict[str, Any]], summary: dict[str, Any], jsonl: Path, summary_path: Path) -> None:
    """One JSON object per problem in `jsonl`; the summary as indented JSON."""
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    with jsonl.open("w") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")


class ModelCompleter:
    """Greedy completions of a Llama model (KV cache, stop tokens, stop strings), with SRA selection counts."""

    def __init__(self, model, tokenizer, task: str, *, max_new_tokens: int, chunk: int = 32):
        """task: GSM8K / MATH cut completions at their stop strings; any other name only at stop tokens."""
        from sra_jax.evals.generation import greedy_generate

        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the model's vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size}: not the model's tokenizer")
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.max_new_tokens, self.chunk = max_new_tokens, chunk
        self.stop_ids = sorted({*tokenizer.stop_ids, *_config_eos(model.config)})
        self._generate = greedy_generate
        self.counts = np.zeros(4)  # prompt critical, prompt tokens, generated critical, generated tokens (SRA layers)

    def _text(self, ids: Sequence[int]) -> str:
        # a model vocabulary wider than the tokenizer's may produce ids that have no text
        return self.tokenizer.decode([t for t in ids if t not in self.stop_ids and t < self.tokenizer.vocab_size])

    def _prompt_ids(self, item: EvalItem) -> list[int]:
        if item.prompt_ids is not None:
            return list(item.prompt_ids)
        return self.tokenizer.encode(item.prompt, bos=self.tokenizer.bos_id is not None)

    def _stop_string(self, ids: Sequence[int]) -> bool:
        return cut_at_stop(self.task, self._text(ids)) != self._text(ids)

    def __call__(self, items: Sequence[EvalItem]) -> list[Completion]:
        prompts = [self._prompt_ids(item) for item in items]
        result = self._generate(
            self.model, prompts, max_new_tokens=self.max_new_tokens, stop_tokens=self.stop_ids,
            stop=self._stop_string if self.task in STOP_STRINGS else None, chunk=self.chunk,
            pad_id=self.tokenizer.pad_id,
        )
        self.counts += [result.prompt_critical, result.prompt_tokens, result.generated_critical,
                        result.generated_tokens]
        return [Completion(text=self._text(ids), tokens=len(ids), stopped=stopped)
                for ids, stopped in zip(result.tokens, result.stopped)]

    def sra_summary(self) -> dict[str, float | None]:
        """Selected (critical) fraction over SRA layers: prompt prefill, decode steps, and both; None without SRA."""
        pc, pt, gc, gt = self.counts.tolist()
        if pt + gt == 0:
            return {"sra_selected_fraction": None}
        return {
            "sra_selected_fraction": (pc + gc) / (pt + gt),
            "sra_selected_fraction_prompt": pc / pt if pt else None,
            "sra_selected_fraction_generated": gc / gt if gt else None,
        }


def _config_eos(config) -> list[int]:
    eos = config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
