"""Streaming safetensors I/O: memory-mapped reads and one-tensor-at-a-time sharded writes.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` padded with spaces to 8 bytes, then
the raw little-endian tensor bytes. We parse it ourselves because `safe_open(framework="numpy")` cannot return
bfloat16, and mapping each tensor separately lets us drop its pages as soon as it has been consumed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Header sizes beyond this are not a real checkpoint (the Rust reader uses the same bound).
_MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}


def dtype_code(dtype: Any) -> str:
    """The safetensors dtype string ("BF16", ...) of a numpy / jax dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _CODES:
        raise ValueError(f"dtype {dtype} has no safetensors encoding")
    return _CODES[dtype]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in `file`

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one .safetensors header: ({name: TensorInfo}, metadata)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{file}: header length {header_len} is invalid for a file of {size} bytes")
        header = json.loads(f.read(header_len))
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        code = entry.get("dtype")
        if code not in DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {code!r}")
        begin, end = entry["data_offsets"]
        info = TensorInfo(name, file, DTYPES[code], tuple(int(d) for d in entry["shape"]), data_start + begin)
        if end - begin != info.nbytes or data_start + end > size:
            raise ValueError(
                f"{file}: tensor {name!r} byte range [{begin}, {end}) disagrees with its shape or the file"
            )
        tensors[name] = info
    return tensors, metadata


class SafetensorsReader:
    """All tensors of a checkpoint directory (single file, or shards listed in model.safetensors.index.json).

    `get(name)` returns a read-only memory map of one tensor; nothing is read until it is touched, and the map is
    released when the array is dropped, so streaming over a checkpoint keeps resident memory near one tensor.
    """

    def __init__(self, path: str | os.PathLike, *, files: Sequence[str] | None = None):
        path = Path(path)
        self.path = path
        self.metadata: dict[str, str] = {}
        self._tensors: dict[str, TensorInfo] = {}
        weight_map = None
        if path.is_file():
            names = [path.name]
            path = path.parent
        elif files is not None:
            names = list(files)
        elif (path / INDEX_FILE).exists():
            index = json.loads((path / INDEX_FILE).read_text())
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{path / INDEX_FILE}: no 'weight_map' object")
            names = sorted(set(weight_map.values()))
        elif (path / SINGLE_FILE).exists():
            names = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        for name in names:
            file = path / name
            if not file.exists():
                raise FileNotFoundError(f"{file}: listed in {INDEX_FILE} but missing")
            tensors, metadata = read_header(file)
            for key in tensors.keys() & self._tensors.keys():
                raise ValueError(f"tensor {key!r} appears in both {self._tensors[key].file.name} and {name}")
            self._tensors.update(tensors)
            self.metadata.update(metadata)
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self._tensors or self._tensors[key].file.name != name:
                    raise ValueError(f"{INDEX_FILE} maps tensor {key!r} to {name}, which does not contain it")
            for key in self._tensors.keys() - weight_map.keys():
                raise ValueError(
                    f"tensor {key!r} is in {self._tensors[key].file.name} but not in {INDEX_FILE}"
                )

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __iter__(self):
        return iter(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def get(self, name: str) -> np.ndarray:
        info = self._tensors[name]
        if info.nbytes == 0:
            return np.zeros(info.shape, info.dtype)
        return np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape)


def _header_bytes(
    entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": dtype_code(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """A tensor to be written: its declared dtype and shape, and a function producing its values on demand."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_file(file: Path, sources: Sequence[TensorSource], metadata: dict[str, str] | None = None) -> None:
    """Write one .safetensors file, producing and writing one tensor at a time."""
    entries = [(s.name, np.dtype(s.dtype), tuple(s.shape)) for s in sources]
    with open(file, "wb") as f:
        f.write(_header_bytes(entries, metadata or {}))
        for source in sources:
            array = np.asarray(source.produce())
            if array.shape != tuple(source.shape) or array.dtype != np.dtype(source.dtype):
                raise ValueError(
                    f"tensor {source.name!r} produced {array.dtype}{list(array.shape)}, "
                    f"declared {np.dtype(source.dtype)}{list(source.shape)}"
                )
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            del array


def write_sharded(
    directory: Path,
    sources: Sequence[TensorSource],
    *,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write `sources` as model.safetensors, or as model-0000i-of-0000n.safetensors + index when over one shard.

    Shards are filled in order like transformers' `save_pretrained`: a tensor opens a new shard when it would push
    the current one past `max_shard_bytes` (a single larger tensor gets a shard of its own). Returns the file names.
    """
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for source in sources:
        if shards[-1] and size + source.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(source)
        size += source.nbytes
    metadata = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        write_file(directory / SINGLE_FILE, shards[0], metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_file(directory / name, shard, metadata)
        weight_map.update({s.name: name for s in shard})
    index = {"metadata": {"total_size": sum(s.nbytes for s in sources)}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_FILE]


@contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `dst`; on success rename it to `dst`, on error delete it.

    A reader of `dst` therefore sees either nothing (or the previous checkpoint) or the complete new one.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / dst.name)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
