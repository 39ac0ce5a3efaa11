"""Graders: every gold answer is graded correct against itself; tricky forms are accepted or rejected."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import pytest

from sra_jax.data.grading import extract_gsm8k_answer, extract_math_answer, is_equivalent


def _rows(path) -> list[dict]:
    with open(path) as lines:
        return [json.loads(line) for line in lines]


def test_every_gsm8k_test_gold_answer_grades_correct_against_itself(data_dir):
    rows = _rows(data_dir / "gsm8k" / "test.jsonl")
    assert len(rows) == 1319
    for row in rows:
        gold = row["answer"].rsplit("####", 1)[1].strip()
        extracted = extract_gsm8k_answer(row["answer"])
        assert extracted is not None and is_equivalent(extracted, gold), row["answer"][-40:]
        # A model restating the final number in prose is graded the same way.
        assert is_equivalent(extract_gsm8k_answer(f"So the total is {gold}. The answer is {gold}."), gold)
        assert not is_equivalent(str(Fraction(extracted) + 1), gold)


def test_every_math500_gold_answer_grades_correct_against_its_boxed_solution(data_dir):
    rows = _rows(data_dir / "math" / "math500_test.jsonl")
    assert len(rows) == 500
    for row in rows:
        boxed = extract_math_answer(row["solution"])
        assert boxed is not None and is_equivalent(boxed, row["answer"]), (boxed, row["answer"])


def test_different_math500_answers_are_rejected(data_dir):
    rows = _rows(data_dir / "math" / "math500_test.jsonl")[:60]
    for row, other in itertools.pairwise(rows):
        # "x=5" grades equal to "5" (the right-hand side of an assignment is the answer): skip such pairs.
        if row["answer"].replace(" ", "") != other["answer"].split("=")[-1].replace(" ", ""):
            assert not is_equivalent(other["answer"], row["answer"]), (other["answer"], row["answer"])


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("#### 1,000", "1000"),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 18\n", "18"),
        ("The answer is $18.", "18"),
        ("The answer is -3.", "-3"),
        ("so 5 apples and then 7.", "7"),
        ("It costs $2.50.", "2.5"),
        ("1,234,567 people", "1234567"),
        ("between 2020-2021", "2021"),
        ("so 5-3 = 2", "2"),
        ("it fell to -4 degrees", "-4"),
        ("The answer is 12. Then I rambled about 99", "12"),
        ("no numbers here", None),
    ],
)
def test_extract_gsm8k_answer(text, answer):
    assert extract_gsm8k_answer(text) == answer


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        (
            "\\boxed{1} then \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
            "\\left( 3, \\frac{\\pi}{2} \\right)",
        ),
        ("\\boxed{\\text{{(C)}}}", "\\text{{(C)}}"),
        ("\\fbox{5}", "5"),
        ("the answer is \\boxed 5.", "5"),
        ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
        ("The final answer is 7", "7"),
        ("The final answer is 7.\nLet me double check: 8", "7"),
        ("Final Answer: The final answer is $x^2$.", "x^2"),
        ("nothing boxed", None),
        ("\\boxed{3", None),  # unbalanced braces
        ("\\boxed{2} and \\boxed{3", "2"),  # the last complete box
    ],
)
def test_extract_math_answer(text, answer):
    assert extract_math_answer(text) == answer


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", "\\frac12"),
        ("1/2", "\\frac{1}{2}"),
        ("1,000", "1000"),
        ("$1,000.", "1000"),
        ("18 dollars", "18"),
        ("5\\text{ cm}", "5"),
        ("5%", "5"),
        ("-3", "-3"),
        ("[1,2)", "[1, 2)"),
        ("(-\\infty, 2]", "(-\\infty,2]"),
        ("x^2+1", "1+x^2"),
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
        ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\{1,2\\}", "\\{2,1\\}"),
        ("\\text{(C)}", "C"),
        ("x=5", "5"),
    ],
)
def test_equivalent_forms_are_accepted(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("3", "-3"),
        ("(1,2]", "[1,2]"),  # open vs closed end
        ("0.33", "\\frac{1}{3}"),
        ("2x", "2"),
        ("1, 2", "12"),
        ("17", "18"),
        ("\\frac{1}{3}", "\\frac{1}{2}"),
        (None, "3"),
        ("", "3"),
    ],
)
def test_wrong_answers_are_rejected(pred, gold):
    assert not is_equivalent(pred, gold)


def test_grading_works_off_the_main_thread():
    """math-verify's timeout needs the main thread; graders also run in rollout worker threads."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(is_equivalent, "\\frac{2}{4}", "0.5").result()
        assert not pool.submit(is_equivalent, "x+1", "x").result()
