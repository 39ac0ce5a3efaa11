"""The GSM8K / MATH harness (sra_jax.evals.text_tasks) on the real test splits: gold completions score exactly 100%,
a scripted model scores exactly its planned fraction, and few-shot prompts never hold the evaluated problem."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from sra_jax.data import datasets as task_data
from sra_jax.evals import text_tasks as T

SHOTS = {"gsm8k": 8, "math": 4}
SIZES = {"gsm8k": 1319, "math": 500}
LABELS = {"gsm8k": ("Question", "Answer"), "math": ("Problem", "Solution")}


@pytest.fixture(scope="module", params=T.TASKS)
def task(request):
    return request.param


@pytest.mark.parametrize("cot", [True, False])
def test_gold_completions_score_exactly_100_percent_on_the_whole_test_split(task, cot, data_dir):
    """The target the few-shot prompt teaches, followed by the model carrying on into the next question, goes
    through the same path as a model's output: stop-string cut, extraction, equivalence."""
    items, _ = T.load_items(task, data_dir, shots=0, cot=cot)
    rows = task_data.load_task(task, data_dir / task, "test")
    assert len(items) == SIZES[task]
    carry_on = f"\n\n{LABELS[task][0]}: What is 1 + 1?\n{LABELS[task][1]}: The answer is 2."
    gold_text = {item.id: " " + task_data.format_target(task, row, cot=cot) + carry_on for item, row in zip(items, rows)}

    records, summary = T.evaluate(task, items, lambda batch: [T.Completion(gold_text[i.id], 1) for i in batch],
                                  batch_size=64)
    failures = [(r["id"], r["extracted"], r["gold"]) for r in records if not r["correct"]]
    assert not failures, failures[:5]
    assert summary["accuracy"] == 1.0 and summary["n"] == SIZES[task] == summary["correct"]
    assert all(LABELS[task][0] + ":" not in r["completion"] for r in records)


def _wrong(task: str, gold: str, k: int) -> str:
    if task == "gsm8k":
        return f"So the result is {Fraction(gold) + 1}.\nThe answer is {Fraction(gold) + 1}."
    return f"Thus the value is $\\boxed{{{987654321 + k}}}$."


def _right(task: str, gold: str) -> str:
    return f"The answer is {gold}." if task == "gsm8k" else f"The final answer is ${gold}$. I hope it is correct."


def test_a_scripted_model_scores_exactly_what_it_was_scripted_to(task, data_dir):
    items, _ = T.load_items(task, data_dir, shots=2, cot=True, limit=240)
    chosen = set(np.random.default_rng(7).choice([item.id for item in items], size=83, replace=False).tolist())
    calls = []

    def complete(batch):
        calls.append(len(batch))
        return [T.Completion(_right(task, i.gold) if i.id in chosen else _wrong(task, i.gold, k), tokens=len(i.id))
                for k, i in enumerate(batch)]

    records, summary = T.evaluate(task, items, complete, batch_size=50)
    assert calls == [50, 50, 50, 50, 40]
    assert [r["id"] for r in records] == [item.id for item in items]  # results come back in problem order
    assert {r["id"] for r in records if r["correct"]} == chosen
    assert summary["correct"] == 83 and summary["accuracy"] == 83 / 240 and summary["n"] == 240
    assert summary["generated_tokens"] == sum(len(item.id) for item in items)
    # Wilson score interval by hand (z = 1.959964, the 97.5% normal quantile).
    p, n, z = 83 / 240, 240, 1.959963984540054
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    assert summary["ci95_wilson"] == pytest.approx([centre - half, centre + half], abs=1e-9)


def test_a_completion_count_mismatch_is_an_error(data_dir):
    items, _ = T.load_items("gsm8k", data_dir, shots=0, cot=True, limit=3)
    with pytest.raises(ValueError, match="returned 2 completions for 3 prompts"):
        T.evaluate("gsm8k", items, lambda batch: [T.Completion("1", 1)] * 2, batch_size=4)


def test_few_shot_prompts_never_contain_the_evaluated_problem(task, data_dir):
    """MATH's shots come from its own test split (no train split in the data), so leaving the evaluated problem
    out is exercised on every one of its 500 prompts."""
    items, source = T.load_items(task, data_dir, shots=SHOTS[task], cot=True, seed=3)
    question_label, answer_label = LABELS[task]
    pool = task_data.load_task(task, data_dir / task, "train" if task == "gsm8k" else "test")
    pool_questions = {q.strip() for q in pool["question"]}
    for item in items:
        blocks = item.prompt.split(f"\n\n{question_label}: ")
        assert len(blocks) == SHOTS[task] + 1
        assert item.prompt.endswith(f"{question_label}: {item.question.strip()}\n{answer_label}:")
        shot_questions = [b.removeprefix(f"{question_label}: ").split(f"\n{answer_label}: ")[0] for b in blocks[:-1]]
        assert item.question.strip() not in shot_questions
        assert set(shot_questions) <= pool_questions
    assert source == ("gsm8k train split" if task == "gsm8k" else "math test split, the evaluated problem left out")


def test_shots_are_seeded_and_skip_the_evaluated_question():
    pool = [f"question {i}" for i in range(10)]
    first = T.shot_indices(pool, 3, "unrelated", seed=0)
    assert first == T.shot_indices(pool, 3, "unrelated", seed=0) != T.shot_indices(pool, 3, "unrelated", seed=1)
    without = T.shot_indices(pool, 3, f"  {pool[first[0]]} ", seed=0)  # whitespace does not hide a duplicate
    assert without == [*first[1:], np.random.default_rng(0).permutation(10).tolist()[3]]
    with pytest.raises(ValueError, match="exceeds the 9 usable"):
        T.shot_indices(pool, 10, pool[0], seed=0)


def test_gsm8k_shots_are_the_same_train_examples_for_every_problem(data_dir):
    items, _ = T.load_items("gsm8k", data_dir, shots=4, cot=False, limit=20)
    headers = {item.prompt.rsplit("\n\nQuestion: ", 1)[0] for item in items}
    assert len(headers) == 1 and "The answer is" in headers.pop()


@pytest.mark.parametrize(("text", "cut"), [
    (" 5.\nThe answer is 5.\n\nQuestion: Who?", " 5.\nThe answer is 5.\n\n"),
    ("no stop here", "no stop here"),
    ("Question: at once", ""),
])
def test_cut_at_stop(text, cut):
    assert T.cut_at_stop("gsm8k", text) == cut
    assert T.grade("gsm8k", text, "5")[0] == cut


def test_bad_input_is_named(tmp_path, data_dir):
    with pytest.raises(ValueError, match="task must be one of"):
        T.load_items("mmlu", data_dir, shots=0, cot=True)
    with pytest.raises(FileNotFoundError, match="no gsm8k data folder"):
        T.load_items("gsm8k", tmp_path, shots=0, cot=True)
    with pytest.raises(ValueError, match="--limit 0"):
        T.load_items("gsm8k", data_dir, shots=0, cot=True, limit=0)
