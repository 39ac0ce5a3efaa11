"""Synthetic task: answers are right, critical tokens suffice, the held-out split shares no template."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sra_jax.data.synthetic import (
    SyntheticBatches,
    SyntheticConfig,
    SyntheticTokenizer,
    extract_synthetic_answer,
    generate,
    grade,
    make_batch,
    make_problem,
    max_length,
    split_templates,
    template_split,
)

_STATEMENT = re.compile(r"^([a-z])=(?:(\d+)|([a-z])([-+*])(\d+))$")


def evaluate(statements: list[str]) -> dict[str, int]:
    """An independent interpreter: the value of every variable bound by `statements`, in order."""
    values: dict[str, int] = {}
    for statement in statements:
        name, constant, source, op, operand = _STATEMENT.match(statement).groups()
        if constant is not None:
            values[name] = int(constant)
        else:
            left, right = values[source], int(operand)
            values[name] = left + right if op == "+" else left - right if op == "-" else left * right
    return values


def statements_of(question: str) -> tuple[list[str], str]:
    *statements, query = question.split(";")
    assert query.endswith("?")
    return statements, query[:-1]


configs = st.builds(
    SyntheticConfig,
    min_hops=st.integers(1, 3),
    max_hops=st.integers(3, 6),
    min_distractors=st.integers(0, 2),
    max_distractors=st.integers(2, 8),
    value_range=st.sampled_from([10, 20, 100]),
    operand_max=st.integers(1, 9),
    operators=st.sampled_from(["+-*", "+-", "+*", "*-"]),
    shuffle_chain=st.booleans(),
)


@given(config=configs, seed=st.integers(0, 2**31 - 1), split=st.sampled_from(["train", "test"]))
def test_answer_follows_from_the_question_and_from_its_critical_statements_alone(config, seed, split):
    for problem in generate(config, 8, split=split, seed=seed):
        statements, query = statements_of(problem.question)
        if not config.shuffle_chain:
            assert evaluate(statements)[query] == problem.answer
        critical = [problem.question[start:end] for start, end in problem.critical_spans]
        # Critical statements, put in dependency order, determine the answer without any distractor.
        ordered = sorted(critical, key=lambda s: problem.chain.index(s[0]))
        values = evaluate(ordered)
        assert values[query] == problem.answer
        assert len(critical) == problem.hops + 1 and [s[0] for s in ordered] == list(problem.chain)
        assert all(
            0 <= v < config.value_range
            for v in evaluate(sorted(statements, key=_definition_order(statements))).values()
        )
        assert config.min_hops <= problem.hops <= config.max_hops
        assert config.min_distractors <= len(statements) - problem.hops - 1 <= config.max_distractors
        assert problem.cot == " ".join(f"{n}={values[n]}" for n in problem.chain[1:]) + f" #{problem.answer}"
        assert problem.direct == f"#{problem.answer}"
        assert template_split(config, problem.template) == split


def _definition_order(statements: list[str]):
    """Sort key putting each statement after the one defining its source (chains may be shuffled)."""
    defined_at = {s[0]: i for i, s in enumerate(statements)}

    def depth(statement: str) -> int:
        match = _STATEMENT.match(statement)
        source = match.group(3)
        return 0 if source is None else 1 + depth(statements[defined_at[source]])

    return depth


def test_chain_statements_use_nontrivial_operands():
    problems = generate(SyntheticConfig(), 300, seed=1)
    chain_statements = [p.question[a:b] for p in problems for a, b in p.critical_spans]
    assert not [s for s in chain_statements if re.search(r"\*1$|[-+]0$", s)]


def test_same_seed_gives_same_problems_and_other_seeds_differ():
    config = SyntheticConfig()
    assert generate(config, 20, seed=3) == generate(config, 20, seed=3)
    assert generate(config, 20, seed=3) != generate(config, 20, seed=4)
    assert generate(config, 5, seed=3, start=10) == generate(config, 20, seed=3)[10:15]
    assert generate(config, 20, split="train", seed=3) != generate(config, 20, split="test", seed=3)


def test_held_out_split_shares_no_chain_template_with_training():
    config = SyntheticConfig(min_hops=1, max_hops=5)
    train, test = set(split_templates(config, "train")), set(split_templates(config, "test"))
    assert train and test and not train & test
    seen_train = {p.template for p in generate(config, 200, split="train")}
    seen_test = {p.template for p in generate(config, 200, split="test")}
    assert seen_train <= train and seen_test <= test and not seen_train & seen_test
    assert all(len(t) >= 2 for t in seen_test)  # single operators stay in training: every split sees them
    # Training covers every operator at every chain position, so the held-out split tests composition only.
    for hops in range(2, 6):
        for position in range(hops):
            assert {t[position] for t in train if len(t) == hops} == set(config.operators)


def test_held_out_templates_do_not_depend_on_the_sampling_seed():
    config = SyntheticConfig()
    train_templates = set(split_templates(config, "train"))
    for seed in range(5):
        assert {p.template for p in generate(config, 50, split="test", seed=seed)}.isdisjoint(train_templates)
    assert split_templates(SyntheticConfig(split_seed=1), "test") != split_templates(config, "test")


def test_tokenizer_round_trips_and_keeps_specials_apart():
    tokenizer = SyntheticTokenizer()
    assert tokenizer.vocab_size < 128
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.sep_id}
    assert len(specials) == 4
    for problem in generate(SyntheticConfig(), 20):
        for text in (problem.question, problem.cot, problem.direct):
            ids = tokenizer.encode(text)
            assert len(ids) == len(text) and not specials & set(ids)
            assert max(ids) < tokenizer.vocab_size and tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("a=1"), tokenizer.eos_id, 40]) == "a=1"
    with pytest.raises(ValueError, match="printable"):
        tokenizer.encode("é")


@pytest.mark.parametrize("form", ["direct", "cot"])
def test_batch_has_fixed_shapes_masks_on_the_target_and_marks_critical_tokens(form):
    config = SyntheticConfig()
    tokenizer = SyntheticTokenizer()
    problems = generate(config, 16, seed=2)
    seq_len = max_length(config, form)
    batch = make_batch(problems, tokenizer, seq_len, form=form)
    assert (
        batch.tokens.shape
        == batch.positions.shape
        == batch.loss_mask.shape
        == batch.critical.shape
        == (16, seq_len)
    )
    assert batch.tokens.dtype == np.int32 and batch.positions.dtype == np.int32
    for row, problem in enumerate(problems):
        length = int((batch.positions[row] >= 0).sum())
        assert (batch.positions[row, :length] == np.arange(length)).all()
        assert (batch.tokens[row, length:] == tokenizer.pad_id).all() and not batch.loss_mask[
            row, length:
        ].any()
        assert batch.tokens[row, 0] == tokenizer.bos_id and batch.tokens[row, length - 1] == tokenizer.eos_id
        prompt = batch.tokens[row, : batch.prompt_lengths[row]]
        assert tokenizer.decode(prompt) == problem.question and prompt[-1] == tokenizer.sep_id
        target = batch.tokens[row][batch.loss_mask[row]]
        assert tokenizer.decode(target) == problem.target(form) and target[-1] == tokenizer.eos_id
        critical_text = tokenizer.decode(np.where(batch.critical[row], batch.tokens[row], tokenizer.pad_id))
        assert critical_text == "".join(problem.question[a:b] for a, b in problem.critical_spans)
        assert (np.flatnonzero(batch.critical[row]) == problem.critical_token_indices()).all()
        assert grade(problem.target(form), int(batch.answers[row]))


def test_batch_rejects_problems_longer_than_seq_len():
    problems = generate(SyntheticConfig(), 2)
    with pytest.raises(ValueError, match="seq_len"):
        make_batch(problems, SyntheticTokenizer(), 10)


def test_max_length_bounds_every_problem():
    config = SyntheticConfig(max_hops=6, max_distractors=12, value_range=100)
    tokenizer = SyntheticTokenizer()
    for form in ("direct", "cot"):
        bound = max_length(config, form)
        problems = generate(config, 100)
        assert max(len(tokenizer.prompt_ids(p)) + len(p.target(form)) + 1 for p in problems) <= bound


@pytest.mark.parametrize(
    ("text", "answer", "correct"),
    [
        ("e=4 v=8 l=16 #16", 16, True),
        ("#16", 16, True),
        ("# 16 ", 16, True),
        ("#1 then #16", 16, True),
        ("#15", 16, False),
        ("16", 16, False),
        ("", 3, False),
        ("#-2", -2, True),
    ],
)
def test_grade_reads_the_last_hash_number(text, answer, correct):
    assert grade(text, answer) is correct


def test_extract_synthetic_answer_returns_none_without_an_answer():
    assert extract_synthetic_answer("e=4 v=8") is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_hops": 0},
        {"min_hops": 3, "max_hops": 2},
        {"max_hops": 11},
        {"max_hops": 10, "max_distractors": 20},
        {"value_range": 1},
        {"operators": "+/"},
        {"operators": ""},
        {"test_fraction": 1.0},
        {"operand_max": 0},
        {"min_distractors": 3, "max_distractors": 1},
    ],
)
def test_bad_config_raises_naming_the_field(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SyntheticConfig(**kwargs)


def test_test_split_needs_two_hops():
    with pytest.raises(ValueError, match="max_hops"):
        make_problem(SyntheticConfig(min_hops=1, max_hops=1), "test", 0, 0)


def test_batch_stream_is_fresh_and_resumes_from_its_state():
    config = SyntheticConfig()
    tokenizer = SyntheticTokenizer()

    def stream():
        return SyntheticBatches(
            config, tokenizer, batch_size=4, seq_len=max_length(config, "cot"), form="cot", seed=5
        )

    uninterrupted = [next(s) for s in [stream()] for _ in range(6)]
    assert not (uninterrupted[0].tokens == uninterrupted[1].tokens).all()
    first = stream()
    for _ in range(3):
        next(first)
    resumed = stream()
    resumed.set_state(first.get_state())
    for expected in uninterrupted[3:]:
        assert (next(resumed).tokens == expected.tokens).all()
    with pytest.raises(ValueError, match="seed"):
        stream().set_state({"index": 0, "seed": 6})
    with pytest.raises(ValueError, match="seq_len"):
        SyntheticBatches(config, tokenizer, batch_size=4, seq_len=20)


def test_problems_are_the_same_on_every_machine():
    """A golden problem: the stream depends on (config, split, seed, index) only, not on the platform."""
    config = SyntheticConfig()
    problem = make_problem(config, "train", 0, 0)
    assert problem.question == "c=12;s=3;b=s*3;k=11;e=s+1;v=e*2;q=1;l=v*2;l?"
    assert (problem.cot, problem.direct, problem.template) == ("e=4 v=8 l=16 #16", "#16", "+**")
    assert make_problem(config, "test", 0, 0).template in split_templates(config, "test")
