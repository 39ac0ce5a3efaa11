"""Building a `Llama` from tensors without ever materialising its random initialisation, and placing each tensor
on devices (whole, or shard by shard with `jax.make_array_from_callback` when a mesh or shardings are given)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.convert.mapping import ParamPath, path_str
from sra_jax.nn.per_query import is_extra_param

Shardings = (
    Callable[[ParamPath, tuple[int, ...]], jax.sharding.Sharding | None]
    | Mapping[str, jax.sharding.Sharding]
    | Any  # an nnx.State / nested dict of Sharding mirroring the parameters (e.g. from nnx.get_named_sharding)
)


def is_router(path: ParamPath) -> bool:
    """A parameter no Llama checkpoint has: an SRA router's, or an NSA / DSA layer's extra (see nn.per_query)."""
    return is_extra_param(path)


def abstract_model(
    config: LlamaConfig,
    sra: SRAConfig | None,
    *,
    dtype: Any,
    param_dtype: Any,
    attention_impl: str = "reference",
) -> tuple[nnx.GraphDef, list[tuple[ParamPath, nnx.Variable]]]:
    """The model's graph and its variables as shape/dtype placeholders (no memory, no random numbers)."""
    from sra_jax.nn import Llama

    model = nnx.eval_shape(
        lambda: Llama(
            config, sra, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
        )
    )
    graphdef, state = nnx.split(model)
    return graphdef, list(nnx.to_flat_state(state))


def fresh_router_values(
    config: LlamaConfig, sra: SRAConfig, *, seed: int, param_dtype: Any
) -> dict[ParamPath, jax.Array]:
    """Newly initialised router parameters (for starting SRA from a dense checkpoint).

    The whole model is traced but only the routers are returned, so XLA drops every other initialiser.
    """
    from sra_jax.nn import Llama

    def routers():
        model = Llama(config, sra, rngs=nnx.Rngs(seed), param_dtype=param_dtype)
        return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if is_router(p)}

    return jax.jit(routers)()


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if isinstance(meta.get(key), tuple | list):
            return tuple(meta[key])
    return None


def _lookup(tree: Any, path: ParamPath) -> Any:
    for key in path:
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            return None
    return tree.get_value() if isinstance(tree, nnx.Variable) else tree


def sharding_for(
    path: ParamPath,
    variable: nnx.Variable,
    shape: tuple[int, ...],
    *,
    mesh: jax.sharding.Mesh | None,
    shardings: Shardings | None,
) -> jax.sharding.Sharding | None:
    """The sharding a parameter is placed with: from `shardings` (a callable, a {"dotted.path": Sharding} mapping or
    a state-shaped tree such as `sra_jax.train.sharding.state_shardings`), else from the parameter's logical axis
    names and the trainer's rules on `mesh`; None means the default device."""
    if shardings is not None:
        if callable(shardings):
            return shardings(path, shape)
        if isinstance(shardings, Mapping) and path_str(path) in shardings:
            return shardings[path_str(path)]
        found = _lookup(shardings, path)
        if found is None:
            raise ValueError(f"shardings has no entry for parameter {path_str(path)!r}")
        return found
    if mesh is None:
        return None
    from sra_jax.train.sharding import logical_to_mesh_spec  # the project's one rules table

    return jax.sharding.NamedSharding(mesh, logical_to_mesh_spec(logical_axes(variable), shape, mesh))


def place(source: np.ndarray, dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Copy a host array (a memory map, possibly a transposed view) to devices in `dtype`.

    With a sharding, each process reads only the slices its devices hold. A transposed view (a linear layer's
    weight read from a Hugging Face file) is copied in its stored layout and transposed on the devices: a strided
    host copy of an 8B model's matrices takes minutes, the device transpose milliseconds.
    """
    dtype = np.dtype(dtype)
    if source.ndim == 2 and not source.flags.c_contiguous and source.T.flags.c_contiguous:
        stored_sharding = _transposed(sharding)
        if sharding is None or stored_sharding is not None:
            stored = place(source.T, dtype, stored_sharding)
            return _device_transpose(stored, sharding)
    if sharding is None:
        return jnp.asarray(np.ascontiguousarray(source).astype(dtype, copy=False))
    return jax.make_array_from_callback(
        source.shape, sharding, lambda index: np.ascontiguousarray(source[index]).astype(dtype, copy=False)
    )


def _transposed(sharding: jax.sharding.Sharding | None) -> jax.sharding.Sharding | None:
    """The sharding of a matrix's transpose, for a NamedSharding (None for any other kind)."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[::-1]))


def _device_transpose(x: jax.Array, sharding: jax.sharding.Sharding | None) -> jax.Array:
    out = jax.jit(jnp.transpose, out_shardings=sharding)(x)
    x.delete()
    return out


def merge(
    graphdef: nnx.GraphDef,
    flat: list[tuple[ParamPath, nnx.Variable]],
    values: Mapping[ParamPath, jax.Array],
) -> nnx.Module:
    """The model whose every variable takes its value from `values` (keys are parameter paths)."""
    missing = [path_str(p) for p, _ in flat if p not in values]
    if missing:
        raise ValueError(f"no value for model variables {missing}")
    filled = [(p, v.replace(values[p])) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
