"""A Hugging Face `tokenizer.json` through the `tokenizers` library, with the checkpoint's chat template.

Read beside the tokenizer file, as transformers does: `tokenizer_config.json` (bos_token, eos_token, pad_token,
chat_template), `chat_template.jinja` (a chat template of its own, used when tokenizer_config.json has none) and
`generation_config.json` (eos_token_id: one id or a list; generation stops at any of them and at eos_token). The chat
template is rendered with jinja2 in a sandbox as transformers renders it (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII), with `messages`, `add_generation_prompt` and the
special tokens (`bos_token`, `eos_token`, ...) as variables.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Int

from sra_jax.extras import require

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
    return values


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """tokenizer_config.json's chat_template (a string, or a list of {name, template}: the one named "default"),
    else chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    file = folder / "chat_template.jinja"
    return file.read_text() if file.is_file() else None


def compile_chat_template(template: str):
    """A jinja2 template compiled in the sandbox transformers uses for chat templates (they come from checkpoints)."""
    jinja2 = require("jinja2", "data", needed_by="chat templates of tokenizer.json checkpoints")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


class HFTokenizer:
    """`tokenizer.json` (+ tokenizer_config.json, chat_template.jinja, generation_config.json beside it) with the
    interface of `sra_jax.data.tokenizer.Llama3Tokenizer`: encode / decode / encode_chat, bos_id, eos_id, pad_id,
    stop_ids, vocab_size. Special-token strings in text are read as their single ids (as transformers does)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        tokenizers = require("tokenizers", "data", needed_by="tokenizer.json tokenizers (sra_jax.data.hf_tokenizer)")
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust library raises its own Exception type for unreadable files
            raise ValueError(f"{path}: not a tokenizers tokenizer.json: {error}") from None
        self.path = path
        folder = path.parent
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        self.special_tokens = {key: text for key in SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key)))}
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id("bos_token", generation.get("bos_token_id"))
        self.eos_id = self._special_id("eos_token", generation.get("eos_token_id"))
        if self.eos_id is None:
            raise ValueError(f"{folder}: no eos token (eos_token in tokenizer_config.json or eos_token_id in "
                             f"generation_config.json); generation could not stop")
        pad = self._special_id("pad_token", None)
        self.pad_id = pad if pad is not None else self.eos_id
        stop = generation.get("eos_token_id")
        stop = stop if isinstance(stop, list) else [] if stop is None else [stop]
        for token in stop:
            if not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise ValueError(f"{folder / 'generation_config.json'}: eos_token_id {token!r} is not a token id of "
                                 f"this tokenizer (vocabulary {self.vocab_size})")
        self.stop_ids = tuple(sorted({self.eos_id, *stop}))
        self.chat_template = _chat_template(folder, config)
        self._compiled = None

    def _special_id(self, key: str, fallback: Any) -> int | None:
        """The id of tokenizer_config.json's `key` token, else `fallback` (generation_config.json's id; for a list
        its first)."""
        text = self.special_tokens.get(key)
        if text is not None:
            token = self.tokenizer.token_to_id(text)
            if token is None:
                raise ValueError(f"{self.path.parent / 'tokenizer_config.json'}: {key} {text!r} is not in the "
                                 f"vocabulary of {self.path}")
            return token
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return fallback if isinstance(fallback, int) else None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (no special tokens added by the tokenizer's post-processor), with bos / eos around
        it when asked."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{self.path.parent} defines no bos token (bos_token in tokenizer_config.json)")
            ids = [self.bos_id, *ids]
        return [*ids, self.eos_id] if eos else ids

    def decode(self, ids: Sequence[int] | Int[np.ndarray, " n"]) -> str:
        """Text of `ids`, special tokens written out."""
        for token in ids:
            if not 0 <= int(token) < self.vocab_size:
                raise ValueError(f"token id {int(token)} is outside the vocabulary of {self.vocab_size}")
        return self.tokenizer.decode([int(token) for token in ids], skip_special_tokens=False)

    def format_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat template rendered over `messages`."""
        if self.chat_template is None:
            raise ValueError(f"{self.path.parent} has no chat template (chat_template in tokenizer_config.json or "
                             f"chat_template.jinja)")
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ValueError(f"messages[{index}] must be a mapping with a string 'role', got {message!r}")
        return self._compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """Ids of `format_chat(messages, ...)` (the template writes bos itself when it wants one)."""
        return self.encode(self.format_chat(messages, add_generation_prompt=add_generation_prompt))
