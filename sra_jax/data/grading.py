"""Answer extraction and equivalence for GSM8K and MATH.

Extraction is ours (it is format-specific); equivalence of expressions is math-verify's (sympy based),
after a fast exact-number path that settles GSM8K-style answers without sympy.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

from sra_jax.extras import require

# A minus sign counts only where it cannot be an operator or a range dash ("5-3", "2020-2021").
_NUMBER = r"(?:(?<![\w)])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"answer is[:\s]*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
# Minerva format: "Final Answer: The final answer is $X$. I hope it is correct." (the answer ends its line).
_FINAL_ANSWER_RE = re.compile(
    r"final answer is:?[ \t]*([^\n]+?)\.?[ \t]*(?:I hope it is correct\.?[ \t]*)?$",
    re.IGNORECASE | re.MULTILINE,
)
# A plain number, maybe with a currency sign, percent or trailing unit words: "$1,000.", "18 dollars", "5%".
_PLAIN_NUMBER_RE = re.compile(
    r"^\s*\\?\$?\s*(" + _NUMBER + r")\s*(?:\\?%|(?:\s+[A-Za-z]{2,}\.?)+)?\s*\.?\s*$"
)
_MATH_VERIFY_TIMEOUT_S = 5


def _canonical_number(text: str) -> str:
    """`-1,000.50` -> `-1000.5`; integers lose a zero fractional part (`18.00` -> `18`)."""
    value = Fraction(text.replace(",", ""))
    return str(value.numerator) if value.denominator == 1 else text.replace(",", "").rstrip("0")


def extract_gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K solution: after the last `####` (gold format), else after the last
    "The answer is", else the last number in the text. Commas, `$` and trailing periods are dropped."""
    if "####" in text:
        candidates = _NUMBER_RE.findall(text.rsplit("####", 1)[1])
        return _canonical_number(candidates[0]) if candidates else None
    stated = _ANSWER_IS_RE.findall(text)
    if stated:
        return _canonical_number(stated[-1])
    numbers = _NUMBER_RE.findall(text)
    return _canonical_number(numbers[-1]) if numbers else None


def _last_braced_argument(text: str, commands: tuple[str, ...]) -> str | None:
    """Content of the last `\\command{...}` (balanced braces) of `commands`, or of `\\boxed X` (no braces)."""
    starts = [
        (match.start(), match.end())
        for command in commands
        for match in re.finditer(re.escape(command) + r"(?![A-Za-z])", text)
    ]
    for _, end in sorted(starts, reverse=True):
        rest = text[end:]
        stripped = rest.lstrip()
        if not stripped.startswith("{"):
            token = re.match(r"\s+([^\s$]+)", rest)  # `\boxed 5`
            if token:
                return token.group(1).rstrip(".")
            continue
        depth, begin = 0, end + len(rest) - len(stripped)
        for position in range(begin, len(text)):
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
                if depth == 0:
                    return text[begin + 1 : position]
        # Unbalanced: fall through to an earlier command.
    return None


def extract_math_answer(text: str) -> str | None:
    """The answer of a MATH-style solution: the last `\\boxed{...}` / `\\fbox{...}` (nested braces kept), else
    follows "The final answer is" (Minerva format, `$...$` removed). None when neither is present."""
    boxed = _last_braced_argument(text, ("\\boxed", "\\fbox"))
    if boxed is not None:
        return boxed.strip()
    final = _FINAL_ANSWER_RE.findall(text)
    if final:
        answer = final[-1].strip().rstrip(".").strip()
        if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
            answer = answer.strip("$").strip()
        boxed = _last_braced_argument(answer, ("\\boxed", "\\fbox"))
        return (boxed if boxed is not None else answer) or None
    return None


def _plain_number(text: str) -> Fraction | None:
    match = _PLAIN_NUMBER_RE.match(text)
    return Fraction(match.group(1).replace(",", "")) if match else None


def _normalised_text(text: str) -> str:
    text = re.sub(
        r"\\(?:left|right|!|,|;|:)|\\[dt]frac", lambda m: "\\frac" if "frac" in m.group() else "", text
    )
    return re.sub(r"\s+|\$|\.$", "", text)


def _for_math_verify(text: str) -> str:
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def is_equivalent(pred: str | None, gold: str) -> bool:
    """Whether the predicted answer equals the gold one: exact numbers compared exactly; otherwise math-verify
    (fractions vs decimals, \\dfrac, intervals, sets, expressions, units); else normalised string equality."""
    if pred is None or not pred.strip():
        return False
    pred_number, gold_number = _plain_number(pred), _plain_number(gold)
    if pred_number is not None and gold_number is not None:
        return pred_number == gold_number
    # math-verify's timeout uses SIGALRM, which only the main thread may set; elsewhere it runs without one.
    timeout = _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    math_verify = require("math_verify", "eval", needed_by="symbolic answer grading (sra_jax.data.grading)")
    parse, verify = math_verify.parse, math_verify.verify
    gold_parsed = parse(_for_math_verify(gold), parsing_timeout=timeout)
    pred_parsed = parse(_for_math_verify(pred), parsing_timeout=timeout)
    if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout):
        return True
    return _normalised_text(pred) == _normalised_text(gold)


def _exact(completion: str, gold: str) -> tuple[str | None, bool]:
    """The whole completion against the gold answer, whitespace-normalised (runs collapsed, ends stripped)."""
    pred = " ".join(completion.split())
    return pred or None, bool(pred) and pred == " ".join(gold.split())


def _numeric(completion: str, gold: str) -> tuple[str | None, bool]:
    """The final number of each (`extract_gsm8k_answer`: after `####`, after "The answer is", else the last number),
    compared exactly."""
    pred, want = extract_gsm8k_answer(completion), extract_gsm8k_answer(gold)
    return pred, want is not None and is_equivalent(pred, want)


def _math(completion: str, gold: str) -> tuple[str | None, bool]:
    """The completion's `\\boxed{}` / "final answer is" answer (`extract_math_answer`) against the gold's (or the
    whole gold when it has none), by `is_equivalent` (math-verify)."""
    pred = extract_math_answer(completion)
    return pred, is_equivalent(pred, extract_math_answer(gold) or gold.strip())


# name -> (completion text, gold answer text) -> (extracted answer or None, correct); `data.grader` picks one.
GRADERS = {"exact": _exact, "numeric": _numeric, "math": _math}


def grade_answer(grader: str, completion: str, gold: str) -> tuple[str | None, bool]:
    """(the answer extracted from `completion`, whether it matches `gold`) under the grader named `grader`."""
    if grader not in GRADERS:
        raise ValueError(f"grader {grader!r} must be one of {sorted(GRADERS)}")
    return GRADERS[grader](completion, gold)
