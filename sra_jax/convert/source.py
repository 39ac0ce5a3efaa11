"""One resolver for "model source path -> (LlamaConfig, SRAConfig, Llama)", used by `init.from`, generate, eval
and export.

A source is one of:
- a hub name `hf://org/name` or `hf://org/name@revision`: the snapshot in the local `huggingface_hub` cache
  (HF_HUB_CACHE / HF_HOME as huggingface_hub reads them; never downloaded here, see `resolve_path`), which is then
  a Hugging Face folder,
- a Hugging Face Llama folder (config.json + safetensors, sharded or not; `sra_router.safetensors` and
  `sra_config.json` beside them when it holds routers),
- an sra-jax orbax model folder (config.json + params/, see `sra_jax.convert.orbax_io`),
- an sra-jax training checkpoint: a run's checkpoint folder (its newest step is used) or one step folder DIR/STEP.
  Its model settings come from the run config stored in the step's `meta` item (written by `Checkpointer.save`);
  only the `params` of the saved `TrainState` are read (the optimizer state is never touched).

`resolve_source` reads metadata only; `load_source` streams the weights onto devices, each parameter straight
into its sharding when `mesh` or `shardings` is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.convert import params as P

HUB_PREFIX = "hf://"
TRAIN_STATE_ITEM = "state"
TRAIN_META_ITEM = "meta"
FROZEN_META_KEY = "frozen"  # a router-only step's reference to its frozen weights (sra_jax.train.frozen)
_META_FILE = "metadata"
_KEEP = object()  # load_source(sra=...) default: the source's own SRA settings


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved model source. kind: "hf", "orbax" or "train"; path: the folder holding the weights (for "train"
    the step folder); train_config: the stored run config (kind "train" only)."""

    kind: str
    path: Path
    config: LlamaConfig
    sra: SRAConfig | None
    step: int | None = None
    train_config: dict[str, Any] | None = None


def _is_train_step(path: Path) -> bool:
    return (path / TRAIN_STATE_ITEM).is_dir() and (path / TRAIN_META_ITEM).is_dir()


def train_steps(path: str | os.PathLike) -> list[int]:
    """The finished steps of a run's checkpoint folder, ascending (folders named by their step)."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and _is_train_step(p))


def train_meta(step_dir: Path) -> dict[str, Any]:
    """The `meta` item of a training checkpoint step (its step, run config and, when router-only, the reference to
    its frozen weights)."""
    file = step_dir / TRAIN_META_ITEM / _META_FILE
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: not a complete sra-jax training checkpoint")
    return json.loads(file.read_text())


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """`hf://org/name[@revision]` -> (repo id, revision or None); ValueError naming `name` when malformed."""
    if not name.startswith(HUB_PREFIX):
        raise ValueError(f"{name!r} is not a hub name (hf://org/name or hf://org/name@revision)")
    repo_id, _, revision = name.removeprefix(HUB_PREFIX).partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or (revision == "" and name.endswith("@")):
        raise ValueError(f"hub name {name!r} must look like hf://org/name or hf://org/name@revision")
    return repo_id, revision or None


def resolve_path(path: str | os.PathLike) -> Path:
    """The local folder of a model path: `path` itself, or for `hf://org/name[@revision]` its snapshot folder in the
    huggingface_hub cache, found offline (`local_files_only`; the cache folder is huggingface_hub's: HF_HUB_CACHE,
    else HF_HOME/hub, else ~/.cache/huggingface/hub). A name not in the cache is a FileNotFoundError naming the repo,
    the cache folder searched and the download command."""
    if not isinstance(path, str) or not path.startswith(HUB_PREFIX):
        return Path(path)
    repo_id, revision = parse_hub_name(path)
    from sra_jax.extras import require

    hub = require("huggingface_hub", "data", needed_by=f"hub model names ({path})")
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = constants.HF_HUB_CACHE
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
    except HFValidationError as error:
        raise ValueError(f"hub name {path!r}: {error}") from None
    except LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        flag = f" --revision {revision}" if revision else ""
        raise FileNotFoundError(
            f"{path}: {repo_id}{at} is not in the Hugging Face cache {cache} (searched offline; set HF_HUB_CACHE or "
            f"HF_HOME to use another cache); download it first with `hf download {repo_id}{flag}` (huggingface_hub "
            f">= 1.0; `huggingface-cli download {repo_id}{flag}` before)") from None


_SAMPLE_BYTES = 1 << 16


def fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a model folder's weights (a hub name is resolved first), so a router-only checkpoint that
    references its frozen weights can tell whether they are still the ones it was trained on: sha256 over each
    file's relative path and size, the whole of every file up to 1 MiB (configs, indexes, orbax metadata, manifests)
    and the first and last 64 KiB of larger ones (a safetensors header and the first and last tensor bytes). Files
    rewritten in place with equal sizes and equal sampled bytes are not told apart; a copied or moved folder is the
    same."""
    root = resolve_path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model source {str(root)!r} is not a folder")
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root).as_posix()}\0{size}\0".encode())
        with file.open("rb") as f:
            if size <= 16 * _SAMPLE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(_SAMPLE_BYTES))
                f.seek(size - _SAMPLE_BYTES)
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def resolve_source(path: str | os.PathLike, *, step: int | None = None) -> ModelSource:
    """What kind of model folder `path` is and its model settings (no weights are read).

    path: a folder, or a hub name `hf://org/name[@revision]` (see `resolve_path`). step: for a run's checkpoint
    folder, which step (default: the newest). FileNotFoundError when `path` is none of the known layouts, naming
    what was looked for."""
    path = resolve_path(path)
    if not path.exists():
        raise FileNotFoundError(f"model source {str(path)!r} does not exist")
    if step is not None and not _is_train_step(path):
        steps = train_steps(path)
        if step not in steps:
            raise FileNotFoundError(f"{path} has no training checkpoint step {step} (steps: {steps})")
        path = path / str(step)
    elif not _is_train_step(path) and not (path / "config.json").exists():
        steps = train_steps(path)
        if steps:
            path = path / str(steps[-1])
    if _is_train_step(path):
        meta = train_meta(path)
        run = meta.get("config")
        if not isinstance(run, dict):
            raise ValueError(f"{path / TRAIN_META_ITEM} holds no run config (checkpoints written by sra-jax train "
                             f"store it): cannot tell the model's shape")
        from sra_jax.train.config import TrainConfig

        train = TrainConfig.from_saved(run)
        return ModelSource("train", path, train.model, train.sra, int(meta.get("step", path.name)), run)
    if (path / "config.json").exists():
        from sra_jax.convert import hf as hf_io

        config, sra = hf_io.read_config(path)
        kind = "orbax" if (path / "params").is_dir() else "hf"
        return ModelSource(kind, path, config, sra)
    raise FileNotFoundError(f"{path} is not a model folder: no config.json (Hugging Face or sra-jax orbax model), no "
                            f"state/ + meta/ (training checkpoint step) and no numbered step folders (run "
                            f"checkpoint folder)")


def _frozen_base(source: ModelSource, reference: dict[str, Any], **load) -> dict:
    """The frozen parameter values of a router-only checkpoint step, loaded from the source its meta names (see
    `sra_jax.train.frozen`); FileNotFoundError / ValueError naming the step and the source when it is gone or
    holds other weights."""
    base_path = reference.get("source")
    step = f"{source.path} (a router-only checkpoint: its Llama weights are read from {base_path})"
    try:
        found = fingerprint(base_path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{step}: {error}") from None
    if found != reference.get("fingerprint"):
        raise ValueError(f"{step}: {base_path} holds other weights than the run trained on (fingerprint {found}, "
                         f"checkpoint {reference.get('fingerprint')})")
    _, _, model = load_source(base_path, sra=None, **load)
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _load_train(source: ModelSource, *, dtype, compute_dtype, mesh, shardings, attention_impl):
    """The Llama of a training checkpoint step: only `params` of the saved TrainState are restored, each onto
    its sharding (a router-only step's frozen parameters come from the source it references)."""
    import orbax.checkpoint as ocp

    run = source.train_config or {}
    param_dtype = np.dtype(run.get("param_dtype", "float32")) if dtype is None else np.dtype(dtype)
    compute = compute_dtype or (np.dtype(run.get("compute_dtype", "float32")) if dtype is None else param_dtype)
    graphdef, flat = P.abstract_model(source.config, source.sra, dtype=compute, param_dtype=param_dtype,
                                      attention_impl=attention_impl)
    reference = train_meta(source.path).get(FROZEN_META_KEY)
    values = {} if reference is None else _frozen_base(
        source, reference, dtype=param_dtype, compute_dtype=compute, mesh=mesh, shardings=shardings,
        attention_impl=attention_impl)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = {}
    for p, variable in flat:
        if p in values and not P.is_router(p):
            continue
        shape = tuple(variable.get_value().shape)
        sharding = P.sharding_for(p, variable, shape, mesh=mesh, shardings=shardings) or default
        targets[p] = jax.ShapeDtypeStruct(shape, param_dtype, sharding=sharding)
    abstract = nnx.from_flat_state([(p, v.replace(targets[p])) for p, v in flat if p in targets])
    item = {"params": abstract}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    restored = ocp.PyTreeCheckpointer().restore((source.path / TRAIN_STATE_ITEM).absolute(), args=args)
    values.update({p: v.get_value() if isinstance(v, nnx.Variable) else v
                   for p, v in nnx.to_flat_state(restored["params"])})
    return P.merge(graphdef, flat, values)


def _adapt_sra(model: nnx.Module, config: LlamaConfig, sra: SRAConfig | None, *, router_seed: int,
               compute_dtype, attention_impl: str, mesh, shardings) -> nnx.Module:
    """`model` rebuilt with SRA settings `sra`: the same Llama arrays (no copy); its routers when their shapes fit,
    else freshly initialised ones (seed `router_seed`)."""
    values = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    param_dtype = values[("embed", "embedding")].dtype
    graphdef, flat = P.abstract_model(config, sra, dtype=compute_dtype or param_dtype, param_dtype=param_dtype,
                                      attention_impl=attention_impl)
    shapes = {p: tuple(v.get_value().shape) for p, v in flat}
    routers = [p for p in shapes if P.is_router(p)]
    if routers and not all(p in values and tuple(values[p].shape) == shapes[p] for p in routers):
        fresh = P.fresh_router_values(config, sra, seed=router_seed, param_dtype=param_dtype)
        for p in routers:
            variable = dict(flat)[p]
            sharding = P.sharding_for(p, variable, shapes[p], mesh=mesh, shardings=shardings)
            values[p] = fresh[p] if sharding is None else jax.device_put(fresh[p], sharding)
    return P.merge(graphdef, flat, {p: values[p] for p in shapes})


def load_source(
    path: str | os.PathLike | ModelSource,
    *,
    step: int | None = None,
    dtype: Any = None,
    compute_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    shardings: P.Shardings | None = None,
    sra: SRAConfig | None | object = _KEEP,
    router_seed: int = 0,
    attention_impl: str = "reference",
) -> tuple[LlamaConfig, SRAConfig | None, nnx.Module]:
    """`(LlamaConfig, SRAConfig or None, Llama)` of any model source (see the module docstring).

    dtype: parameter dtype (None: as stored). mesh / shardings: as in `sra_jax.convert.load_hf`. sra: the SRA
    settings of the returned model (default: the source's own); routers come from the source when it holds routers
    of that shape, else are freshly initialised with `router_seed`."""
    source = path if isinstance(path, ModelSource) else resolve_source(path, step=step)
    if source.kind == "hf":
        from sra_jax.convert.hf import load_hf

        _, model = load_hf(source.path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, shardings=shardings,
                           router_seed=router_seed, attention_impl=attention_impl)
    elif source.kind == "orbax":
        from sra_jax.convert.orbax_io import load_orbax

        _, model = load_orbax(source.path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, shardings=shardings,
                              attention_impl=attention_impl)
    else:
        model = _load_train(source, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, shardings=shardings,
                            attention_impl=attention_impl)
    target_sra = source.sra if sra is _KEEP else sra
    if target_sra != source.sra:
        model = _adapt_sra(model, source.config, target_sra, router_seed=router_seed, compute_dtype=compute_dtype,
                           attention_impl=attention_impl, mesh=mesh, shardings=shardings)
    return source.config, target_sra, model


def describe(source: ModelSource) -> str:
    kind = {"hf": "Hugging Face folder", "orbax": "sra-jax orbax model", "train": "training checkpoint"}[source.kind]
    step = f" step {source.step}" if source.step is not None else ""
    return f"{kind} {source.path}{step}"


__all__ = ["HUB_PREFIX", "ModelSource", "describe", "fingerprint", "load_source", "parse_hub_name", "resolve_path", "resolve_source",
           "train_meta", "train_steps"]
