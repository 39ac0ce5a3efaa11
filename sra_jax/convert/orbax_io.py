"""Model checkpoints in orbax: `config.json` (HF fields + "sra") and one orbax checkpoint per parameter group
(`params/embed`, `params/layers.<i>` with that layer's router, `params/norm`, `params/lm_head`).

One checkpoint per group lets HF <-> orbax conversion stream: only one layer is ever held in memory, and a restore
can fetch one group (orbax restores each array shard by shard onto the given shardings).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.convert import hf as hf_io
from sra_jax.convert import params as P
from sra_jax.convert.mapping import ParamPath, param_specs, path_str
from sra_jax.convert.safetensors_io import TensorSource, atomic_directory

PARAMS_DIR = "params"


def group_of(path: ParamPath) -> tuple[str, ParamPath]:
    """(group directory name, path inside the group) of a parameter."""
    if path[0] == "layers":
        return f"layers.{path[1]}", path[2:]
    return str(path[0]), path[1:]


def _nest(items: dict[ParamPath, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in items.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value
    return tree


def _flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _checkpointer() -> ocp.StandardCheckpointer:
    return ocp.StandardCheckpointer()


def _save_group(checkpointer: ocp.StandardCheckpointer, directory: Path, group: str, items: dict) -> None:
    checkpointer.save((directory / PARAMS_DIR / group).absolute(), _nest(items))
    checkpointer.wait_until_finished()


def _write_config(directory: Path, config: LlamaConfig, sra: SRAConfig | None, dtype: Any) -> None:
    text = json.dumps(hf_io.config_json(config, sra, dtype), indent=2) + "\n"
    (directory / hf_io.CONFIG_FILE).write_text(text)


def save_orbax(model: nnx.Module, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write a model's parameters (routers included) and config as an orbax checkpoint directory, atomically."""
    config, sra = hf_io.model_config(model)
    params = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    groups: dict[str, dict[ParamPath, jax.Array]] = {}
    for p, value in params.items():
        group, inner = group_of(p)
        groups.setdefault(group, {})[inner] = value
    checkpointer = _checkpointer()
    with atomic_directory(path, overwrite=overwrite) as tmp:
        _write_config(tmp, config, sra, next(iter(params.values())).dtype)
        for group, items in groups.items():
            _save_group(checkpointer, tmp, group, items)


class OrbaxReader:
    """Shapes and dtypes of an orbax model checkpoint, and group-by-group restores."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()
        self.config, self.sra = hf_io.read_config(self.path)
        params_dir = self.path / PARAMS_DIR
        if not params_dir.is_dir():
            raise FileNotFoundError(f"{params_dir} not found: not an sra-jax orbax checkpoint")
        self._checkpointer = _checkpointer()
        self._restorer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        self.arrays: dict[ParamPath, Any] = {}  # path -> ArrayMetadata (shape, dtype)
        for group_dir in sorted(params_dir.iterdir()):
            metadata = self._checkpointer.metadata(group_dir).item_metadata
            if metadata is None:
                raise ValueError(f"orbax checkpoint {self.path}: {group_dir} has no readable metadata (_METADATA "
                                 f"missing, empty or damaged); convert again from the source model")
            tree = metadata.tree
            prefix: ParamPath = (
                ("layers", int(group_dir.name.split(".")[1])) if "." in group_dir.name else (group_dir.name,)
            )
            for inner, meta in _flatten(tree):
                self.arrays[(*prefix, *(int(k) if k.isdigit() else k for k in inner))] = meta

    def restore_group(
        self, group: str, targets: dict[ParamPath, jax.ShapeDtypeStruct], *, host: bool = False
    ):
        """Restore some parameters of one group; `targets` (full paths) give dtype and sharding.

        host=True restores numpy arrays (no device buffers: used when streaming to safetensors)."""
        inner = _nest({group_of(p)[1]: t for p, t in targets.items()})
        if host:
            restore_args = jax.tree.map(
                lambda t: ocp.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype), inner
            )
        else:
            restore_args = ocp.checkpoint_utils.construct_restore_args(inner)
        args = ocp.args.PyTreeRestore(item=inner, restore_args=restore_args, partial_restore=True)
        restored = self._restorer.restore(self.path / PARAMS_DIR / group, args=args)
        by_inner = {tuple(k): v for k, v in _flatten(restored)}
        return {p: by_inner[tuple(str(k) for k in group_of(p)[1])] for p in targets}


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def load_orbax(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    compute_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    shardings: P.Shardings | None = None,
    attention_impl: str = "reference",
):
    """Load an orbax model checkpoint as `(LlamaConfig, Llama)`; dtype=None keeps the stored dtypes bit for bit."""
    reader = OrbaxReader(path)
    config, sra = reader.config, reader.sra
    stored = np.dtype(reader.arrays[("embed", "embedding")].dtype)
    param_dtype = np.dtype(dtype) if dtype is not None else stored
    graphdef, flat = P.abstract_model(
        config,
        sra,
        dtype=compute_dtype or param_dtype,
        param_dtype=param_dtype,
        attention_impl=attention_impl,
    )
    expected = {p for p, _ in flat}
    missing = sorted(path_str(p) for p in expected - reader.arrays.keys())
    extra = sorted(path_str(p) for p in reader.arrays.keys() - expected)
    if missing or extra:
        raise ValueError(
            f"orbax checkpoint {path} does not match its config: missing {missing}, unexpected {extra}"
        )
    targets: dict[str, dict[ParamPath, jax.ShapeDtypeStruct]] = {}
    for p, variable in flat:
        meta = reader.arrays[p]
        shape = tuple(variable.get_value().shape)
        if tuple(meta.shape) != shape:
            raise ValueError(
                f"parameter {path_str(p)!r} has shape {list(meta.shape)}, the config implies {list(shape)}"
            )
        sharding = P.sharding_for(p, variable, shape, mesh=mesh, shardings=shardings) or _default_sharding()
        target_dtype = np.dtype(dtype) if dtype is not None else np.dtype(meta.dtype)
        targets.setdefault(group_of(p)[0], {})[p] = jax.ShapeDtypeStruct(
            shape, target_dtype, sharding=sharding
        )
    values: dict[ParamPath, jax.Array] = {}
    for group, group_targets in targets.items():
        values.update(reader.restore_group(group, group_targets))
    return config, P.merge(graphdef, flat, values)


def hf_to_orbax(
    src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = None, overwrite: bool = False
) -> None:
    """Stream a Hugging Face checkpoint (plus `sra_router.safetensors` if present) into an orbax checkpoint,
    one layer at a time."""
    src = Path(src)
    config, sra, reader, specs = hf_io.open_checkpoint(src)
    routers = hf_io.router_reader(src)
    if sra is None and routers is not None and "sra" in routers.metadata:
        sra = SRAConfig(**json.loads(routers.metadata["sra"]))
    groups: dict[str, dict[ParamPath, Any]] = {}
    for spec in specs:
        groups.setdefault(group_of(spec.path)[0], {})[spec.path] = lambda spec=spec: hf_io.hf_view(
            reader, spec
        )
    for name in routers.keys() if routers is not None else []:
        parts = tuple(int(k) if k.isdigit() else k for k in name.split("."))
        groups.setdefault(group_of(parts)[0], {})[parts] = lambda name=name: routers.get(name)
    out_dtype = np.dtype(dtype) if dtype is not None else reader.info(specs[0].hf_name).dtype
    checkpointer = _checkpointer()
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        _write_config(tmp, config, sra, out_dtype)
        for group, loaders in groups.items():
            items = {}
            for p, load in loaders.items():
                view = load()
                target = np.dtype(dtype) if dtype is not None else view.dtype
                items[group_of(p)[1]] = np.ascontiguousarray(view).astype(target, copy=False)
                del view
            _save_group(checkpointer, tmp, group, items)
            del items


def orbax_to_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = hf_io.DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> None:
    """Stream an orbax model checkpoint into a Hugging Face directory (routers into `sra_router.safetensors`),
    restoring one group at a time."""
    reader = OrbaxReader(src)
    config = reader.config
    loaded: dict[tuple[str, bool], dict[ParamPath, jax.Array]] = {}

    def fetch(p: ParamPath) -> np.ndarray:
        # Routers are written after all HF tensors, so they form their own batch per group.
        batch = (group_of(p)[0], P.is_router(p))
        if batch not in loaded:
            loaded.clear()  # keep a single batch resident
            targets = {
                q: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=_default_sharding())
                for q, m in reader.arrays.items()
                if (group_of(q)[0], P.is_router(q)) == batch
            }
            loaded[batch] = reader.restore_group(batch[0], targets, host=True)
        return np.asarray(loaded[batch][p])

    def source(name: str, p: ParamPath, transpose: bool) -> TensorSource:
        meta = reader.arrays.get(p)
        if meta is None:
            raise ValueError(f"orbax checkpoint {src} has no parameter {path_str(p)!r} (for {name!r})")
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(meta.dtype)
        shape = tuple(meta.shape)[::-1] if transpose else tuple(meta.shape)

        def produce() -> np.ndarray:
            array = fetch(p)
            return (array.T if transpose else array).astype(out_dtype, copy=False)

        return TensorSource(name, out_dtype, shape, produce)

    specs = param_specs(config)
    hf = [source(s.hf_name, s.path, s.transpose) for s in specs]
    known = {s.path for s in specs}
    routers = [source(path_str(p), p, False) for p in reader.arrays if p not in known and P.is_router(p)]
    extra = sorted(path_str(p) for p in reader.arrays if p not in known and not P.is_router(p))
    if extra:
        raise ValueError(f"orbax checkpoint {src} has parameters with no Hugging Face counterpart: {extra}")
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        hf_io.write_hf_dir(tmp, config, reader.sra, hf, routers, max_shard_bytes=max_shard_bytes)
