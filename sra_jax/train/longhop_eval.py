"""Scoring a model on longhop problems under one critical-set source: the rows of the longhop table and the demo.

Sources (`CRITICAL_SOURCES`), all through the model's public call (`critical=` forces a set, `key=None` lets the
router pick its deterministic top-k):
  dense    every token critical: with `queries="all"` SRA attention is then exactly causal attention
  window   no token critical: the window and the global tokens only
  random   ceil(alpha * tokens) uniformly random positions per row
  oracle   the task's answer key (the tokens of the chain's statements)
  learned  the model's routers
  per_query  an NSA / DSA model's own per-query selection (`SRAConfig.attention` "nsa" / "dsa"): no critical set;
           its selected fraction is the share of the causal (query, key) pairs its NSA / DSA layers attended, and it
           has no router precision / recall (None)

Accuracy is teacher-forced exact match of the whole target (answer, or CoT chain and answer), which equals greedy
decoding of it (see sra_jax.train.losses.answer_correct). FLOPs are counted from the masks the call used (for NSA /
DSA layers: the pairs they attended plus the DSA indexer's scoring, see `sra_jax.nn.ModelAux`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Bool, Float

from sra_jax.data import longhop
from sra_jax.evals.stats import wilson_interval
from sra_jax.nn import attention_flops, router_flops
from sra_jax.train import losses, router_distill, sharding
from sra_jax.train.checkpoint import Checkpointer
from sra_jax.train.config import TrainConfig
from sra_jax.train.frozen import frozen_weights
from sra_jax.train.step import Trainer, TrainState, create_trainer

CRITICAL_SOURCES = ("dense", "window", "random", "oracle", "learned", "per_query")


def with_weights(config: TrainConfig, params) -> tuple[Trainer, TrainState]:
    """A fresh trainer and state of `config` (an SRA model) holding the weights in `params` (a dense base's
    nnx.State, or another SRA model's); parameters missing from `params` (the routers) keep their initial values."""
    trainer, state = create_trainer(config, sharding.make_mesh(config.mesh.resolve(jax.device_count())))
    model = trainer.model(state.params)
    nnx.update(model, params)
    return trainer, state.replace(params=nnx.state(model, nnx.Param))


def start_from(config: TrainConfig, params) -> None:
    """Make `params` the step-0 checkpoint of `config`'s run (unless it has a checkpoint already), so
    `sra_jax.train.loop.run(config)` trains from them: a router retrofitted onto a trained base in one process."""
    if not config.checkpoint.dir:
        raise ValueError("config.checkpoint.dir must be set: the start is written there as step 0")
    run_config = config.to_dict()
    with Checkpointer(config.checkpoint.dir, config.checkpoint, run_config=run_config, owner=True,
                      frozen=frozen_weights(config)) as manager:
        if manager.latest_step() is None:
            manager.save(with_weights(config, params)[1], step=0, force=True)
            manager.wait()


def critical_sets(source: str, batch: longhop.LonghopBatch, num_layers: int, *, alpha: float,
                  seed: int) -> Bool[np.ndarray, "layers b s"] | None:
    """The forced critical set [layers, b, s] of `source` (the same set in every layer), or None for "learned" and
    "per_query"."""
    if source not in CRITICAL_SOURCES:
        raise ValueError(f"source={source!r} must be one of {CRITICAL_SOURCES}")
    valid = batch.positions >= 0
    per_row = {
        "dense": valid,
        "window": np.zeros_like(valid),
        "random": longhop.random_critical(batch.oracle, batch.positions, alpha, seed),
        "oracle": batch.oracle,
        "learned": None,
        "per_query": None,
    }[source]
    return None if per_row is None else np.broadcast_to(per_row, (num_layers, *valid.shape))


@nnx.jit
def _forward(model, tokens, positions, loss_mask, critical):
    logits, aux = model(tokens, positions, critical=critical)
    dense, sparse = attention_flops(model.config, aux)
    layers = jnp.asarray(aux.sra_layers or (0,), jnp.int32)
    picked = aux.critical[layers]  # [sra layers, b, s]
    per_query = [i for i, layer in enumerate(model.layers) if layer.per_query]  # NSA / DSA layers
    if aux.sra_layers:
        selected = aux.selected_fraction[layers].mean(0)
    elif per_query:  # the share of causal pairs they attended (their selection work left out)
        pq = jnp.asarray(per_query, jnp.int32)
        selected = ((aux.visible_pairs - aux.selection_pairs)[pq] / jnp.maximum(aux.causal_pairs[pq], 1.0)).mean(0)
    else:
        selected = jnp.ones(tokens.shape[:1])
    return losses.answer_correct(logits, tokens, loss_mask), dense, sparse, selected, picked


def _matmul_flops(model: nnx.Module, tokens: int) -> float:
    """Forward FLOPs of the projections, MLPs and head on `tokens` tokens: 2 per weight per token (the embedding
    lookup is free; a tied head is a matmul with the embedding)."""
    cfg = model.config
    params = sum(int(np.prod(x.shape)) for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param))
                 if "router" not in map(str, path))
    head = cfg.vocab_size * cfg.hidden_size
    matmul_params = params - head + (head if cfg.tie_word_embeddings else 0)
    return 2.0 * matmul_params * tokens


def score(model: nnx.Module, batch: longhop.LonghopBatch, source: str, *, alpha: float, seed: int = 0,
          chunk: int = 64) -> dict[str, float]:
    """accuracy (with its Wilson 95% CI), attention and total FLOPs vs dense, selected fraction, router precision and
    recall against the oracle (over the prompt; mean over SRA layers), latency per query, generated tokens."""
    num_layers = model.config.num_hidden_layers
    has_per_query = any(layer.per_query for layer in model.layers)
    if (source == "per_query") != has_per_query:
        raise ValueError(f"source={source!r} does not fit this model: 'per_query' scores exactly the models with NSA / "
                         f"DSA layers (sra.attention nsa / dsa), which have no critical set to force or route")
    forced = critical_sets(source, batch, num_layers, alpha=alpha, seed=seed)
    parts, seconds = [], 0.0
    for start in range(0, batch.tokens.shape[0], chunk):
        rows = slice(start, start + chunk)
        args = (jnp.asarray(batch.tokens[rows]), jnp.asarray(batch.positions[rows]), jnp.asarray(batch.loss_mask[rows]),
                None if forced is None else jnp.asarray(forced[:, rows]))
        if start == 0:
            jax.block_until_ready(_forward(model, *args))  # compile outside the timing
        began = time.perf_counter()
        parts.append(jax.device_get(jax.block_until_ready(_forward(model, *args))))
        seconds += time.perf_counter() - began
    correct, dense, sparse, selected, picked = (np.concatenate(p, axis=1 if i == 4 else 0)
                                                for i, p in enumerate(zip(*parts)))
    in_prompt = np.arange(batch.tokens.shape[1])[None] < batch.prompt_lengths[:, None]
    chosen = picked & in_prompt[None]
    oracle = batch.oracle[None]
    hits = (chosen & oracle).sum()
    n, tokens = len(correct), int((batch.positions >= 0).sum())
    matmul = _matmul_flops(model, tokens)
    routers = router_flops(model, tokens) if source == "learned" else 0
    low, high = wilson_interval(int(correct.sum()), n)
    return {
        "accuracy": float(correct.mean()), "ci_low": low, "ci_high": high, "n": n,
        "attention_flops_vs_dense": float(sparse.sum() / dense.sum()),
        "total_flops_vs_dense": float((matmul + sparse.sum() + routers) / (matmul + dense.sum())),
        "selected_fraction": float(selected.mean()),
        "router_precision": None if has_per_query else float(hits / max(chosen.sum(), 1)),
        "router_recall": None if has_per_query else float(hits / max(oracle.sum() * chosen.shape[0], 1)),
        "latency_ms": 1000.0 * seconds / n,
        "generated_tokens": float(batch.loss_mask.sum() / n),
    }



def top_mass_sets(mass: Float[np.ndarray, "b s"], batch: longhop.LonghopBatch, alpha: float) -> Bool[np.ndarray, "b s"]:
    """The ceil(alpha * valid tokens) prompt keys of each row with the most `mass` (the budget of `random`)."""
    in_prompt = np.arange(mass.shape[1])[None] < batch.prompt_lengths[:, None]
    scores = np.where(in_prompt, mass, -np.inf)
    counts = np.maximum(1, np.ceil(alpha * (batch.positions >= 0).sum(1) - 1e-9).astype(int))
    order = np.argsort(-scores, axis=1, kind="stable")
    chosen = np.zeros(mass.shape, bool)
    for row, k in enumerate(counts):
        chosen[row, order[row, :k]] = True
    return chosen & in_prompt


def top_mass_overlap(mass: Float[np.ndarray, "b s"], batch: longhop.LonghopBatch, alpha: float) -> dict[str, float]:
    """Precision and recall against the oracle of `top_mass_sets` (pooled over rows, as `score` pools the router's
    picks), and the share of the prompt's mass on oracle keys."""
    chosen = top_mass_sets(mass, batch, alpha)
    in_prompt = np.arange(mass.shape[1])[None] < batch.prompt_lengths[:, None]
    hits = (chosen & batch.oracle).sum()
    prompt_mass = np.where(in_prompt, mass, 0.0)
    return {"precision": float(hits / max(chosen.sum(), 1)), "recall": float(hits / max(batch.oracle.sum(), 1)),
            "oracle_mass_share": float((prompt_mass * batch.oracle).sum() / max(prompt_mass.sum(), 1e-30))}


def teacher_masses(model: nnx.Module, batch: longhop.LonghopBatch, *, queries: str = "target",
                   chunk: int = 64) -> Float[np.ndarray, "layers b s"]:
    """[SRA layers, b, s]: the attention mass every key receives in the dense teacher (the model with every token
    critical) from `queries` (`sra_jax.train.router_distill.QUERY_SETS`), outside each query's window and the global
    tokens (`router_distill.teacher_attention`: the router distillation's target). `model` must have SRA layers
    (their window and globals define what counts)."""
    if not model.sra_layers:
        raise ValueError("teacher_masses needs a model with SRA layers (load it with an SRAConfig)")

    @nnx.jit
    def masses(model, tokens, positions, loss_mask):
        weights = router_distill.query_weights(positions, loss_mask, queries)
        _, per_layer = router_distill.teacher_attention(model, tokens, positions, None, weights)
        return jnp.stack([per_layer[i] for i in model.sra_layers])

    parts = [jax.device_get(masses(model, *(jnp.asarray(x[start:start + chunk])
                                            for x in (batch.tokens, batch.positions, batch.loss_mask))))
             for start in range(0, batch.tokens.shape[0], chunk)]
    return np.concatenate(parts, axis=1)


def attention_oracle_overlap(model: nnx.Module, batch: longhop.LonghopBatch, *, alphas: tuple[float, ...],
                             queries: str = "target", chunk: int = 64) -> dict[str, dict]:
    """Does the dense teacher attend to the answer key? Per SRA layer, and summed over them ("sum"),
    `top_mass_overlap` of `teacher_masses` at each alpha."""
    mass = teacher_masses(model, batch, queries=queries, chunk=chunk)
    named = {f"layer{i}": mass[n] for n, i in enumerate(model.sra_layers)} | {"sum": mass.sum(0)}
    return {name: {str(alpha): top_mass_overlap(m, batch, alpha) for alpha in alphas} for name, m in named.items()}
