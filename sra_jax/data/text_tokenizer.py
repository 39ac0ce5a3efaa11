"""One tokenizer interface for text models: `load_tokenizer(path)` picks the implementation from the files.

- `tokenizer.json` (Hugging Face checkpoints): `sra_jax.data.hf_tokenizer.HFTokenizer` (the `tokenizers` library,
  the checkpoint's chat template, bos / eos from tokenizer_config.json and generation_config.json);
- `tokenizer.model` (Meta's Llama 3 release, also `original/tokenizer.model` of HF Llama 3 folders):
  `sra_jax.data.tokenizer.Llama3Tokenizer` (tiktoken, the Llama 3 chat format).

A folder holding both uses `tokenizer.json` (it carries the checkpoint's own chat template).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# Searched in this order inside a folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")


@runtime_checkable
class Tokenizer(Protocol):
    """What generation, evaluation and the text data streams use of a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]  # generation ends at any of these

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def format_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str: ...

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> list[int]: ...


def find_tokenizer(folder: str | os.PathLike) -> Path | None:
    """The tokenizer file inside `folder` (first of TOKENIZER_FILES), or None."""
    folder = Path(folder)
    return next((folder / name for name in TOKENIZER_FILES if (folder / name).is_file()), None)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a file (`tokenizer.json` or a tiktoken `tokenizer.model`), of a folder holding one, or of a
    hub name `hf://org/name[@revision]` (its snapshot in the local huggingface_hub cache)."""
    from sra_jax.convert.source import resolve_path

    path = resolve_path(path)
    if path.is_dir():
        found = find_tokenizer(path)
        if found is None:
            raise FileNotFoundError(f"no tokenizer in {path}: looked for {', '.join(TOKENIZER_FILES)}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    if path.suffix == ".json":
        from sra_jax.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    from sra_jax.data.tokenizer import Llama3Tokenizer

    return Llama3Tokenizer(path)


def model_tokenizer(source_path: str | os.PathLike) -> str | Path | None:
    """Where the tokenizer of a model source lives (a path or hub name for `load_tokenizer`): beside its weights,
    else (a training checkpoint) the run's `data.tokenizer`, else that of the run's `init.from` source; None when
    none of them has one."""
    from sra_jax.convert.source import resolve_source

    source = resolve_source(source_path)
    found = find_tokenizer(source.path)
    if found is not None or source.kind != "train":
        return found
    run = source.train_config or {}
    data, init = run.get("data") or {}, run.get("init") or {}
    if data.get("tokenizer"):
        return data["tokenizer"]
    return model_tokenizer(init["from"]) if init.get("from") else None


__all__ = ["TOKENIZER_FILES", "Tokenizer", "find_tokenizer", "load_tokenizer", "model_tokenizer"]
