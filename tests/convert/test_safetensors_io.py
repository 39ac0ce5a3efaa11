"""Our streaming safetensors writer/reader agree with the reference `safetensors` library, bit for bit."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sra_jax.convert.safetensors_io import (
    INDEX_FILE,
    SafetensorsReader,
    TensorSource,
    atomic_directory,
    write_file,
    write_sharded,
)

ARRAYS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
    "f16": np.linspace(-2, 2, 7).astype(np.float16),
    "bf16": np.linspace(-3, 3, 10).astype(ml_dtypes.bfloat16).reshape(2, 5),
    "i64": np.arange(3, dtype=np.int64),
    "bool": np.array([True, False, True]),
    "scalar": np.array(1.5, np.float32),
}


def sources(arrays):
    return [TensorSource(n, a.dtype, a.shape, lambda a=a: a) for n, a in arrays.items()]


def test_written_file_reads_back_identically_in_the_safetensors_library(tmp_path):
    write_file(tmp_path / "x.safetensors", sources(ARRAYS), {"format": "pt"})
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, array in ARRAYS.items():
            tensor = f.get_tensor(name)
            assert tuple(tensor.shape) == array.shape
            assert tensor.contiguous().flatten().view(torch.uint8).numpy().tobytes() == array.tobytes()


def test_reader_maps_files_written_by_the_safetensors_library(tmp_path):
    tensors = {"a": torch.randn(4, 3).to(torch.bfloat16), "b": torch.randn(5).half(), "c": torch.randn(2, 2)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reader = SafetensorsReader(tmp_path)
    assert sorted(reader.keys()) == ["a", "b", "c"]
    for name, tensor in tensors.items():
        assert reader.get(name).tobytes() == tensor.flatten().view(torch.uint8).numpy().tobytes()


def test_sharding_follows_max_shard_bytes_and_writes_a_consistent_index(tmp_path):
    arrays = {f"t{i}": np.full((10,), i, np.float32) for i in range(5)}  # 40 bytes each
    names = write_sharded(tmp_path, sources(arrays), max_shard_bytes=100)
    assert names[-1] == INDEX_FILE and len(names) == 4  # 2 + 2 + 1 tensors
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 200
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    reader = SafetensorsReader(tmp_path)
    for name, array in arrays.items():
        np.testing.assert_array_equal(reader.get(name), array)


def test_writer_rejects_a_tensor_that_disagrees_with_its_declaration(tmp_path):
    bad = TensorSource("x", np.dtype(np.float32), (2,), lambda: np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="'x' produced"):
        write_file(tmp_path / "x.safetensors", [bad])


def test_atomic_directory_leaves_nothing_behind_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "dst") as tmp:
        (tmp / "partial").write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(tmp_path / "dst") as tmp:
        (tmp / "done").write_text("ok")
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]
    assert (tmp_path / "dst" / "done").read_text() == "ok"
