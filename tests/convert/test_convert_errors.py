"""Bad checkpoints fail with a ValueError naming the tensor or key, and nothing is left at the destination."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hf_models import write_random_checkpoint

from sra_jax.config import LlamaConfig
from sra_jax.convert import hf_to_orbax, load_hf, orbax_to_hf
from sra_jax.convert.cli import main as convert_main
from sra_jax.convert.safetensors_io import SINGLE_FILE, SafetensorsReader, TensorSource, write_file


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    config = LlamaConfig.tiny(vocab_size=64, num_hidden_layers=1, hidden_size=32, intermediate_size=48)
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", config)


def edited(src: Path, dst: Path, *, config: dict | None = None, drop=(), add=None) -> Path:
    """A copy of checkpoint `src` with config.json keys updated, tensors dropped, or extra tensors added."""
    shutil.copytree(src, dst)
    if config:
        raw = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**raw, **config}))
    if drop or add:
        reader = SafetensorsReader(src)
        sources = [
            TensorSource(n, reader.info(n).dtype, reader.info(n).shape, lambda n=n: reader.get(n))
            for n in reader
            if n not in drop
        ]
        sources += [TensorSource(n, a.dtype, a.shape, lambda a=a: a) for n, a in (add or {}).items()]
        write_file(dst / SINGLE_FILE, sources, {"format": "pt"})
    return dst


def assert_nothing_written(dst: Path) -> None:
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")], (
        "temporary directory left"
    )


BAD_INPUTS = {
    "missing tensor": ({"drop": ["model.layers.0.mlp.up_proj.weight"]}, "model.layers.0.mlp.up_proj.weight"),
    "unexpected tensor": (
        {"add": {"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}},
        "model.layers.0.self_attn.q_proj.bias",
    ),
    "shape disagrees with config.json": (
        {"config": {"intermediate_size": 64}},
        "model.layers.0.mlp.gate_proj.weight",
    ),
    "attention bias": ({"config": {"attention_bias": True}}, "attention_bias"),
    "non-Llama architecture": (
        {"config": {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}},
        "model_type",
    ),
    "unknown config key": ({"config": {"sliding_window": 4096}}, "sliding_window"),
    "tied head that differs from the embedding": (
        {"config": {"tie_word_embeddings": True}},
        "lm_head.weight",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoint_raises_a_clear_error_and_writes_nothing(case, checkpoint, tmp_path):
    edits, named = BAD_INPUTS[case]
    src = edited(checkpoint, tmp_path / "src", **edits)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_hf(src)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        hf_to_orbax(src, tmp_path / "dst")
    assert_nothing_written(tmp_path / "dst")
    assert convert_main(["hf-to-orbax", str(src), str(tmp_path / "dst")]) == 1
    assert_nothing_written(tmp_path / "dst")


def test_index_pointing_at_a_missing_shard_is_reported(checkpoint, tmp_path):
    src = edited(checkpoint, tmp_path / "src")
    names = SafetensorsReader(src).keys()
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        load_hf(src)


def test_existing_destination_is_kept_unless_overwrite(checkpoint, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        hf_to_orbax(checkpoint, dst)
    assert (dst / "keep.txt").read_text() == "mine"
    hf_to_orbax(checkpoint, dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "params").is_dir()
    assert convert_main(["orbax-to-hf", str(dst), str(tmp_path / "back")]) == 0
    orbax_to_hf(dst, tmp_path / "back", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["config.json", SINGLE_FILE]


def test_truncated_safetensors_file_is_rejected(checkpoint, tmp_path):
    src = edited(checkpoint, tmp_path / "src")
    data = (src / SINGLE_FILE).read_bytes()
    (src / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="disagrees with its shape or the file"):
        load_hf(src)
