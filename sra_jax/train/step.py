"""The train step shared by `sra-jax train`, the demo and the tests: state, loss, gradient accumulation, update.

`TrainState` holds everything a checkpoint needs (params, optimizer state, step, base RNG key); the per-step key is
`fold_in(rng, step)`, so a resumed run draws exactly the keys an uninterrupted one would. One step = one global batch
split into `grad_accum` micro-batches (leading axis of every batch array); a step whose loss or gradient is not
finite leaves params and optimizer state untouched and reports `skipped = 1`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from sra_jax.ops import sequence_parallel
from sra_jax.train import losses, rl, sharding
from sra_jax.train.config import LossConfig, TrainConfig
from sra_jax.train.optimizer import make_optimizer

_logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Counts, summed over micro-batches (every other metric is averaged). "examples" / "examples_correct" (packed rows
# only) make "accuracy" exact over the whole batch although micro-batches hold different numbers of examples.
SUMMED_METRICS = ("tokens", "padded_tokens", "examples", "examples_correct")


# Fields are typed Any because the same containers also carry the NamedShardings of their arrays (jit in/out specs).
@struct.dataclass
class TrainState:
    params: Any  # nnx.State of nnx.Param
    opt_state: Any
    step: Any  # int32 scalar: global batches consumed (also the data position)
    rng: Any  # uint32 raw key data of the run's base key


@struct.dataclass
class Batch:
    """A global batch split into micro-batches: int32 tokens / positions and bool loss_mask, [accum, batch, seq];
    int32 segment_ids (1.. per packed example, 0 on padding) with data.pack, else None (one example per row)."""

    tokens: Any
    positions: Any
    loss_mask: Any
    segment_ids: Any = None


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything static about a run: the model's graph, optimizer, mesh and the shardings of state and batch."""

    config: TrainConfig
    graphdef: Any
    rest: Any  # non-parameter model state (kept fixed)
    tx: optax.GradientTransformation
    mesh: Mesh
    state_shardings: Any
    batch_shardings: Any

    @functools.cached_property
    def step_fn(self):
        """jit(train_step) with in/out shardings; the state argument is donated. For loss.kind == "grpo" a
        `sra_jax.train.lm_rl.GRPOStep` (same call signature; it samples and grades rollouts between the steps)."""
        if self.config.loss.kind == "grpo":
            from sra_jax.train.lm_rl import GRPOStep

            return GRPOStep(self)
        fn = functools.partial(
            train_step, graphdef=self.graphdef, rest=self.rest, tx=self.tx, loss=self.config.loss,
            has_sra=self.config.sra is not None, mesh=self.mesh, router_only=self.config.init.trainable == "router",
        )
        metric_sharding = sharding.replicated(self.mesh)
        return jax.jit(fn, in_shardings=(self.state_shardings, self.batch_shardings),
                       out_shardings=(self.state_shardings, metric_sharding), donate_argnums=0)

    def model(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest)

    def put_batch(self, arrays: dict[str, np.ndarray]) -> Batch:
        """Global numpy batch [a, b, s] -> sharded Batch. Each process passes only its own rows (see `local_rows`).
        "segment_ids" must be there exactly when data.pack is on."""
        packed = self.batch_shardings.segment_ids is not None
        if packed != ("segment_ids" in arrays):
            raise ValueError(f"data.pack={str(packed).lower()} but the batch {'lacks' if packed else 'has'} "
                             f"segment_ids (packed rows need them; unpacked rows must not have them)")

        def put(name):
            local = np.asarray(arrays[name])
            sh = getattr(self.batch_shardings, name)
            global_shape = (local.shape[0], local.shape[1] * jax.process_count(), local.shape[2])
            return jax.make_array_from_process_local_data(sh, local, global_shape)

        return Batch(tokens=put("tokens"), positions=put("positions"), loss_mask=put("loss_mask"),
                     segment_ids=put("segment_ids") if packed else None)


def local_rows(batch_size: int) -> slice:
    """The rows of a global micro-batch that this process feeds (processes split the batch evenly, in order)."""
    per_process = batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def build_model(config: TrainConfig, seed: int | None = None) -> nnx.Module:
    from sra_jax.nn import Llama

    return Llama(
        config.model, config.sra, rngs=nnx.Rngs(config.seed if seed is None else seed),
        dtype=DTYPES[config.compute_dtype], param_dtype=DTYPES[config.param_dtype],
        attention_impl=config.attention_impl, remat=config.remat,
    )


def _split_fresh_model(config: TrainConfig):
    """(graphdef, params, rest) of a freshly initialised model, nothing sharded eagerly (jit places it)."""
    with nnx.use_eager_sharding(False):
        return nnx.split(build_model(config), nnx.Param, ...)


class TrainLayout(NamedTuple):
    """The abstract train state of a config on a mesh and every sharding of it; nothing is allocated."""

    graphdef: Any
    abstract_params: Any  # nnx.State of ShapeDtypeStructs
    abstract_rest: Any
    abstract_opt: Any  # optimizer state of the trainable part
    tx: optax.GradientTransformation
    state_shardings: TrainState  # of NamedShardings
    batch_shardings: Batch  # of NamedShardings


def train_layout(config: TrainConfig, mesh: Mesh) -> TrainLayout:
    """Shapes and shardings of the model, optimizer state and batches of `config` on `mesh` (abstract evaluation
    only): what `create_trainer` materialises, and what a memory estimate lowers the step on."""
    graphdef, abstract_params, abstract_rest = jax.eval_shape(functools.partial(_split_fresh_model, config))
    param_shardings = sharding.state_shardings(abstract_params, mesh)
    replicated = sharding.replicated(mesh)
    tx = make_optimizer(config.optim, config.steps)
    trained_params, trained_shardings = trainable_part(config, abstract_params), trainable_part(config, param_shardings)
    abstract_opt = jax.eval_shape(tx.init, trained_params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract_opt, trained_shardings,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, (NamedSharding, nnx.Variable)),
    )
    state_shardings = TrainState(params=param_shardings, opt_state=opt_shardings, step=replicated, rng=replicated)
    batch_sh = sharding.batch_sharding(mesh, 3, leading=1)
    batch_shardings = Batch(tokens=batch_sh, positions=batch_sh, loss_mask=batch_sh,
                            segment_ids=batch_sh if config.data.pack else None)
    return TrainLayout(graphdef, abstract_params, abstract_rest, abstract_opt, tx, state_shardings, batch_shardings)


def create_trainer(config: TrainConfig, mesh: Mesh) -> tuple[Trainer, TrainState]:
    """Initialise params directly into their shardings (no host copy of the full model) and the optimizer state."""
    layout = train_layout(config, mesh)
    shardings = layout.state_shardings
    replicated = sharding.replicated(mesh)
    rest_shardings = jax.tree.map(lambda _: replicated, layout.abstract_rest)
    if config.init.from_ is None:
        params, rest = jax.jit(lambda: _split_fresh_model(config)[1:],
                               out_shardings=(shardings.params, rest_shardings))()
    else:
        params = load_initial_params(config, shardings.params)
        rest = jax.jit(lambda: _split_fresh_model(config)[2], out_shardings=rest_shardings)()

    opt_state = jax.jit(layout.tx.init, out_shardings=shardings.opt_state)(trainable_part(config, params))
    rng = jax.random.key_data(jax.random.key(config.seed))
    # Every leaf placed with its final sharding, so the first donated step does not compile a second time.
    state = TrainState(params=params, opt_state=opt_state, step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                       rng=jax.device_put(rng, replicated))
    trainer = Trainer(config, layout.graphdef, rest, layout.tx, mesh, shardings, layout.batch_shardings)
    return trainer, state


def is_router_param(path, _value=None) -> bool:
    """nnx filter: the SRA routers' parameters (everything else is the Llama)."""
    return any(str(getattr(k, "key", k)) == "router" for k in path)


def trainable_part(config: TrainConfig, params):
    """The parameters the optimizer updates: all of them, or the routers' only (init.trainable == "router")."""
    if config.init.trainable == "router":
        return nnx.filter_state(params, is_router_param)
    return params


def load_initial_params(config: TrainConfig, param_shardings):
    """The parameters of `init.from` (routers fresh unless the source holds them), each streamed into its
    sharding."""
    from sra_jax.convert.source import describe, load_source, resolve_source

    source = resolve_source(config.init.from_)
    _, _, model = load_source(
        source, dtype=DTYPES[config.param_dtype], compute_dtype=DTYPES[config.compute_dtype],
        shardings=param_shardings, sra=config.sra, router_seed=config.seed, attention_impl=config.attention_impl)
    params = nnx.state(model, nnx.Param)
    expected = {p for p, _ in nnx.to_flat_state(param_shardings)}
    got = {p for p, _ in nnx.to_flat_state(params)}
    if expected != got:
        raise ValueError(f"init.from={config.init.from_!r} ({describe(source)}) gives parameters that do not match "
                         f"the model: missing {sorted(map(str, expected - got))[:8]}, "
                         f"unexpected {sorted(map(str, got - expected))[:8]}")
    _logger.info("initial weights from %s", describe(source))
    # Placed by the loader already; a no-op except for freshly initialised routers.
    return jax.device_put(params, param_shardings)


def _mean_over_layers(x: jax.Array, layers: tuple[int, ...] | None = None) -> jax.Array:
    """[L, b] -> [b]: the mean over `layers` (default all); 1 when there are none (a dense model)."""
    if layers is not None:
        if not layers:
            return jnp.ones(x.shape[1:], jnp.float32)
        x = x[jnp.asarray(layers)]
    return x.astype(jnp.float32).mean(axis=0)


def loss_fn(params, tokens, positions, loss_mask, key, step, segment_ids=None, *, graphdef, rest, loss: LossConfig,
            has_sra: bool, mesh: Mesh | None):
    """Weighted sum of the configured losses on one micro-batch, and its metrics (scalars).

    `segment_ids` (packed rows) go to the model, so attention stays within each example; the CE is the same masked
    mean over target tokens, and "accuracy" is over examples (segments) instead of rows. "tokens" counts real tokens,
    "padded_tokens" every slot (real + padding)."""
    model = nnx.merge(graphdef, params, rest)
    group = loss.group_size if loss.uses_rl else 1
    if group > 1:
        tokens, positions, loss_mask = (jnp.repeat(x, group, axis=0) for x in (tokens, positions, loss_mask))
    tokens = sharding.constrain_batch(tokens, mesh)
    positions = sharding.constrain_batch(positions, mesh)
    if segment_ids is not None:
        if loss.uses_rl:
            raise ValueError("packed rows (segment_ids) cannot train the router with RL: rewards are per row")
        segment_ids = sharding.constrain_batch(segment_ids, mesh)
    tau = selection_temperature(loss, step)
    # a mesh with sequence > 1: attention and the router's top-k run sequence-parallel (no-op otherwise)
    sequence = functools.partial(sequence_parallel.sequence_sharding, mesh, batch_axes=sharding.BATCH_AXES)
    with sequence():
        logits, aux = model(tokens, positions, segment_ids=segment_ids, key=key if has_sra else None, tau=tau)
    logits = sharding.constrain_batch(logits, mesh)
    ce = losses.cross_entropy(logits, tokens, loss_mask)
    correct = losses.answer_correct(logits, tokens, loss_mask)
    counts = {}
    if segment_ids is None:
        accuracy = correct.mean()
    else:
        per_segment, present = losses.segment_answer_correct(logits, tokens, loss_mask, segment_ids)
        counts = {"examples": jnp.sum(present).astype(jnp.float32),
                  "examples_correct": jnp.sum(per_segment & present).astype(jnp.float32)}
        accuracy = counts["examples_correct"] / jnp.maximum(counts["examples"], 1.0)
    selected = _mean_over_layers(aux.selected_fraction, aux.sra_layers)
    density = _mean_over_layers(aux.mask_density)
    total = jnp.zeros((), jnp.float32)
    metrics = {"ce": ce, "accuracy": accuracy.astype(jnp.float32), "selected_fraction": selected.mean(),
               "mask_density": density.mean(), "tokens": jnp.sum(positions >= 0).astype(jnp.float32),
               "padded_tokens": jnp.asarray(positions.size, jnp.float32), **counts}
    if has_sra:
        metrics["tau"] = jnp.asarray(model.sra.tau if tau is None else tau, jnp.float32)
    if loss.uses_sl:
        total += loss.sl_weight * ce
    if loss.teacher_kl_weight and has_sra:
        num_layers = aux.critical.shape[0]
        everything = jnp.ones((num_layers, *tokens.shape), bool)  # all critical: SRA attention == dense attention
        with sequence():
            teacher_logits, _ = model(tokens, positions, critical=everything)
        kl = losses.teacher_kl(logits, teacher_logits, loss_mask)
        total += loss.teacher_kl_weight * kl
        metrics["teacher_kl"] = kl
    if loss.uses_rl:
        generated = jnp.sum(loss_mask, axis=-1)
        rewards = rl.reward(correct, selected, generated, token_penalty=loss.token_penalty,
                            length_penalty=loss.length_penalty)
        advantages = rl.group_advantages(rewards, group, eps=loss.advantage_eps)
        pg = rl.policy_gradient_loss(aux.selection_log_prob, advantages)
        temperature = metrics["tau"]
        entropy = rl.router_entropy(aux.router_logits, positions >= 0, temperature=temperature)
        total += loss.rl_weight * (pg - loss.entropy_weight * entropy)
        metrics.update(reward=rewards.mean(), policy_loss=pg, router_entropy=entropy, temperature=temperature)
    metrics["loss"] = total
    return total, metrics


def selection_temperature(loss: LossConfig, step) -> jax.Array | None:
    """The router's selection temperature at `step` (a traced scalar), or None to keep the model's sra.tau."""
    if loss.temperature_start is None:
        return None
    end = loss.temperature_start if loss.temperature_end is None else loss.temperature_end
    return rl.temperature_schedule(step, start=loss.temperature_start, end=end, steps=loss.temperature_steps)


def _only_router(grads):
    """Zero every gradient except the routers' (loss.kind == "rl" trains the selection policy alone)."""
    def keep(path, g):
        return g if any("router" in str(getattr(p, "key", p)) for p in path) else jnp.zeros_like(g)

    return jax.tree_util.tree_map_with_path(keep, grads)


def train_step(state: TrainState, batch: Batch, *, graphdef, rest, tx, loss: LossConfig, has_sra: bool,
               mesh: Mesh | None = None, router_only: bool = False):
    """One optimizer step over `batch` (accumulating gradients over its leading micro-batch axis)."""
    objective = functools.partial(loss_fn, graphdef=graphdef, rest=rest, loss=loss, has_sra=has_sra, mesh=mesh)

    def micro_loss(params, micro: Batch, key, step):
        return objective(params, micro.tokens, micro.positions, micro.loss_mask, key, step, micro.segment_ids)

    return apply_step(state, batch, micro_loss, tx=tx, only_router=loss.kind == "rl", router_only=router_only)


def apply_step(state: TrainState, batch: Any, objective, *, tx, only_router: bool = False,
               router_only: bool = False):
    """Gradient accumulation and the guarded update shared by every loss kind.

    `batch` is a pytree whose leaves have a leading micro-batch axis; `objective(params, micro_batch, key, step)`
    returns (loss, metrics of scalars). Gradients and metrics are averaged over micro-batches (the counts in
    SUMMED_METRICS summed; "real_token_fraction" = tokens / padded_tokens is added when both are there, and
    "accuracy" = examples_correct / examples when the counts are there); a
    non-finite loss or gradient leaves params and optimizer state untouched (`skipped` = 1).

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

    grad_norm = optax.global_norm(grads)
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
