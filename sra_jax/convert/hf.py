"""Hugging Face Llama checkpoints (config.json + safetensors, sharded or not) <-> `sra_jax.nn.Llama`.

The HF tensors stay loadable by transformers; the SRA routers, which transformers does not know, travel beside them
in `sra_router.safetensors` (our parameter layout, SRAConfig in its metadata) and in config.json's "sra" key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.convert import params as P
from sra_jax.convert.mapping import IGNORED_HF_TENSORS, ParamPath, ParamSpec, param_specs, path_str
from sra_jax.convert.safetensors_io import (
    SafetensorsReader,
    TensorSource,
    atomic_directory,
    write_file,
    write_sharded,
)

CONFIG_FILE = "config.json"
ROUTER_FILE = "sra_router.safetensors"
SRA_CONFIG_FILE = "sra_config.json"  # the SRAConfig of the routers, beside them
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' historical "5GB"

_TORCH_DTYPE_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def read_config(path: str | os.PathLike) -> tuple[LlamaConfig, SRAConfig | None]:
    """config.json of a checkpoint directory; ValueError naming the key this model cannot represent."""
    file = Path(path) / CONFIG_FILE
    if not file.exists():
        raise FileNotFoundError(f"{file} not found")
    raw = json.loads(file.read_text())
    sra = raw.get("sra")
    sra_file = Path(path) / SRA_CONFIG_FILE
    if not sra and sra_file.exists():
        sra = json.loads(sra_file.read_text())
    return LlamaConfig.from_hf(raw), (SRAConfig(**sra) if sra else None)


def config_json(config: LlamaConfig, sra: SRAConfig | None, dtype: np.dtype | None) -> dict[str, Any]:
    out = config.to_hf()
    if dtype is not None:
        out["torch_dtype"] = _TORCH_DTYPE_NAMES.get(np.dtype(dtype).name, "float32")
    if sra is not None:
        out["sra"] = dataclasses.asdict(sra)
    return out


def check_tensors(reader: SafetensorsReader, specs: list[ParamSpec], config: LlamaConfig) -> None:
    """Every expected tensor present with the shape config.json implies, nothing else (ValueError otherwise)."""
    expected = {s.hf_name: s for s in specs}
    present = set(reader.keys())
    missing = [name for name in expected if name not in present]
    if missing:
        raise ValueError(f"checkpoint is missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    extra = sorted(present - expected.keys())
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        # Some exporters write the tied head anyway; accept it only if it really is the embedding.
        extra.remove("lm_head.weight")
        if not np.array_equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            raise ValueError(
                "tie_word_embeddings=true but tensor 'lm_head.weight' differs from the embedding"
            )
    extra = [name for name in extra if not IGNORED_HF_TENSORS.fullmatch(name)]
    if extra:
        raise ValueError(f"checkpoint has unexpected tensor(s) {extra[:8]} for a LlamaForCausalLM config")
    for spec in specs:
        info = reader.info(spec.hf_name)
        if info.shape != spec.hf_shape:
            raise ValueError(
                f"tensor {spec.hf_name!r} has shape {list(info.shape)} but config.json implies "
                f"{list(spec.hf_shape)} (vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
                f"intermediate_size={config.intermediate_size}, num_attention_heads={config.num_attention_heads}, "
                f"num_key_value_heads={config.num_key_value_heads}, head_dim={config.head_dim})"
            )
        if not np.issubdtype(info.dtype, np.floating) and info.dtype.name != "bfloat16":
            raise ValueError(f"tensor {spec.hf_name!r} has non-float dtype {info.dtype}")


def open_checkpoint(
    path: str | os.PathLike,
) -> tuple[LlamaConfig, SRAConfig | None, SafetensorsReader, list[ParamSpec]]:
    """Read and validate config.json and the tensor headers (no tensor data is touched)."""
    config, sra = read_config(path)
    reader = SafetensorsReader(path)
    specs = param_specs(config)
    check_tensors(reader, specs, config)
    return config, sra, reader, specs


def hf_view(reader: SafetensorsReader, spec: ParamSpec) -> np.ndarray:
    """A tensor in our layout, still memory-mapped (the transpose is a view)."""
    array = reader.get(spec.hf_name)
    return array.T if spec.transpose else array


def router_reader(path: Path) -> SafetensorsReader | None:
    return SafetensorsReader(path / ROUTER_FILE) if (path / ROUTER_FILE).exists() else None


def load_hf(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    compute_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    shardings: P.Shardings | None = None,
    sra: SRAConfig | None = None,
    router_seed: int = 0,
    attention_impl: str = "reference",
):
    """Load a Hugging Face Llama checkpoint directory as `(LlamaConfig, Llama)`.

    dtype: parameter dtype; None keeps each tensor's stored dtype bit for bit. compute_dtype defaults to the
    parameter dtype. mesh / shardings: place each parameter sharded (see `params.sharding_for`), each process reading
    only its own slices. sra: SRA settings; routers come from `sra_router.safetensors` when present, else are freshly
    initialised with `router_seed` (default: the checkpoint's own SRA settings, or dense attention).
    """
    path = Path(path)
    config, saved_sra, reader, specs = open_checkpoint(path)
    routers = router_reader(path)
    if saved_sra is None and routers is not None and "sra" in routers.metadata:
        saved_sra = SRAConfig(**json.loads(routers.metadata["sra"]))
    sra = sra or saved_sra
    stored = reader.info(specs[0].hf_name).dtype
    param_dtype = np.dtype(dtype) if dtype is not None else stored
    graphdef, flat = P.abstract_model(
        config,
        sra,
        dtype=compute_dtype or param_dtype,
        param_dtype=param_dtype,
        attention_impl=attention_impl,
    )
    variables = dict(flat)
    by_path = {s.path: s for s in specs}
    values: dict[ParamPath, jax.Array] = {}
    router_paths = [p for p in variables if P.is_router(p)]
    if router_paths and routers is None:
        values.update(P.fresh_router_values(config, sra, seed=router_seed, param_dtype=param_dtype))
    for p, variable in flat:
        if p in values:
            continue
        if p in by_path:
            source = hf_view(reader, by_path[p])
        elif P.is_router(p):
            name = path_str(p)
            if name not in routers:
                raise ValueError(f"{ROUTER_FILE} is missing tensor {name!r}")
            source = routers.get(name)
        else:
            raise ValueError(
                f"model variable {path_str(p)!r} has no Hugging Face counterpart (nn/convert mismatch)"
            )
        shape = tuple(variable.get_value().shape)
        if source.shape != shape:
            raise ValueError(
                f"tensor for {path_str(p)!r} has shape {list(source.shape)}, the model expects {list(shape)}"
            )
        target = np.dtype(dtype) if dtype is not None else source.dtype
        sharding = P.sharding_for(p, variable, shape, mesh=mesh, shardings=shardings)
        values[p] = P.place(source, target, sharding)
        del source
    if routers is not None:
        extra = sorted(set(routers.keys()) - {path_str(p) for p in router_paths})
        if extra:
            raise ValueError(f"{ROUTER_FILE} has unexpected tensor(s) {extra[:8]} for SRA settings {sra}")
    return config, P.merge(graphdef, flat, values)


def model_config(model: nnx.Module) -> tuple[LlamaConfig, SRAConfig | None]:
    return model.config, getattr(model, "sra", None)


def _host(array: jax.Array) -> np.ndarray:
    if not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        array = multihost_utils.process_allgather(array, tiled=True)
    return np.asarray(jax.device_get(array))


def model_tensors(model: nnx.Module, dtype: Any = None) -> tuple[list[TensorSource], list[TensorSource]]:
    """The model as (HF tensors, router tensors), each produced on demand in the output layout and dtype."""
    config, _ = model_config(model)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

    def source(name: str, array: jax.Array, transpose: bool) -> TensorSource:
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(array.dtype)

        def produce() -> np.ndarray:  # transposed on the devices: a strided host copy is ~10x slower
            host = _host(jax.jit(jnp.transpose)(array) if transpose else array)
            return host.astype(out_dtype, copy=False)

        shape = tuple(array.shape[::-1] if transpose else array.shape)
        return TensorSource(name, out_dtype, shape, produce)

    hf = []
    for spec in param_specs(config):
        if spec.path not in params:
            raise ValueError(f"model has no parameter {path_str(spec.path)!r} for {spec.hf_name!r}")
        hf.append(source(spec.hf_name, params[spec.path].get_value(), spec.transpose))
    routers = [source(path_str(p), v.get_value(), False) for p, v in params.items() if P.is_router(p)]
    return hf, routers


def write_hf_dir(
    directory: Path,
    config: LlamaConfig,
    sra: SRAConfig | None,
    hf: list[TensorSource],
    routers: list[TensorSource],
    *,
    max_shard_bytes: int,
) -> None:
    """config.json + model safetensors (+ sra_router.safetensors) into an existing empty directory."""
    dtype = hf[0].dtype if hf else None
    (directory / CONFIG_FILE).write_text(
        json.dumps(config_json(config, sra if routers else None, dtype), indent=2) + "\n"
    )
    write_sharded(directory, hf, max_shard_bytes=max_shard_bytes)
    if routers:
        metadata = {"format": "sra-jax", "sra": json.dumps(dataclasses.asdict(sra))}
        write_file(directory / ROUTER_FILE, routers, metadata)
        (directory / SRA_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(sra), indent=2) + "\n")


def save_hf(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> None:
    """Write `model` as a Hugging Face checkpoint directory that transformers' `LlamaForCausalLM` loads.

    Tensors are fetched and written one at a time; dtype=None keeps each parameter's dtype bit for bit. The
    directory appears atomically (written beside `path`, then renamed). Only process 0 writes.
    """
    config, sra = model_config(model)
    hf, routers = model_tensors(model, dtype)
    if jax.process_index() != 0:
        for s in [*hf, *routers]:  # every process joins the gathers of non-addressable arrays
            s.produce()
        return
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_hf_dir(tmp, config, sra, hf, routers, max_shard_bytes=max_shard_bytes)
