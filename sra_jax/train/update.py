"""The optimizer update shared by every loss kind: gradient accumulation over micro-batches, the router-only
gradient, and the guarded update (a step whose loss or gradient is not finite leaves params and optimizer state
untouched and reports `skipped = 1`)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sra_jax.nn.per_query import is_extra_param
from sra_jax.train.config import TrainConfig

# Counts, summed over micro-batches (every other metric is averaged). "examples" / "examples_correct" (packed rows
# only) make "accuracy" exact over the whole batch although micro-batches hold different numbers of examples.
SUMMED_METRICS = ("tokens", "padded_tokens", "examples", "examples_correct")


def is_router_param(path, _value=None) -> bool:
    """nnx filter: the SRA routers' parameters and the NSA / DSA layers' extras (everything else is the Llama)."""
    return is_extra_param(path)


def trainable_part(config: TrainConfig, params):
    """The parameters the optimizer updates: all of them, or the routers' only (init.trainable == "router")."""
    if config.init.trainable == "router":
        return nnx.filter_state(params, is_router_param)
    return params


def frozen_part(config: TrainConfig, params):
    """The parameters that stay as they started (the Llama's with init.trainable == "router"), else None."""
    if config.init.trainable == "router":
        return nnx.split_state(params, is_router_param, ...)[1]
    return None


def _only_router(grads):
    """Zero every gradient except the routers' (loss.kind == "rl" trains the selection policy alone)."""
    def keep(path, g):
        return g if any("router" in str(getattr(p, "key", p)) for p in path) else jnp.zeros_like(g)

    return jax.tree_util.tree_map_with_path(keep, grads)


def apply_step(state: Any, batch: Any, objective, *, tx, only_router: bool = False, router_only: bool = False):
    """Gradient accumulation and the guarded update shared by every loss kind.

    `state` is a `sra_jax.train.step.TrainState`; `batch` is a pytree whose leaves have a leading micro-batch axis;
    `objective(params, micro_batch, key, step)` returns (loss, metrics of scalars). Gradients and metrics are
    averaged over micro-batches (the counts in SUMMED_METRICS summed; "real_token_fraction" = tokens /
    padded_tokens is added when both are there, and "accuracy" = examples_correct / examples when the counts are
    there); a non-finite loss or gradient leaves params and optimizer state untouched (`skipped` = 1).

    router_only (init.trainable == "router"): gradients are taken with respect to the routers' parameters alone (no
    gradient buffer exists for the Llama's), `tx` and its state cover the routers only, and every other parameter
    passes through unchanged.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if router_only:
        trained, frozen = nnx.split_state(state.params, is_router_param, ...)
        full_objective = objective

        def objective(params, *args):
            return full_objective(nnx.merge_state(params, frozen), *args)
    else:
        trained, frozen = state.params, None
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    accum = jax.tree.leaves(batch)[0].shape[0]

    def micro_step(carry, xs):
        grads_sum, metrics_sum = carry
        index, micro = xs
        (_, metrics), grads = grad_fn(trained, micro, jax.random.fold_in(key, index), state.step)
        grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
        metrics_sum = jax.tree.map(jnp.add, metrics_sum, metrics)
        return (grads_sum, metrics_sum), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained)
    first = jax.tree.map(lambda x: x[0], batch)
    metric_shapes = jax.eval_shape(lambda: grad_fn(trained, first, key, state.step)[0][1])
    metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    (grads, metrics), _ = jax.lax.scan(micro_step, (zeros, metric_zeros), (jnp.arange(accum), batch))
    grads = jax.tree.map(lambda g: g / accum, grads)
    metrics = {k: (v if k in SUMMED_METRICS else v / accum) for k, v in metrics.items()}
    if "examples" in metrics:
        metrics["accuracy"] = metrics["examples_correct"] / jnp.maximum(metrics["examples"], 1.0)
    if "tokens" in metrics and "padded_tokens" in metrics:
        metrics["real_token_fraction"] = metrics["tokens"] / jnp.maximum(metrics["padded_tokens"], 1.0)
    if only_router:
        grads = _only_router(grads)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state.opt_state, trained)
    new_params = optax.apply_updates(trained, updates)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    params = keep(new_params, trained)
    if frozen is not None:
        params = nnx.merge_state(params, frozen)
    state = state.replace(params=params, opt_state=keep(new_opt_state, state.opt_state), step=state.step + 1)
    metrics.update(grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
    return state, metrics
