"""Long-context multi-hop lookup with a known answer key: the task where attention selection is necessary and checkable.

A prompt of exactly `context_len` tokens is a straight-line program of single-assignment statements over variables
`x0 .. x{num_vars-1}` (one token each) and values `0 .. value_range-1` (one token each, arithmetic mod value_range):

    bos ? xq ;   x3 = 7 ;  x9 = x3 + 2 ;  x5 = x1 ;  . . .  x12 = x9 - 1 ;  . . .   ? xq =   ->  answer
    `- header -'  `------ body: the chain's hops among look-alike distractors -------'  `tail-'

The answer chain has `hops` statements: a constant binding, then each later hop reads the previous chain variable
(`xb = xa`, pointer chasing, or `xb = xa + n` / `xb = xa - n`, arithmetic). Its hops sit at random places of the body,
in program order; every other statement is a distractor of the same forms over other variables (distractor chains
among themselves), so a model that looks only at a window of w << context_len tokens cannot answer. The query variable
is named in the header (4 tokens: inside `SRAConfig.num_global` >= 4, so every token can know the question) and again
in the tail right before the answer.

Every token is one symbol of a built-in vocabulary (`LonghopTokenizer`), so the oracle critical set (the positions of
the chain statements' tokens) is exact. The Llama 3 tokenizer is not supported: its BPE merges digits and names, so
token positions would no longer be symbol positions; `LonghopTokenizer.to_text` renders a prompt for reading only.

Splits (disjoint by construction): "train"; "test" (same distribution, another random stream); "new_values" (the
chain's constant is from values the train split never uses as a chain constant); "more_hops" (1 to
`extra_test_hops` more hops than `max_hops`); "longer" (context of `longer_context_len` tokens). Forms: "direct"
(target = answer) and "cot" (target = `xa va xb vb ... > answer`: each hop's variable and value, then the answer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

import numpy as np
from jaxtyping import Bool, Int

SPLITS: tuple[str, ...] = ("train", "test", "new_values", "more_hops", "longer")
FORMS: tuple[str, ...] = ("direct", "cot")
HEADER_LEN, TAIL_LEN = 4, 3  # `bos ? xq ;` and `? xq =`
OPS = ("copy", "+", "-")
# Values v with v % HELD_OUT_MODULUS == HELD_OUT_MODULUS - 1 are never a chain constant in the train split.
HELD_OUT_MODULUS = 4


@dataclasses.dataclass(frozen=True)
class LonghopConfig:
    """The task's size: prompt length, hops on the answer chain, vocabulary of variables and values."""

    context_len: int = 256
    min_hops: int = 1
    max_hops: int = 2
    num_vars: int = 128
    value_range: int = 16
    operand_max: int = 3
    extra_test_hops: int = 2
    longer_context_len: int = 512

    def __post_init__(self):
        if not 1 <= self.min_hops <= self.max_hops:
            raise ValueError(f"longhop: need 1 <= min_hops <= max_hops, got min_hops={self.min_hops}, "
                             f"max_hops={self.max_hops}")
        if self.value_range < 2 * HELD_OUT_MODULUS:
            raise ValueError(f"longhop.value_range={self.value_range} must be >= {2 * HELD_OUT_MODULUS}")
        if not 1 <= self.operand_max < self.value_range:
            raise ValueError(f"longhop.operand_max={self.operand_max} must be in [1, value_range)")
        if self.extra_test_hops < 1:
            raise ValueError(f"longhop.extra_test_hops={self.extra_test_hops} must be >= 1")
        if self.longer_context_len <= self.context_len:
            raise ValueError(f"longhop.longer_context_len={self.longer_context_len} must exceed "
                             f"context_len={self.context_len}")
        # Room for the longest chain (6 tokens a hop) in the shorter context.
        needed = HEADER_LEN + TAIL_LEN + 6 * (self.max_hops + self.extra_test_hops)
        if self.context_len < needed:
            raise ValueError(f"longhop.context_len={self.context_len} must be >= {needed} (header, tail and "
                             f"{self.max_hops + self.extra_test_hops} hops of up to 6 tokens)")
        statements = max_statements(self.longer_context_len)
        if self.num_vars < statements:
            raise ValueError(f"longhop.num_vars={self.num_vars} must be >= {statements}: every statement of a "
                             f"{self.longer_context_len}-token prompt binds a new variable")

    def context_for(self, split: str) -> int:
        return self.longer_context_len if split == "longer" else self.context_len

    def hops_range(self, split: str) -> tuple[int, int]:
        if split == "more_hops":
            return self.max_hops + 1, self.max_hops + self.extra_test_hops
        return self.min_hops, self.max_hops


def max_statements(context_len: int) -> int:
    """Most statements a prompt of `context_len` holds (the shortest statement has 4 tokens)."""
    return (context_len - HEADER_LEN - TAIL_LEN) // 4


class LonghopTokenizer:
    """One token per symbol: pad bos eos = ; + - ? . >, then values 0..value_range-1, then variables."""

    pad_id, bos_id, eos_id, eq_id, semi_id, plus_id, minus_id, query_id, filler_id, then_id = range(10)
    _symbols = ("<pad>", "<bos>", "<eos>", "=", ";", "+", "-", "?", ".", ">")

    def __init__(self, config: LonghopConfig):
        self.value_range, self.num_vars = config.value_range, config.num_vars

    @property
    def vocab_size(self) -> int:
        return len(self._symbols) + self.value_range + self.num_vars

    def value(self, v: int | np.integer) -> int:
        return len(self._symbols) + int(v)

    def var(self, i: int | np.integer) -> int:
        return len(self._symbols) + self.value_range + int(i)

    def is_value(self, token: int | np.integer) -> bool:
        return bool(len(self._symbols) <= token < len(self._symbols) + self.value_range)

    def is_var(self, token: int | np.integer) -> bool:
        return bool(len(self._symbols) + self.value_range <= token < self.vocab_size)

    def value_of(self, token: int | np.integer) -> int:
        return int(token) - len(self._symbols)

    def var_of(self, token: int | np.integer) -> int:
        return int(token) - len(self._symbols) - self.value_range

    def to_text(self, ids) -> str:
        """A readable rendering (`x7 = 3 ;`) of token ids; for humans, not for another tokenizer."""
        words = []
        for token in (int(t) for t in ids):
            if token >= self.vocab_size or token < 0:
                raise ValueError(f"token id {token} is outside the vocabulary of {self.vocab_size}")
            if self.is_value(token):
                words.append(str(self.value_of(token)))
            elif self.is_var(token):
                words.append(f"x{self.var_of(token)}")
            else:
                words.append(self._symbols[token])
        return " ".join(words)


@dataclasses.dataclass(frozen=True)
class LonghopExample:
    """One problem: the prompt (exactly context_len ids), its oracle critical positions, the answer and the chain."""

    prompt: Int[np.ndarray, " n"]
    critical: Int[np.ndarray, " c"]  # positions in `prompt` of every token of the chain's statements, ascending
    answer: int
    chain_vars: tuple[int, ...]  # variable numbers of the hops, in program order (the last is the query)
    chain_values: tuple[int, ...]
    split: str

    @property
    def hops(self) -> int:
        return len(self.chain_vars)

    def target(self, tokenizer: LonghopTokenizer, form: str) -> list[int]:
        """Target ids before eos: the answer ("direct"), or each hop's variable and value then `> answer` ("cot")."""
        if form not in FORMS:
            raise ValueError(f"form={form!r} must be one of {FORMS}")
        answer = [tokenizer.value(self.answer)]
        if form == "direct":
            return answer
        steps = [t for var, value in zip(self.chain_vars, self.chain_values)
                 for t in (tokenizer.var(var), tokenizer.value(value))]
        return [*steps, tokenizer.then_id, *answer]


def _rng_for(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"longhop/{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _statement(tok: LonghopTokenizer, target: int, source: int | None, op: str, operand: int) -> list[int]:
    """`x_target = value ;` when source is None (operand is the value), else copy / `+ n` / `- n` of x_source."""
    if source is None:
        return [tok.var(target), tok.eq_id, tok.value(operand), tok.semi_id]
    if op == "copy":
        return [tok.var(target), tok.eq_id, tok.var(source), tok.semi_id]
    return [tok.var(target), tok.eq_id, tok.var(source), tok.plus_id if op == "+" else tok.minus_id,
            tok.value(operand), tok.semi_id]


def _apply(op: str, value: int, operand: int, value_range: int) -> int:
    return {"copy": value, "+": value + operand, "-": value - operand}[op] % value_range


def make_example(config: LonghopConfig, split: str, seed: int, index: int) -> LonghopExample:
    """Problem `index` of `split` for `seed`: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    rng = _rng_for(seed, split, index)
    tok = LonghopTokenizer(config)
    context_len = config.context_for(split)
    hops = rng.randint(*config.hops_range(split))
    body_len = context_len - HEADER_LEN - TAIL_LEN
    variables = rng.sample(range(config.num_vars), max_statements(context_len))
    chain_vars = variables[:hops]
    free_vars = variables[hops:]

    held_out = [v for v in range(config.value_range) if v % HELD_OUT_MODULUS == HELD_OUT_MODULUS - 1]
    seen = [v for v in range(config.value_range) if v % HELD_OUT_MODULUS != HELD_OUT_MODULUS - 1]
    value = rng.choice(held_out if split == "new_values" else seen)
    chain = [_statement(tok, chain_vars[0], None, "const", value)]
    chain_values = [value]
    for h in range(1, hops):
        op, operand = rng.choice(OPS), rng.randint(1, config.operand_max)
        chain.append(_statement(tok, chain_vars[h], chain_vars[h - 1], op, operand))
        value = _apply(op, value, operand, config.value_range)
        chain_values.append(value)

    # Distractors of the same forms fill the body; each reads an earlier distractor variable or is a constant.
    budget = body_len - sum(len(s) for s in chain)
    distractors, bound = [], []
    while free_vars:
        op = rng.choice(("const", *OPS)) if bound else "const"
        size = 6 if op in ("+", "-") else 4
        if size > budget:
            if budget < 4:
                break
            op, size = "const", 4
        target = free_vars.pop()
        source = None if op == "const" else rng.choice(bound)
        operand = rng.randrange(config.value_range) if op == "const" else rng.randint(1, config.operand_max)
        distractors.append(_statement(tok, target, source, op, operand))
        bound.append(target)
        budget -= size
    # Chain hops go to random slots among the distractors, in program order; the leftover budget becomes filler
    # tokens between statements, so the prompt is exactly context_len long.
    slots = sorted(rng.sample(range(len(distractors) + hops), hops))
    statements, d = [], iter(distractors)
    for i in range(len(distractors) + hops):
        statements.append(("chain", chain[slots.index(i)]) if i in slots else ("distractor", next(d)))
    gaps = [0] * (len(statements) + 1)
    for _ in range(budget):
        gaps[rng.randrange(len(gaps))] += 1

    query = tok.var(chain_vars[-1])
    prompt = [tok.bos_id, tok.query_id, query, tok.semi_id]
    critical: list[int] = []
    for (kind, ids), gap in zip(statements, gaps):
        prompt.extend([tok.filler_id] * gap)
        if kind == "chain":
            critical.extend(range(len(prompt), len(prompt) + len(ids)))
        prompt.extend(ids)
    prompt.extend([tok.filler_id] * gaps[-1])
    prompt.extend([tok.query_id, query, tok.eq_id])
    if len(prompt) != context_len:
        raise RuntimeError(f"longhop built a prompt of {len(prompt)} tokens, expected {context_len}")
    return LonghopExample(np.asarray(prompt, np.int32), np.asarray(critical, np.int32), chain_values[-1],
                          tuple(chain_vars), tuple(chain_values), split)


def generate(config: LonghopConfig, count: int, *, split: str = "test", seed: int = 0,
             start: int = 0) -> list[LonghopExample]:
    """Problems start .. start+count-1 of `split`."""
    return [make_example(config, split, seed, i) for i in range(start, start + count)]


def solve(tokenizer: LonghopTokenizer, ids, query_var: int) -> int | None:
    """The value of x`query_var` after running the statements in `ids` (a prompt or any subsequence of one);
    None when it is never bound or reads an unbound variable. The reference interpreter for the answer key."""
    values: dict[int, int] = {}
    ids = [int(t) for t in ids]
    i = 0
    while i < len(ids):
        if i + 3 < len(ids) and tokenizer.is_var(ids[i]) and ids[i + 1] == tokenizer.eq_id:
            target, rhs = tokenizer.var_of(ids[i]), ids[i + 2]
            if tokenizer.is_value(rhs) and ids[i + 3] == tokenizer.semi_id:
                values[target] = tokenizer.value_of(rhs)
                i += 4
                continue
            if tokenizer.is_var(rhs) and ids[i + 3] == tokenizer.semi_id:
                if tokenizer.var_of(rhs) in values:
                    values[target] = values[tokenizer.var_of(rhs)]
                i += 4
                continue
            if (tokenizer.is_var(rhs) and i + 5 < len(ids) and ids[i + 3] in (tokenizer.plus_id, tokenizer.minus_id)
                    and tokenizer.is_value(ids[i + 4]) and ids[i + 5] == tokenizer.semi_id):
                source = tokenizer.var_of(rhs)
                if source in values:
                    op = "+" if ids[i + 3] == tokenizer.plus_id else "-"
                    values[target] = _apply(op, values[source], tokenizer.value_of(ids[i + 4]), tokenizer.value_range)
                i += 6
                continue
        i += 1
    return values.get(query_var)


@dataclasses.dataclass(frozen=True)
class LonghopBatch:
    """Fixed-shape numpy batch in the `SyntheticBatch` convention: token t is predicted from logits at t-1 and
    counts when loss_mask[:, t]."""

    tokens: Int[np.ndarray, "b s"]  # prompt, target, eos, then pad
    positions: Int[np.ndarray, "b s"]  # 0.. on real tokens, -1 on padding
    loss_mask: Bool[np.ndarray, "b s"]  # True on the target tokens and the eos
    oracle: Bool[np.ndarray, "b s"]  # True at the oracle critical positions
    prompt_lengths: Int[np.ndarray, " b"]
    answers: Int[np.ndarray, " b"]
    hops: Int[np.ndarray, " b"]


def target_length(config: LonghopConfig, form: str, split: str = "train") -> int:
    """Most target tokens (eos included) of `split` in `form`."""
    hops = config.hops_range(split)[1]
    return 2 if form == "direct" else 2 * hops + 3


def sequence_length(config: LonghopConfig, form: str, split: str = "train") -> int:
    """Prompt + longest target + eos of `split`."""
    return config.context_for(split) + target_length(config, form, split)


def make_batch(examples: list[LonghopExample], config: LonghopConfig, seq_len: int,
               form: str = "direct") -> LonghopBatch:
    """Examples as rows `prompt target eos`, right-padded to `seq_len`."""
    if form not in FORMS:
        raise ValueError(f"form={form!r} must be one of {FORMS}")
    tok = LonghopTokenizer(config)
    n = len(examples)
    tokens = np.full((n, seq_len), tok.pad_id, np.int32)
    positions = np.full((n, seq_len), -1, np.int32)
    loss_mask = np.zeros((n, seq_len), bool)
    oracle = np.zeros((n, seq_len), bool)
    for row, example in enumerate(examples):
        ids = [*example.prompt.tolist(), *example.target(tok, form), tok.eos_id]
        if len(ids) > seq_len:
            raise ValueError(f"seq_len={seq_len} is too short for a {len(ids)}-token {example.split!r} example")
        tokens[row, :len(ids)] = ids
        positions[row, :len(ids)] = np.arange(len(ids))
        loss_mask[row, len(example.prompt):len(ids)] = True
        oracle[row, example.critical] = True
    return LonghopBatch(tokens, positions, loss_mask, oracle,
                        np.array([len(e.prompt) for e in examples], np.int32),
                        np.array([e.answer for e in examples], np.int32),
                        np.array([e.hops for e in examples], np.int32))


def random_critical(oracle: Bool[np.ndarray, "b s"], positions: Int[np.ndarray, "b s"], fraction: float,
                    seed: int) -> Bool[np.ndarray, "b s"]:
    """A uniformly random critical set of ceil(fraction * valid tokens) positions per row (the random baseline at
    a matched budget; `oracle` only gives the shape)."""
    rng = np.random.default_rng(seed)
    chosen = np.zeros(oracle.shape, bool)
    for row in range(oracle.shape[0]):
        valid = np.flatnonzero(positions[row] >= 0)
        k = max(1, min(len(valid), int(np.ceil(fraction * len(valid) - 1e-9))))
        chosen[row, rng.choice(valid, size=k, replace=False)] = True
    return chosen
