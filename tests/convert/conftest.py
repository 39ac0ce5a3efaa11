"""Fixtures of the convert tests (helpers live in hf_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers
from hf_models import CONFIGS, build_hf_model, save_hf_model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, tuple[transformers.LlamaForCausalLM, Path]]:
    """name -> (torch model, directory it was saved to), built once per session."""
    out = {}
    for name, (_, shard) in CONFIGS.items():
        model = build_hf_model(name)
        out[name] = (model, save_hf_model(model, tmp_path_factory.mktemp(name), shard))
    return out
