"""The training objective as named loss terms, picked by `loss.kind` (`KIND_TERMS`).

A forward pass (`supervised_outputs` on a supervised micro-batch, `rollout_outputs` on graded GRPO rollouts) runs
the model once and gives `Outputs`: the logits and SRA statistics, the inputs they came from, the metrics every kind
reports, and (RL kinds) the rewards' group advantages. Each loss term is a small function
`term(outputs, loss_config) -> (contribution to the loss, metrics)` registered with `@register_loss_term(name)`; the
objective is the sum of the active terms of `loss.kind`, in `KIND_TERMS` order. A new term is one registered
function and its name in `KIND_TERMS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float

from sra_jax.ops import sequence_parallel
from sra_jax.train import losses, rl, router_distill, sharding
from sra_jax.train.config import LossConfig


@dataclasses.dataclass(frozen=True)
class Outputs:
    """One forward pass of the trained model on a micro-batch (traced values), what every loss term reads."""

    model: nnx.Module
    tokens: Any  # int32 [b, s], the rows the model ran on (repeated `group_size` times for router RL)
    positions: Any  # int32 [b, s], -1 on padding
    segment_ids: Any  # int32 [b, s] for packed rows, else None
    target_mask: Any  # bool [b, s]: the tokens the loss is on (the answer, or the sampled completion)
    logits: Any  # [b, s, v]
    aux: Any  # the model's SRA statistics (`LlamaAux`)
    tau: Any  # float32 scalar: the selection temperature the model ran at; None for a dense model
    metrics: dict[str, Any]  # what the kind reports whatever its terms
    advantages: Any = None  # float32 [b]: group advantages of the rewards (RL kinds), else None
    log_probs: Any = None  # float32 [b, s-1] token log-probs (GRPO: current policy)
    old_log_probs: Any = None  # the policy that sampled the rollout (GRPO)
    ref_log_probs: Any = None  # the initial parameters' (GRPO with grpo.kl_weight > 0)
    max_segments: int | None = None  # static bound on a packed row's segments (data.max_segments), else None


LossTerm = Callable[[Outputs, LossConfig], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class _Registered:
    fn: LossTerm
    active: Callable[[LossConfig, bool], bool]  # (loss config, has_sra) -> whether the term is on


LOSS_TERMS: dict[str, _Registered] = {}

# The terms of each loss.kind (config.LOSS_KINDS), summed in this order; a term whose `active` is False is skipped.
KIND_TERMS: dict[str, tuple[str, ...]] = {
    "sl": ("cross_entropy", "teacher_kl", "indexer_kl", "router_distill"),
    "rl": ("teacher_kl", "indexer_kl", "router_distill", "router_rl"),
    "sl+rl": ("cross_entropy", "teacher_kl", "indexer_kl", "router_distill", "router_rl"),
    "grpo": ("grpo", "indexer_kl", "router_distill", "router_rl"),
}


def register_loss_term(name: str, *, active: Callable[[LossConfig, bool], bool] = lambda loss, has_sra: True):
    """Decorator: register `fn(outputs, loss) -> (contribution, metrics)` as the loss term `name`."""
    def register(fn: LossTerm) -> LossTerm:
        if name in LOSS_TERMS:
            raise ValueError(f"loss term {name!r} is registered twice")
        LOSS_TERMS[name] = _Registered(fn, active)
        return fn

    return register


def active_terms(loss: LossConfig, has_sra: bool) -> tuple[str, ...]:
    """The names of the terms `loss` sums, in order."""
    return tuple(name for name in KIND_TERMS[loss.kind] if LOSS_TERMS[name].active(loss, has_sra))


def total_loss(outputs: Outputs, loss: LossConfig, has_sra: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sum of the active terms of `loss.kind` on `outputs`, and the metrics (the forward's, the terms', and
    "loss")."""
    total = jnp.zeros((), jnp.float32)
    metrics = dict(outputs.metrics)
    for name in active_terms(loss, has_sra):
        value, term_metrics = LOSS_TERMS[name].fn(outputs, loss)
        total = total + value
        metrics.update(term_metrics)
    metrics["loss"] = total
    return total, metrics


# --- the terms ----------------------------------------------------------------------------------------------------

@register_loss_term("cross_entropy")
def cross_entropy_term(outputs: Outputs, loss: LossConfig):
    """`sl_weight` * next-token cross-entropy on the answer tokens (reported as "ce" by every kind)."""
    return loss.sl_weight * outputs.metrics["ce"], {}


@register_loss_term("teacher_kl", active=lambda loss, has_sra: bool(loss.teacher_kl_weight) and has_sra)
def teacher_kl_term(outputs: Outputs, loss: LossConfig):
    """`teacher_kl_weight` * KL(dense teacher || student) on the answer tokens; the teacher is the same weights with
    every token critical (SRA attention is then exactly dense; packed rows stay within each example), under
    stop_gradient."""
    num_layers = outputs.aux.critical.shape[0]
    everything = jnp.ones((num_layers, *outputs.tokens.shape), bool)
    teacher_logits, _ = outputs.model(outputs.tokens, outputs.positions, segment_ids=outputs.segment_ids,
                                      critical=everything, max_segments=outputs.max_segments)
    kl = losses.teacher_kl(outputs.logits, teacher_logits, outputs.target_mask)
    return loss.teacher_kl_weight * kl, {"teacher_kl": kl}


@register_loss_term("indexer_kl", active=lambda loss, has_sra: bool(loss.indexer_kl_weight) and has_sra)
def indexer_kl_term(outputs: Outputs, loss: LossConfig):
    """`indexer_kl_weight` * the DSA indexers' KL to the dense attention distribution, summed over DSA layers (the
    DSA warm-up loss; the attention itself gets no gradient from it, and top-k none to the indexer, so this is what
    trains the indexers). Nothing (and no metric) for a model without DSA layers."""
    sra = getattr(outputs.model, "sra", None)
    if sra is None or sra.attention != "dsa":
        return jnp.zeros((), jnp.float32), {}
    kl = jnp.sum(outputs.aux.indexer_loss)
    return loss.indexer_kl_weight * kl, {"indexer_kl": kl}


@register_loss_term("router_distill", active=lambda loss, has_sra: bool(loss.router_distill_weight) and has_sra)
def router_distill_term(outputs: Outputs, loss: LossConfig):
    """`router_distill_weight` * each SRA router's KL to the dense teacher's attention mass per key, from the
    `router_distill_queries` queries (`router_distill.router_distill_loss`: the DeepSeek-V3.2 indexer warm-up for a
    per-token router). The teacher runs under stop_gradient: only router parameters get its gradient."""
    kl = router_distill.router_distill_loss(outputs.model, outputs.tokens, outputs.positions, outputs.target_mask,
                                            outputs.segment_ids, queries=loss.router_distill_queries)
    return loss.router_distill_weight * kl, {"router_distill": kl}


@register_loss_term("router_rl", active=lambda loss, has_sra: has_sra)
def router_rl_term(outputs: Outputs, loss: LossConfig):
    """`router_rl.weight` * (REINFORCE on the router's selection log-prob with the group advantages
    - `router_rl.entropy_weight` * entropy of the router's first draw at the selection temperature)."""
    pg = rl.policy_gradient_loss(outputs.aux.selection_log_prob, outputs.advantages)
    entropy = rl.router_entropy(outputs.aux.router_logits, outputs.positions >= 0, temperature=outputs.tau)
    value = loss.router_rl.weight * (pg - loss.router_rl.entropy_weight * entropy)
    return value, {"policy_loss": pg, "router_entropy": entropy, "temperature": outputs.tau}


@register_loss_term("grpo")
def grpo_term(outputs: Outputs, loss: LossConfig):
    """The clipped GRPO objective on the completion tokens (`rl.grpo_loss`), with the k3 KL to the initial
    parameters when `grpo.kl_weight` > 0."""
    config = loss.grpo
    mask = outputs.target_mask[:, 1:]
    lm_loss = rl.grpo_loss(outputs.log_probs, outputs.old_log_probs, outputs.advantages, mask,
                           clip_eps=config.clip_eps, kl_weight=config.kl_weight, ref_log_probs=outputs.ref_log_probs)
    ratio = jnp.exp(outputs.log_probs - outputs.old_log_probs)
    clipped = (jnp.abs(ratio - 1.0) > config.clip_eps).astype(jnp.float32)
    metrics = {"lm_loss": lm_loss, "clip_fraction": losses.masked_mean(clipped, mask)}
    if config.kl_weight:
        delta = outputs.ref_log_probs - outputs.log_probs
        metrics["kl"] = losses.masked_mean(jnp.exp(delta) - delta - 1.0, mask)
    return lm_loss, metrics


# --- the forward passes -------------------------------------------------------------------------------------------

def mean_over_layers(x: Float[Array, "l b"], layers: tuple[int, ...] | None = None) -> Float[Array, " b"]:
    """[L, b] -> [b]: the mean over `layers` (default all); 1 when there are none (a dense model)."""
    if layers is not None:
        if not layers:
            return jnp.ones(x.shape[1:], jnp.float32)
        x = x[jnp.asarray(layers)]
    return x.astype(jnp.float32).mean(axis=0)


def selection_temperature(loss: LossConfig, step) -> jax.Array | None:
    """The router's selection temperature at `step` (a traced scalar), or None to keep the model's sra.tau."""
    if loss.temperature_start is None:
        return None
    end = loss.temperature_start if loss.temperature_end is None else loss.temperature_end
    return rl.temperature_schedule(step, start=loss.temperature_start, end=end, steps=loss.temperature_steps)


def _group_advantages(correct, selected, target_mask, loss: LossConfig):
    """(rewards, advantages) of rows in groups of `group_size`; the generated length is the target tokens."""
    generated = jnp.sum(target_mask, axis=-1)
    rewards = rl.reward(correct, selected, generated, token_penalty=loss.token_penalty,
                        length_penalty=loss.length_penalty)
    return rewards, rl.group_advantages(rewards, loss.group_size, eps=loss.advantage_eps)


def _tau(model: nnx.Module, tau, has_sra: bool):
    if not has_sra:
        return None
    return jnp.asarray(model.sra.tau if tau is None else tau, jnp.float32)


def supervised_outputs(params, tokens, positions, loss_mask, key, step, segment_ids=None, *, graphdef, rest,
                       loss: LossConfig, has_sra: bool, mesh: Mesh | None,
                       max_segments: int | None = None) -> Outputs:
    """The forward pass on a supervised micro-batch ([b, s] tokens, positions, loss_mask; segment_ids for packed
    rows, with `max_segments` (static, data.max_segments) the most segments a row holds: the model then gathers
    each row's critical keys (num_critical + max_segments) instead of visiting every causal block). Router RL repeats each row `group_size` times (each copy draws its own selection) and scores a row
    correct when every answer token is the argmax. Metrics: "ce", "accuracy" (over examples for packed rows),
    "selected_fraction", "mask_density", "tokens" (real), "padded_tokens" (every slot), "tau" (with SRA)."""
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
    max_segments = None if segment_ids is None else max_segments
    logits, aux = model(tokens, positions, segment_ids=segment_ids, key=key if has_sra else None, tau=tau,
                        max_segments=max_segments)
    logits = sharding.constrain_batch(logits, mesh)
    correct = losses.answer_correct(logits, tokens, loss_mask)
    counts = {}
    if segment_ids is None:
        accuracy = correct.mean()
    else:
        per_segment, present = losses.segment_answer_correct(logits, tokens, loss_mask, segment_ids)
        counts = {"examples": jnp.sum(present).astype(jnp.float32),
                  "examples_correct": jnp.sum(per_segment & present).astype(jnp.float32)}
        accuracy = counts["examples_correct"] / jnp.maximum(counts["examples"], 1.0)
    selected = mean_over_layers(aux.selected_fraction, aux.sra_layers)
    metrics = {"ce": losses.cross_entropy(logits, tokens, loss_mask), "accuracy": accuracy.astype(jnp.float32),
               "selected_fraction": selected.mean(), "mask_density": mean_over_layers(aux.mask_density).mean(),
               "tokens": jnp.sum(positions >= 0).astype(jnp.float32),
               "padded_tokens": jnp.asarray(positions.size, jnp.float32), **counts}
    tau = _tau(model, tau, has_sra)
    if tau is not None:
        metrics["tau"] = tau
    advantages = None
    if loss.uses_rl:
        rewards, advantages = _group_advantages(correct, selected, loss_mask, loss)
        metrics["reward"] = rewards.mean()
    return Outputs(model=model, tokens=tokens, positions=positions, segment_ids=segment_ids, target_mask=loss_mask,
                   logits=logits, aux=aux, tau=tau, metrics=metrics, advantages=advantages, max_segments=max_segments)


def rollout_outputs(params, batch, key, step, ref_params=None, *, graphdef, rest, loss: LossConfig, has_sra: bool,
                    mesh: Mesh | None = None) -> Outputs:
    """The scoring passes on one micro-batch of graded rollouts (`lm_rl.RolloutBatch`): the trained policy (sampled
    selection: key, annealed tau), the policy that generated (deterministic selection; the same pass for a dense
    model), and with `grpo.kl_weight` the initial parameters `ref_params`. Rewards use the grader's `correct`
    and the completion length. Metrics: "reward", "accuracy", "selected_fraction", "mask_density", "tokens",
    "padded_tokens", "completion_tokens", "tau" (with SRA)."""
    model = nnx.merge(graphdef, params, rest)
    tokens = sharding.constrain_batch(batch.tokens, mesh)
    positions = sharding.constrain_batch(batch.positions, mesh)
    tau = selection_temperature(loss, step)
    logits, aux = model(tokens, positions, key=key if has_sra else None, tau=tau)
    logits = sharding.constrain_batch(logits, mesh)
    log_probs = losses.shifted_token_log_probs(logits, tokens)
    if has_sra:  # the policy that sampled: the same weights with the deterministic selection generation uses
        old_logits, _ = model(tokens, positions, tau=tau)
        old_log_probs = jax.lax.stop_gradient(losses.shifted_token_log_probs(old_logits, tokens))
    else:
        old_log_probs = jax.lax.stop_gradient(log_probs)
    ref_log_probs = None
    if loss.grpo.kl_weight:
        ref_logits, _ = nnx.merge(graphdef, ref_params, rest)(tokens, positions, tau=tau)
        ref_log_probs = losses.shifted_token_log_probs(ref_logits, tokens)
    selected = mean_over_layers(aux.selected_fraction, aux.sra_layers)
    rewards, advantages = _group_advantages(batch.correct, selected, batch.completion_mask, loss)
    metrics = {"reward": rewards.mean(), "accuracy": batch.correct.mean(), "selected_fraction": selected.mean(),
               "mask_density": mean_over_layers(aux.mask_density).mean(),
               "tokens": jnp.sum(positions >= 0).astype(jnp.float32),
               "padded_tokens": jnp.asarray(positions.size, jnp.float32),
               "completion_tokens": jnp.sum(batch.completion_mask, axis=-1).mean()}
    tau = _tau(model, tau, has_sra)
    if tau is not None:
        metrics["tau"] = tau
    return Outputs(model=model, tokens=tokens, positions=positions, segment_ids=None,
                   target_mask=batch.completion_mask, logits=logits, aux=aux, tau=tau, metrics=metrics,
                   advantages=advantages, log_probs=log_probs, old_log_probs=old_log_probs,
                   ref_log_probs=ref_log_probs)


def loss_fn(params, tokens, positions, loss_mask, key, step, segment_ids=None, *, graphdef, rest, loss: LossConfig,
            has_sra: bool, mesh: Mesh | None, max_segments: int | None = None):
    """The supervised / router-RL objective on one micro-batch (loss.kind 'sl', 'rl', 'sl+rl') and its metrics.
    With a mesh whose "sequence" axis is > 1, every model call in it (the teacher's too) runs sequence-parallel:
    attention and the router's top-k through `sra_jax.ops.sequence_parallel` (a no-op otherwise)."""
    with sequence_parallel.sequence_sharding(mesh, batch_axes=sharding.BATCH_AXES):
        outputs = supervised_outputs(params, tokens, positions, loss_mask, key, step, segment_ids, graphdef=graphdef,
                                     rest=rest, loss=loss, has_sra=has_sra, mesh=mesh, max_segments=max_segments)
        return total_loss(outputs, loss, has_sra)


def grpo_loss_fn(params, batch, key, step, ref_params=None, *, graphdef, rest, loss: LossConfig, has_sra: bool,
                 mesh: Mesh | None = None):
    """The GRPO objective on one micro-batch of rollouts (loss.kind 'grpo') and its metrics."""
    outputs = rollout_outputs(params, batch, key, step, ref_params, graphdef=graphdef, rest=rest, loss=loss,
                              has_sra=has_sra, mesh=mesh)
    return total_loss(outputs, loss, has_sra)
