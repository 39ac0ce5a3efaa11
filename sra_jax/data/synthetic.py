"""Seeded multi-hop reasoning problems: chains of variable bindings with arithmetic, hidden among distractors.

A problem reads `k=3;x=5;b=k+4;y=x*2;c=b*2;c?`. The answer (14) follows from the chain k=3 -> b=k+4 -> c=b*2;
the other statements are distractors, some of which read chain variables so that they look alike. The
characters of the chain statements are the problem's critical tokens: the ones a router should select.

Each problem is a pure function of (config, split, seed, index): data sets are reproducible and resumable. The
held-out split is defined by the chain's operator sequence (its template): each template with two or more hops
belongs to exactly one split, so test problems never share a chain structure with training problems.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import random
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from jaxtyping import Bool, Int

SPLITS = ("train", "test")
Split = Literal["train", "test"]  # public signatures take str and raise a ValueError naming a bad value
Form = Literal["direct", "cot"]

_VARIABLES = "abcdefghijklmnopqrstuvwxyz"
_OPERATORS = "+-*"
_MAX_HOPS = (
    10  # the held-out split enumerates all 3**hops templates of a hop count; 3**10 = 59049 stays cheap
)
_ANSWER_RE = re.compile(r"#\s*(-?\d+)")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty of the task: hops on the answer chain, distractor statements, and the range of values."""

    min_hops: int = 2
    max_hops: int = 4
    min_distractors: int = 2
    max_distractors: int = 6
    value_range: int = 20  # every value, intermediate or final, lies in [0, value_range)
    operand_max: int = 9  # operands of + - * lie in [0, operand_max]
    operators: str = _OPERATORS
    shuffle_chain: bool = False  # False: chain statements appear in dependency order; True: any order
    test_fraction: float = 0.25  # fraction of the templates of each hop count (>= 2) held out for "test"
    split_seed: int = 0  # fixes which templates are held out; independent of the sampling seed

    def __post_init__(self):
        if not 1 <= self.min_hops <= self.max_hops <= _MAX_HOPS:
            raise ValueError(
                f"need 1 <= min_hops ({self.min_hops}) <= max_hops ({self.max_hops}) <= {_MAX_HOPS}"
            )
        if not 0 <= self.min_distractors <= self.max_distractors:
            raise ValueError(
                f"need 0 <= min_distractors ({self.min_distractors}) <= "
                f"max_distractors ({self.max_distractors})"
            )
        if self.max_hops + 1 + self.max_distractors > len(_VARIABLES):
            raise ValueError(
                f"max_hops + 1 + max_distractors ({self.max_hops + 1 + self.max_distractors}) exceeds the "
                f"{len(_VARIABLES)} variable names"
            )
        if self.value_range < 2:
            raise ValueError(f"value_range ({self.value_range}) must be >= 2")
        if self.operand_max < 1:
            raise ValueError(f"operand_max ({self.operand_max}) must be >= 1")
        if (
            not self.operators
            or set(self.operators) - set(_OPERATORS)
            or len(set(self.operators)) != len(self.operators)
        ):
            raise ValueError(f"operators ({self.operators!r}) must be distinct characters of {_OPERATORS!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction ({self.test_fraction}) must lie in (0, 1)")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: question, integer answer, target texts and the character spans of the answer chain."""

    question: str  # e.g. "k=3;x=5;b=k+4;c=b*2;c?"
    answer: int
    cot: str  # e.g. "b=7 c=14 #14": each hop's value, then the answer
    direct: str  # e.g. "#14"
    template: str  # operator sequence of the chain, e.g. "+*"
    critical_spans: tuple[
        tuple[int, int], ...
    ]  # [start, end) character spans of the chain statements in `question`
    chain: tuple[str, ...]  # variable names along the chain, root first; the last one is asked for

    @property
    def hops(self) -> int:
        return len(self.template)

    def target(self, form: str) -> str:
        if form not in ("direct", "cot"):
            raise ValueError(f"form must be 'direct' or 'cot', got {form!r}")
        return self.direct if form == "direct" else self.cot

    def critical_char_mask(self) -> np.ndarray:
        """Bool [len(question)]: True on the characters of the chain statements."""
        mask = np.zeros(len(self.question), dtype=bool)
        for start, end in self.critical_spans:
            mask[start:end] = True
        return mask

    def critical_token_indices(self, offset: int = 1) -> Int[np.ndarray, " c"]:
        """Token indices of the chain statements in `bos question sep ...` (offset 1 skips the bos)."""
        return (np.flatnonzero(self.critical_char_mask()) + offset).astype(np.int32)


def _stable_hash(*parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@functools.lru_cache(maxsize=64)
def _heldout_templates(operators: str, hops: int, test_fraction: float, split_seed: int) -> frozenset[str]:
    """The templates of `hops` operators held out for "test": the lowest-hashing `test_fraction` of them."""
    if hops < 2:
        return frozenset()  # a single operator is a building block every split must see
    templates = sorted(
        ("".join(ops) for ops in itertools.product(operators, repeat=hops)),
        key=lambda t: _stable_hash(split_seed, t),
    )
    count = min(len(templates) - 1, max(1, round(test_fraction * len(templates))))
    return frozenset(templates[:count])


def template_split(config: SyntheticConfig, template: str) -> str:
    """Which split a chain template belongs to."""
    held_out = _heldout_templates(config.operators, len(template), config.test_fraction, config.split_seed)
    return "test" if template in held_out else "train"


def split_templates(config: SyntheticConfig, split: str) -> list[str]:
    """All templates of `split` over the configured hop counts (sorted)."""
    return sorted(
        "".join(ops)
        for hops in range(config.min_hops, config.max_hops + 1)
        for ops in itertools.product(config.operators, repeat=hops)
        if template_split(config, "".join(ops)) == split
    )


def _apply(op: str, left: int, operand: int) -> int:
    return left + operand if op == "+" else left - operand if op == "-" else left * operand


def _operands(op: str, left: int, value_range: int, operand_max: int) -> range:
    """Non-trivial operands (k >= 1 for + -, k >= 2 for *) keeping `left op k` inside [0, value_range)."""
    top = value_range - 1
    if op == "+":
        return range(1, min(operand_max, top - left) + 1)
    if op == "-":
        return range(1, min(operand_max, left) + 1)
    return range(2, (operand_max if left == 0 else min(operand_max, top // left)) + 1)


@functools.lru_cache(maxsize=65536)
def _feasible_start(template: str, value_range: int, operand_max: int) -> frozenset[int]:
    """The values from which every step of `template` can use a non-trivial operand (cached by suffix)."""
    if not template:
        return frozenset(range(value_range))
    after = _feasible_start(template[1:], value_range, operand_max)
    op = template[0]
    return frozenset(
        v
        for v in range(value_range)
        if any(_apply(op, v, k) in after for k in _operands(op, v, value_range, operand_max))
    )


def _operand(rng: random.Random, config: SyntheticConfig, op: str, left: int, wanted: frozenset[int]) -> int:
    """An operand keeping `left op operand` in [0, value_range), non-trivial where possible, preferring
    results in `wanted` (values from which the rest of the chain stays non-trivial: no `*1`, `+0`)."""
    candidates = _operands(op, left, config.value_range, config.operand_max)
    if not candidates:
        return 0 if op in "+-" else 1
    good = [k for k in candidates if _apply(op, left, k) in wanted]
    return rng.choice(good or candidates)


def _rng_for(seed: int, split: str, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across processes and Python versions.
    return random.Random(f"sra-synthetic:{seed}:{split}:{index}")


def make_problem(config: SyntheticConfig, split: str, seed: int, index: int) -> Problem:
    """Problem number `index` of `split` for `seed`; a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = _rng_for(seed, split, index)
    hop_choices = list(range(config.min_hops, config.max_hops + 1))
    if split == "test":
        hop_choices = [h for h in hop_choices if h >= 2]
        if not hop_choices:
            raise ValueError(f"the test split needs max_hops >= 2, got max_hops={config.max_hops}")
    hops = rng.choice(hop_choices)
    # Rejection sampling is uniform over the split's templates and cheap: each split holds >= 1 in 3**hops.
    while template_split(config, template := "".join(rng.choices(config.operators, k=hops))) != split:
        pass
    num_distractors = rng.randint(config.min_distractors, config.max_distractors)
    names = rng.sample(_VARIABLES, hops + 1 + num_distractors)
    chain, distractor_names = names[: hops + 1], names[hops + 1 :]

    feasible = [
        _feasible_start(template[i:], config.value_range, config.operand_max) for i in range(hops + 1)
    ]
    values: dict[str, int] = {chain[0]: rng.choice(sorted(feasible[0]) or range(config.value_range))}
    chain_statements = [f"{chain[0]}={values[chain[0]]}"]
    for op, wanted, source, name in zip(template, feasible[1:], chain[:-1], chain[1:]):
        operand = _operand(rng, config, op, values[source], wanted)
        values[name] = _apply(op, values[source], operand)
        chain_statements.append(f"{name}={source}{op}{operand}")

    # Statement order: chain statements (in dependency order unless shuffled), distractors at random slots.
    total = len(chain_statements) + num_distractors
    chain_slots = sorted(rng.sample(range(total), len(chain_statements)))
    chain_order = list(range(len(chain_statements)))
    if config.shuffle_chain:
        rng.shuffle(chain_order)
    slot_to_chain = dict(zip(chain_slots, chain_order))
    defined_before: list[str] = []
    statements: list[tuple[str, bool]] = []
    distractors = iter(distractor_names)
    for slot in range(total):
        if slot in slot_to_chain:
            index_in_chain = slot_to_chain[slot]
            statements.append((chain_statements[index_in_chain], True))
            defined_before.append(chain[index_in_chain])
            continue
        name = next(distractors)
        source = rng.choice(defined_before) if defined_before else None
        ops = [
            op
            for op in config.operators
            if source is not None and _operands(op, values[source], config.value_range, config.operand_max)
        ]
        if ops and rng.random() < 0.5:  # derived from an earlier variable, possibly a chain one
            op = rng.choice(ops)
            operand = _operand(rng, config, op, values[source], feasible[-1])
            values[name] = _apply(op, values[source], operand)
            statements.append((f"{name}={source}{op}{operand}", False))
        else:
            values[name] = rng.randrange(config.value_range)
            statements.append((f"{name}={values[name]}", False))
        defined_before.append(name)

    question, spans = "", []
    for text, on_chain in statements:
        if on_chain:
            spans.append((len(question), len(question) + len(text)))
        question += text + ";"
    question += f"{chain[-1]}?"
    answer = values[chain[-1]]
    cot = " ".join(f"{name}={values[name]}" for name in chain[1:]) + f" #{answer}"
    return Problem(
        question=question,
        answer=answer,
        cot=cot,
        direct=f"#{answer}",
        template=template,
        critical_spans=tuple(spans),
        chain=tuple(chain),
    )


def generate(
    config: SyntheticConfig, num: int, *, split: str = "train", seed: int = 0, start: int = 0
) -> list[Problem]:
    """Problems `start .. start+num-1` of `split` for `seed`."""
    return [make_problem(config, split, seed, index) for index in range(start, start + num)]


def extract_synthetic_answer(text: str) -> int | None:
    """The integer after the last `#` in a model's output, or None when there is none."""
    matches = _ANSWER_RE.findall(text)
    return int(matches[-1]) if matches else None


def grade(text: str, answer: int) -> bool:
    """Whether the output `text` ends its reasoning with the right `#answer`."""
    return extract_synthetic_answer(text) == answer


class SyntheticTokenizer:
    """Character-level tokenizer over printable ASCII plus pad/bos/eos/sep; `vocab_size` is 99."""

    pad_id, bos_id, eos_id, sep_id = 0, 1, 2, 3
    _first_char, _last_char = 32, 126  # printable ASCII ' ' .. '~'
    _offset = 4

    @property
    def vocab_size(self) -> int:
        return self._offset + self._last_char - self._first_char + 1

    def encode(self, text: str) -> list[int]:
        ids = []
        for char in text:
            code = ord(char)
            if not self._first_char <= code <= self._last_char:
                raise ValueError(f"character {char!r} is not printable ASCII and has no id")
            ids.append(code - self._first_char + self._offset)
        return ids

    def decode(self, ids: Sequence[int] | Int[np.ndarray, " n"], *, stop_at_eos: bool = True) -> str:
        """Text of `ids`, skipping pad/bos/sep; stops at the first eos unless `stop_at_eos=False`."""
        chars = []
        for token in (int(i) for i in ids):
            if token == self.eos_id and stop_at_eos:
                break
            if token >= self._offset:
                if token >= self.vocab_size:
                    raise ValueError(f"token id {token} is outside the vocabulary of {self.vocab_size}")
                chars.append(chr(token - self._offset + self._first_char))
        return "".join(chars)

    def prompt_ids(self, problem: Problem) -> list[int]:
        """`bos question sep`: what a model sees before it answers."""
        return [self.bos_id, *self.encode(problem.question), self.sep_id]


@dataclasses.dataclass(frozen=True)
class SyntheticBatch:
    """Fixed-shape numpy batch. Token t is predicted from logits at t-1: CE(logits[:, :-1], tokens[:, 1:])
    masked by loss_mask[:, 1:]."""

    tokens: Int[np.ndarray, "b s"]  # bos question sep target eos, then pad
    positions: Int[np.ndarray, "b s"]  # 0.. on real tokens, -1 on padding
    loss_mask: Bool[np.ndarray, "b s"]  # True on target tokens and the eos
    critical: Bool[np.ndarray, "b s"]  # True on the characters of the chain statements
    prompt_lengths: Int[np.ndarray, " b"]  # length of `bos question sep`
    answers: Int[np.ndarray, " b"]


def make_batch(
    problems: Sequence[Problem], tokenizer: SyntheticTokenizer, seq_len: int, *, form: str = "direct"
) -> SyntheticBatch:
    """Right-padded batch of `bos question sep target eos`; raises if a problem does not fit in `seq_len`."""
    if not problems:
        raise ValueError("make_batch needs at least one problem")
    tokens = np.full((len(problems), seq_len), tokenizer.pad_id, dtype=np.int32)
    positions = np.full((len(problems), seq_len), -1, dtype=np.int32)
    loss_mask = np.zeros((len(problems), seq_len), dtype=bool)
    critical = np.zeros((len(problems), seq_len), dtype=bool)
    prompt_lengths = np.zeros(len(problems), dtype=np.int32)
    for row, problem in enumerate(problems):
        prompt = tokenizer.prompt_ids(problem)
        target = tokenizer.encode(problem.target(form)) + [tokenizer.eos_id]
        length = len(prompt) + len(target)
        if length > seq_len:
            raise ValueError(
                f"problem {row} needs {length} tokens but seq_len is {seq_len}: {problem.question!r}"
            )
        tokens[row, :length] = prompt + target
        positions[row, :length] = np.arange(length)
        loss_mask[row, len(prompt) : length] = True
        critical[row, 1 : 1 + len(problem.question)] = problem.critical_char_mask()  # offset 1: after bos
        prompt_lengths[row] = len(prompt)
    answers = np.array([p.answer for p in problems], dtype=np.int32)
    return SyntheticBatch(tokens, positions, loss_mask, critical, prompt_lengths, answers)


def max_length(config: SyntheticConfig, form: str = "cot") -> int:
    """An upper bound on `bos question sep target eos` in tokens for problems of `config`."""
    value_digits = len(str(config.value_range - 1))
    operand_digits = len(str(config.operand_max))
    statement = 2 + max(value_digits, 2 + operand_digits) + 1  # "x=" + body + ";"
    question = (config.max_hops + 1 + config.max_distractors) * statement + 2
    target = (config.max_hops * (2 + value_digits + 1) if form == "cot" else 0) + 1 + value_digits
    return 1 + question + 1 + target + 1


class SyntheticBatches:
    """Endless fixed-shape batches of fresh problems: batch n holds problems [n*b, (n+1)*b) of `split` and
    `seed`. The state (next problem index, seed) goes into checkpoints; `set_state` resumes the stream."""

    def __init__(
        self,
        config: SyntheticConfig,
        tokenizer: SyntheticTokenizer,
        *,
        batch_size: int,
        seq_len: int,
        form: str = "direct",
        split: str = "train",
        seed: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1")
        if seq_len < max_length(config, form):
            raise ValueError(
                f"seq_len ({seq_len}) is below max_length(config, {form!r}) = {max_length(config, form)}"
            )
        self.config, self.tokenizer = config, tokenizer
        self.batch_size, self.seq_len, self.form, self.split = batch_size, seq_len, form, split
        self.seed, self.index = seed, 0

    def get_state(self) -> dict[str, int]:
        return {"index": self.index, "seed": self.seed}

    def set_state(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state seed ({state['seed']}) differs from this stream's seed ({self.seed})")
        if int(state["index"]) < 0:
            raise ValueError(f"state index ({state['index']}) must be >= 0")
        self.index = int(state["index"])

    def __iter__(self) -> SyntheticBatches:
        return self

    def __next__(self) -> SyntheticBatch:
        problems = generate(self.config, self.batch_size, split=self.split, seed=self.seed, start=self.index)
        self.index += self.batch_size
        return make_batch(problems, self.tokenizer, self.seq_len, form=self.form)
