"""The train step shared by `sra-jax train`, the demo and the tests: the trainer (model, optimizer, shardings), its
state, and the jitted step of each loss kind (loss terms: `objectives`; gradient accumulation and update: `update`;
GRPO's rollouts: `lm_rl`).

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

from sra_jax.nn.llama import most_segments
from sra_jax.train import sharding
from sra_jax.train.config import LossConfig, TrainConfig
from sra_jax.train.lm_rl import GRPOStep
from sra_jax.train.objectives import loss_fn, selection_temperature  # noqa: F401  (public here too)
from sra_jax.train.optimizer import make_optimizer
from sra_jax.train.update import SUMMED_METRICS, apply_step, is_router_param, trainable_part  # noqa: F401

_logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
            return GRPOStep(self)
        fn = functools.partial(
            train_step, graphdef=self.graphdef, rest=self.rest, tx=self.tx, loss=self.config.loss,
            has_sra=self.config.sra is not None, mesh=self.mesh, router_only=self.config.init.trainable == "router",
            max_segments=self.config.data.max_segments if self.config.data.pack else None,
        )
        metric_sharding = sharding.replicated(self.mesh)
        return jax.jit(fn, in_shardings=(self.state_shardings, self.batch_shardings),
                       out_shardings=(self.state_shardings, metric_sharding), donate_argnums=0)

    def model(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest)

    def initial_params(self):
        """The parameters the run starts from, built again (fresh from `seed`, or loaded from `init.from`) into
        their shardings: GRPO's KL reference."""
        if self.config.init.from_ is None:
            return jax.jit(lambda: _split_fresh_model(self.config)[1], out_shardings=self.state_shardings.params)()
        return load_initial_params(self.config, self.state_shardings.params)

    def put_batch(self, arrays: dict[str, np.ndarray]) -> Batch:
        """Global numpy batch [a, b, s] -> sharded Batch. Each process passes only its own rows (see `local_rows`).
        "segment_ids" must be there exactly when data.pack is on."""
        packed = self.batch_shardings.segment_ids is not None
        if packed != ("segment_ids" in arrays):
            raise ValueError(f"data.pack={str(packed).lower()} but the batch {'lacks' if packed else 'has'} "
                             f"segment_ids (packed rows need them; unpacked rows must not have them)")
        if packed:  # the step compiles data.max_segments in as a static bound: a row over it would be wrong
            bound = self.config.data.max_segments
            most = most_segments(arrays["segment_ids"], arrays["positions"])
            if most > bound:
                raise ValueError(f"data.max_segments={bound}, but a packed row of the batch holds {most} segments")

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


def train_step(state: TrainState, batch: Batch, *, graphdef, rest, tx, loss: LossConfig, has_sra: bool,
               mesh: Mesh | None = None, router_only: bool = False, max_segments: int | None = None):
    """One optimizer step over `batch` (accumulating gradients over its leading micro-batch axis). `max_segments`
    (static; data.max_segments with data.pack): the most segments a packed row holds, passed to the model."""
    objective = functools.partial(loss_fn, graphdef=graphdef, rest=rest, loss=loss, has_sra=has_sra, mesh=mesh,
                                  max_segments=max_segments)

    def micro_loss(params, micro: Batch, key, step):
        return objective(params, micro.tokens, micro.positions, micro.loss_mask, key, step, micro.segment_ids)

    return apply_step(state, batch, micro_loss, tx=tx, only_router=loss.kind == "rl", router_only=router_only)
