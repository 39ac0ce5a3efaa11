"""Device mesh ("data", "fsdp", "tensor", "sequence") and the rules that map the model's logical axis names onto it.

The model never names a mesh axis: its parameters carry logical names (`nnx.with_partitioning`), and
`LOGICAL_AXIS_RULES` says where each goes. A dimension whose size does not divide its mesh axes is replicated
instead (tiny models on many devices), so every rule table works on every mesh. Activations are split by batch over
("data", "fsdp") and by position over "sequence" (contiguous chunks of every row; attention and the router's top-k
then run sequence-parallel, see `sra_jax.ops.sequence_parallel.sequence_sharding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")
SEQUENCE_AXIS = "sequence"

# logical name -> mesh axes (None = replicated). FSDP shards the model dimension of every matrix; tensor parallelism
# splits heads, the MLP width and the vocabulary (Megatron style). The router's hidden width is tiny and stays
# replicated (its input dimension, "embed", follows FSDP like every matrix).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("router_hidden", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of `shape` = (data, fsdp, tensor[, sequence]) over `devices` (default: all devices of all processes);
    sequence is 1 when left out."""
    if len(shape) not in (3, 4):
        raise ValueError(f"mesh shape {tuple(shape)} must have 3 or 4 entries (data, fsdp, tensor[, sequence])")
    shape = (*shape, 1) if len(shape) == 3 else tuple(shape)
    devices = list(jax.devices() if devices is None else devices)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, got {len(devices)}")
    axis_types = (jax.sharding.AxisType.Auto,) * 4
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types, devices=devices)


def logical_to_mesh_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions have the `logical` names.

    A mesh axis is used at most once per array; a dimension not divisible by its mesh axes' size is replicated.
    """
    if not logical:
        return PartitionSpec()
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match array shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, size in zip(logical, shape):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        if not axes or size % int(np.prod([mesh.shape[a] for a in axes])):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for every array of an (abstract or concrete) NNX state, from its logical axis metadata."""
    logical = nnx.get_partition_spec(state)

    def to_sharding(spec_var, value_var):
        spec = spec_var.get_value() if _is_variable(spec_var) else spec_var
        value = value_var.get_value() if _is_variable(value_var) else value_var
        names = tuple(spec) if isinstance(spec, PartitionSpec) else None
        return NamedSharding(mesh, logical_to_mesh_spec(names, np.shape(value), mesh, rules))

    return jax.tree.map(to_sharding, logical, state, is_leaf=_is_variable)


def _axis_size(mesh: Mesh | AbstractMesh, axis: str) -> int:
    return mesh.shape[axis] if axis in mesh.shape else 1


def batch_sharding(mesh: Mesh | AbstractMesh, ndim: int = 2, *, leading: int = 0, sequence: bool = True) -> NamedSharding:
    """Shard dimension `leading` of an `ndim`-array over ("data", "fsdp") and, with `sequence` and a sequence axis
    of size > 1, dimension `leading + 1` (the positions) over "sequence"; the rest is replicated."""
    spec: list = [None] * ndim
    spec[leading] = BATCH_AXES
    if sequence and ndim > leading + 1 and _axis_size(mesh, SEQUENCE_AXIS) > 1:
        spec[leading + 1] = SEQUENCE_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain_batch(x: jax.Array, mesh: Mesh | None, *, leading: int = 0) -> jax.Array:
    """Sharding constraint: activations split by batch over ("data", "fsdp") and by position over "sequence" (the
    dimension after the batch, when there is one and it divides; no-op without a mesh)."""
    if mesh is None or mesh.size == 1 or x.shape[leading] % (mesh.shape["data"] * mesh.shape["fsdp"]):
        return x
    shards = _axis_size(mesh, SEQUENCE_AXIS)
    sequence = x.ndim > leading + 1 and shards > 1 and x.shape[leading + 1] % shards == 0
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim, leading=leading, sequence=sequence))
