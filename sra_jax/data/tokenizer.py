"""The Llama 3 tokenizer: tiktoken BPE ranks from `tokenizer.model`, Llama 3 special tokens and chat format.

Facts from the Llama 3 specification (meta-llama/llama-models, models/llama3/tokenizer.py): the pre-tokeniser
pattern below, 256 special tokens numbered after the 128000 BPE ranks, in the order of `_NAMED_SPECIAL_TOKENS`
followed by `<|reserved_special_token_2|>` .. `<|reserved_special_token_245|>`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

import numpy as np
from jaxtyping import Int

from sra_jax.extras import require

tiktoken = require("tiktoken", "data", needed_by="the Llama 3 tokenizer (sra_jax.data.tokenizer)")

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)
CHAT_ROLES = ("system", "user", "assistant", "ipython", "tool")
# tiktoken panics on very long runs of whitespace or non-whitespace, so encode splits them (a no-op on prose).
_MAX_RUN_CHARS = 25_000


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Name -> id of the 256 Llama 3 special tokens, numbered from `num_base_tokens`."""
    reserved = [
        f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
    ]
    return {name: num_base_tokens + i for i, name in enumerate([*_NAMED_SPECIAL_TOKENS, *reserved])}


def load_bpe_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file: one `<base64 token> <rank>` per line."""
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as error:
            raise ValueError(
                f"{path}:{line_number}: expected '<base64 token> <rank>', got {line[:80]!r}"
            ) from error
    return ranks


def _split_long_runs(text: str) -> Iterator[str]:
    """Pieces of `text` in which no run of whitespace or of non-whitespace exceeds `_MAX_RUN_CHARS`."""
    start = 0
    for run in re.finditer(r"\s+|\S+", text):
        if run.end() - run.start() > _MAX_RUN_CHARS:
            for cut in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                yield text[start:cut]
                start = cut
    yield text[start:]


class Llama3Tokenizer:
    """Llama 3 tokenizer over a `tokenizer.model` file; `vocab_size` is 128256 for the released file."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Llama 3 tokenizer file not found: {path}")
        ranks = load_bpe_ranks(path)
        self.special_tokens = llama3_special_tokens(len(ranks))
        self.encoding = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.num_base_tokens = len(ranks)
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.start_header_id = self.special_tokens["<|start_header_id|>"]
        self.end_header_id = self.special_tokens["<|end_header_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        self.stop_ids = (self.eos_id, self.eom_id, self.eot_id)  # generation ends at any of these

    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
    ) -> list[int]:
        """Token ids of `text`. Special-token strings not in `allowed_special` are encoded as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for piece in _split_long_runs(text):
            ids.extend(self.encoding.encode(piece, allowed_special=allowed_special, disallowed_special=()))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int] | Int[np.ndarray, " n"]) -> str:
        """Text of `ids` (special tokens are written out by name); bytes that are not UTF-8 become U+FFFD."""
        for token in ids:
            if not 0 <= int(token) < self.vocab_size:
                raise ValueError(f"token id {int(token)} is outside the vocabulary of {self.vocab_size}")
        return self.encoding.decode([int(token) for token in ids])

    def format_chat(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The Llama 3 chat text of `messages` (see the module function `format_chat`)."""
        return format_chat(messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Ids of `format_chat(messages, ...)`, with the special tokens as single ids."""
        return self.encode(
            format_chat(messages, add_generation_prompt=add_generation_prompt), allowed_special="all"
        )


def format_chat(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
    """Llama 3 chat text: `<|begin_of_text|>` then per message `<|start_header_id|>ROLE<|end_header_id|>\\n\\n
    CONTENT<|eot_id|>` (content stripped), then an open assistant header when `add_generation_prompt`."""
    parts = ["<|begin_of_text|>"]
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{index}]['role'] is {role!r}; expected one of {CHAT_ROLES}")
        if not isinstance(content, str):
            raise TypeError(f"messages[{index}]['content'] must be a str, got {type(content).__name__}")
        parts.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>")
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)
