"""The user's own prompt / answer data: jsonl files and any `datasets.load_dataset` source, as supervised examples.

Each row (a jsonl line, a data set row) holds either a prompt and an answer (field names chosen by the caller) or a
chat, a list of `{role, content}` messages whose last one is the assistant's answer (the target). Every problem with
a file or a row is a ValueError naming the file, line (or row) and field.

Tokenised two ways (`tokenize_record`):
- plain: `bos prompt` then ` answer eos`, the loss on the answer and eos;
- chat (chat rows, or any row with `chat=True`): the prompt is the chat template over the messages before the answer
  with the generation prompt open; the target is what the template writes for the final assistant message (its
  content and end-of-turn tokens), so the loss covers exactly the assistant's turn.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sra_jax.extras import require


@dataclasses.dataclass(frozen=True)
class Fields:
    """Where a row keeps its prompt and answer, or its chat."""

    prompt: str = "prompt"
    answer: str = "answer"
    messages: str = "messages"


@dataclasses.dataclass(frozen=True)
class Record:
    """One example. `messages`: the conversation before the answer (chat rows), else None and `prompt` holds the
    prompt text; `answer`: the target text (the gold answer the graders compare with); `where`: "file:line" or
    "source row N", for error messages."""

    prompt: str | None
    messages: tuple[Mapping[str, Any], ...] | None
    answer: str
    where: str


def _text_field(row: Mapping[str, Any], field: str, key: str, where: str) -> str:
    if field not in row:
        raise ValueError(f"{where}: no field {field!r} ({key}); the row has fields {sorted(row)}")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: field {field!r} ({key}) must be a string, got {type(value).__name__} {value!r}")
    return str(value)


def record_from_row(row: Any, where: str, fields: Fields = Fields()) -> Record:
    """One row as a Record (see the module docstring); ValueError naming `where` and the field when it is not one."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: each row must be a JSON object, got {type(row).__name__}")
    if row.get(fields.messages) is not None:
        messages = row[fields.messages]
        key = f"field {fields.messages!r} (data.messages_field)"
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError(f"{where}: {key} must be a list of at least two messages (a prompt and the assistant's "
                             f"answer), got {messages!r}")
        for index, message in enumerate(messages):
            if (not isinstance(message, Mapping) or not isinstance(message.get("role"), str)
                    or not isinstance(message.get("content"), str)):
                raise ValueError(f"{where}: {key}[{index}] must be an object with string 'role' and 'content', got "
                                 f"{message!r}")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: {key}: the last message is the target and must have role 'assistant', got "
                             f"{messages[-1]['role']!r}")
        return Record(None, tuple(dict(m) for m in messages[:-1]), messages[-1]["content"], where)
    prompt = _text_field(row, fields.prompt, "data.prompt_field", where)
    answer = _text_field(row, fields.answer, "data.answer_field", where)
    for text, field, key in ((prompt, fields.prompt, "data.prompt_field"), (answer, fields.answer, "data.answer_field")):
        if not text.strip():
            raise ValueError(f"{where}: field {field!r} ({key}) is empty")
    return Record(prompt, None, answer, where)


def read_jsonl(path: str | os.PathLike, fields: Fields = Fields()) -> list[Record]:
    """Every non-blank line of a jsonl file as a Record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            records.append(record_from_row(row, f"{path}:{number}", fields))
    if not records:
        raise ValueError(f"{path} holds no examples")
    return records


def load_dataset_records(path: str, *, name: str | None = None, split: str = "train",
                         data_files: Iterable[str] = (), fields: Fields = Fields()) -> list[Record]:
    """Every row of `datasets.load_dataset(path, name, split=split, data_files=...)` as a Record."""
    datasets = require("datasets", "data", needed_by="data.task='datasets'")
    files = list(data_files) or None
    what = f"datasets.load_dataset({path!r}{f', {name!r}' if name else ''}, split={split!r}" + (
        f", data_files={files!r})" if files else ")")
    try:
        dataset = datasets.load_dataset(path, name, split=split, data_files=files)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"{what}: {error}") from None
    records = [record_from_row(row, f"{what} row {index}", fields) for index, row in enumerate(dataset)]
    if not records:
        raise ValueError(f"{what} holds no rows")
    return records


def chat_messages(record: Record) -> list[Mapping[str, Any]]:
    """The conversation before the answer: the record's messages, or its prompt as one user turn."""
    return list(record.messages) if record.messages is not None else [{"role": "user", "content": record.prompt}]


def prompt_ids(record: Record, tokenizer, *, chat: bool) -> list[int]:
    """The ids a model continues from to answer `record` (the prompt part of `tokenize_record`)."""
    if chat or record.messages is not None:
        return tokenizer.encode_chat(chat_messages(record), add_generation_prompt=True)
    return tokenizer.encode(record.prompt, bos=tokenizer.bos_id is not None)


def prompt_text(record: Record, tokenizer, *, chat: bool) -> str:
    """The prompt as text (for results files)."""
    if chat or record.messages is not None:
        return tokenizer.format_chat(chat_messages(record), add_generation_prompt=True)
    return record.prompt


def tokenize_record(record: Record, tokenizer, *, chat: bool):
    """`record` as a `sra_jax.data.datasets.TokenizedExample` (ids and the loss mask on the target)."""
    from sra_jax.data.datasets import TokenizedExample

    prompt = prompt_ids(record, tokenizer, chat=chat)
    if chat or record.messages is not None:
        full = tokenizer.encode_chat([*chat_messages(record), {"role": "assistant", "content": record.answer}],
                                     add_generation_prompt=False)
        if full[: len(prompt)] != prompt or len(full) == len(prompt):
            raise ValueError(f"{record.where}: the chat template's rendering of the conversation does not start with "
                             f"its rendering of the prompt (with the generation prompt), so the answer's tokens "
                             f"cannot be told apart; use plain prompts (data.chat=false) with this tokenizer")
        target = full[len(prompt):]
    else:
        target = [*tokenizer.encode(" " + record.answer.lstrip()), tokenizer.eos_id]
    tokens = np.asarray([*prompt, *target], np.int32)
    loss_mask = np.zeros(len(tokens), bool)
    loss_mask[len(prompt):] = True
    return TokenizedExample(tokens, loss_mask)


__all__ = ["Fields", "Record", "chat_messages", "load_dataset_records", "prompt_ids", "prompt_text", "read_jsonl",
           "record_from_row", "tokenize_record"]
