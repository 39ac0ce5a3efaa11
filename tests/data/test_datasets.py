"""GSM8K / MATH loading and prompts on the real files; padding, packing and the resumable iterator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sra_jax.data.datasets import (
    BatchIterator,
    TokenizedExample,
    format_prompt,
    format_target,
    load_task,
    pack_batch,
    pad_batch,
    sample_shots,
    tokenize_example,
    tokenize_task,
)
from sra_jax.data.grading import extract_gsm8k_answer, extract_math_answer, is_equivalent
from sra_jax.data.tokenizer import Llama3Tokenizer


@pytest.fixture(scope="module")
def gsm8k(data_dir):
    return load_task("gsm8k", data_dir / "gsm8k", "test")


@pytest.fixture(scope="module")
def math500(data_dir):
    return load_task("math", data_dir / "math", "test")


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return Llama3Tokenizer(data_dir / "llama3" / "tokenizer.model")


def test_tasks_load_into_one_schema(gsm8k, math500, data_dir):
    assert len(gsm8k) == 1319 and len(math500) == 500
    for dataset in (gsm8k, math500):
        assert {"question", "solution", "answer"} <= set(dataset.column_names)
    assert gsm8k[0]["answer"] == "18" and gsm8k[0]["solution"].endswith("#### 18")
    assert len(load_task("gsm8k", data_dir / "gsm8k" / "train.jsonl")) == 7473
    assert math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_missing_data_raises_instead_of_reaching_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_task("gsm8k", tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_task("gsm8k", tmp_path, "train")
    (tmp_path / "bad.jsonl").write_text('{"q": 1}\n')
    with pytest.raises(ValueError, match="missing columns"):
        load_task("math", tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="task"):
        load_task("mmlu", tmp_path)


@pytest.mark.parametrize("cot", [True, False])
def test_gsm8k_targets_end_in_the_gold_answer(gsm8k, cot):
    for row in gsm8k:
        target = format_target("gsm8k", row, cot=cot)
        assert "<<" not in target and "####" not in target
        assert extract_gsm8k_answer(target) == row["answer"]


@pytest.mark.parametrize("cot", [True, False])
def test_math_targets_grade_correct(math500, cot):
    for row in math500.select(range(40)):
        assert is_equivalent(extract_math_answer(format_target("math", row, cot=cot)), row["answer"])


@pytest.mark.parametrize("task", ["gsm8k", "math"])
def test_few_shot_prompt_lists_shots_then_the_open_question(task, gsm8k, math500):
    dataset = gsm8k if task == "gsm8k" else math500
    shots = sample_shots(dataset, 3, seed=1, exclude=0)
    assert shots == sample_shots(dataset, 3, seed=1, exclude=0)
    assert dataset[0] not in shots
    prompt = format_prompt(task, dataset[0]["question"], shots, cot=True)
    label = "Question" if task == "gsm8k" else "Problem"
    answer_label = "Answer:" if task == "gsm8k" else "Solution:"
    assert prompt.count(f"{label}: ") == 4 and prompt.endswith(answer_label)
    for shot in shots:
        assert format_target(task, shot, cot=True) in prompt
    direct = format_prompt(task, dataset[0]["question"], shots, cot=False)
    assert len(direct) < len(prompt)


def test_tokenized_example_masks_the_target_and_eos(gsm8k, tokenizer):
    examples = tokenize_task("gsm8k", gsm8k.select(range(8)), tokenizer, cot=True)
    for row, example in zip(gsm8k.select(range(8)), examples):
        assert example.tokens[0] == tokenizer.bos_id and example.tokens[-1] == tokenizer.eos_id
        target = example.tokens[example.loss_mask]
        assert tokenizer.decode(target[:-1]) == " " + format_target("gsm8k", row, cot=True)
        prompt = example.tokens[~example.loss_mask]
        assert tokenizer.decode(prompt[1:]) == format_prompt("gsm8k", row["question"], cot=True)


def test_long_prompts_lose_their_start_and_keep_the_target(gsm8k, tokenizer):
    shots = sample_shots(gsm8k, 4, seed=0, exclude=0)
    full = tokenize_example(
        tokenizer, format_prompt("gsm8k", gsm8k[0]["question"], shots), "The answer is 18."
    )
    cut = tokenize_example(
        tokenizer, format_prompt("gsm8k", gsm8k[0]["question"], shots), "The answer is 18.", max_len=100
    )
    assert len(cut.tokens) == 100
    assert (cut.tokens == full.tokens[-100:]).all() and (cut.loss_mask == full.loss_mask[-100:]).all()
    with pytest.raises(ValueError, match="max_len"):
        tokenize_example(tokenizer, "q", "a very long target " * 20, max_len=10)


def _toy_examples(lengths: list[int]) -> list[TokenizedExample]:
    """Example i is `length` copies of token i+1 (so it can be found again), with loss on its second half."""
    return [
        TokenizedExample(np.full(n, i + 1, dtype=np.int32), np.arange(n) >= n // 2)
        for i, n in enumerate(lengths)
    ]


def _examples_in(batch) -> list[int]:
    """Ids of the examples in a batch, row by row; checks each fills one segment with positions from 0."""
    found = []
    for row in range(batch.tokens.shape[0]):
        for segment in sorted(set(batch.segment_ids[row].tolist()) - {0}):
            where = np.flatnonzero(batch.segment_ids[row] == segment)
            tokens = batch.tokens[row, where]
            assert (where == np.arange(where[0], where[0] + len(where))).all()  # contiguous
            assert (batch.positions[row, where] == np.arange(len(where))).all()
            assert len(set(tokens.tolist())) == 1
            n = len(where)
            assert (batch.loss_mask[row, where] == (np.arange(n) >= n // 2)).all()
            found.append(int(tokens[0]) - 1)
        padding = batch.segment_ids[row] == 0
        assert (batch.positions[row, padding] == -1).all() and not batch.loss_mask[row, padding].any()
    return found


def test_pad_and_pack_place_examples_whole():
    examples = _toy_examples([3, 5, 2, 7, 4, 1])
    padded = pad_batch(examples, 8, 8)
    assert padded.tokens.shape == (8, 8) and _examples_in(padded) == list(range(6))
    packed, consumed = pack_batch(examples, 3, 8)
    assert (
        consumed == 4
    )  # next-fit rows: [3, 5], [2], [7]; the next example (4 tokens) would need a fourth row
    assert _examples_in(packed) == list(range(consumed))
    assert packed.tokens.dtype == np.int32 and packed.loss_mask.dtype == bool
    with pytest.raises(ValueError, match="seq_len"):
        pad_batch(_toy_examples([9]), 1, 8)


@pytest.mark.parametrize("pack", [False, True])
def test_iterator_visits_every_example_once_per_epoch(pack):
    rng = np.random.default_rng(0)
    examples = _toy_examples(rng.integers(1, 9, size=37).tolist())
    iterator = BatchIterator(examples, batch_size=4, seq_len=12, seed=3, pack=pack)
    seen: list[int] = []
    while iterator.get_state()["position"] < 37:
        seen += _examples_in(next(iterator))
    assert sorted(seen) == list(range(37)) and seen != list(range(37))  # all of them, shuffled
    next_epoch = _examples_in(next(iterator))
    assert iterator.get_state()["epoch"] == 1 and next_epoch != seen[: len(next_epoch)]


@pytest.mark.parametrize("pack", [False, True])
def test_iterator_resumes_exactly_from_its_state(pack):
    examples = _toy_examples(np.random.default_rng(1).integers(1, 9, size=23).tolist())

    def make():
        return BatchIterator(examples, batch_size=3, seq_len=10, seed=7, pack=pack)

    uninterrupted = [next(b) for b in [make()] for _ in range(20)]
    first = make()
    for _ in range(9):
        next(first)
    state = first.get_state()
    resumed = make()
    resumed.set_state(dict(state))
    for expected, batch in zip(uninterrupted[9:], (next(resumed) for _ in range(11))):
        for field in ("tokens", "positions", "segment_ids", "loss_mask"):
            assert (getattr(expected, field) == getattr(batch, field)).all()
    with pytest.raises(ValueError, match="seed"):
        make().set_state({**state, "seed": 8})
    with pytest.raises(ValueError, match="position"):
        make().set_state({**state, "position": 24})


def test_shards_split_each_epoch_disjointly():
    examples = _toy_examples([2] * 30)
    seen = []
    for shard in range(4):
        iterator = BatchIterator(examples, batch_size=2, seq_len=4, seed=0, shard_index=shard, num_shards=4)
        seen.append([i for batch in itertools.islice(iterator, 4) for i in _examples_in(batch)])
    assert all(len(s) == 7 for s in seen)  # 30 // 4 examples each; the 2 left over are dropped this epoch
    assert len(set().union(*map(set, seen))) == 28
    with pytest.raises(ValueError, match="shard_index"):
        BatchIterator(examples, batch_size=2, seq_len=4, shard_index=4, num_shards=4)


def test_different_seeds_give_different_orders():
    examples = _toy_examples([2] * 16)
    orders = [
        [
            i
            for batch in itertools.islice(BatchIterator(examples, batch_size=4, seq_len=2, seed=s), 4)
            for i in _examples_in(batch)
        ]
        for s in (0, 1)
    ]
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]
