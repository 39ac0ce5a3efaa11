"""Reinforcement learning pieces shared by router RL and LM RL: reward, group baseline, losses, temperature schedule.

Router RL treats the router's critical-set selection as a Plackett-Luce policy over its logits: the model reports the
log-probability of the selection it drew (`aux.selection_log_prob`), the reward scores the outcome, and the policy
gradient is `-advantage * log_prob`. LM RL (GRPO) uses the same reward and advantage code on sampled completions.
Rows of a batch come in groups of `group_size` consecutive samples of the same prompt (`jnp.repeat(prompts, G, 0)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sra_jax.ops.selection import topk_log_prob


def reward(
    correct: Bool[Array, " b"] | Float[Array, " b"],
    selected_fraction: Float[Array, " b"],
    generated_tokens: Int[Array, " b"] | Float[Array, " b"],
    *,
    token_penalty: float,
    length_penalty: float,
) -> Float[Array, " b"]:
    """correctness - lambda * fraction of tokens selected - mu * generated tokens."""
    return (
        correct.astype(jnp.float32)
        - token_penalty * selected_fraction.astype(jnp.float32)
        - length_penalty * generated_tokens.astype(jnp.float32)
    )


def group_advantages(rewards: Float[Array, " b"], group_size: int, *, eps: float = 1e-6) -> Float[Array, " b"]:
    """GRPO advantage: (r - group mean) / (group std + eps) over consecutive groups of `group_size` rows."""
    if rewards.shape[0] % group_size:
        raise ValueError(f"batch of {rewards.shape[0]} rewards is not a whole number of groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)
    mean = grouped.mean(axis=-1, keepdims=True)
    std = grouped.std(axis=-1, keepdims=True)  # population std (ddof=0), as in the GRPO paper and tunix
    return ((grouped - mean) / (std + eps)).reshape(-1)


def plackett_luce_prefix_log_prob(
    logits: Float[Array, "*b n"],
    order: Int[Array, "*b k"],
    length: Int[Array, "*b"],
    *,
    valid: Bool[Array, "*b n"] | None = None,
) -> Float[Array, "*b"]:
    """log P(the first `length` draws of a Plackett-Luce ordering over the `valid` items are `order[..., :length]`),
    for a policy that also picks how many items to keep (variable-size selections, or per-row k); only those draws
    count, and entries after them (or -1 entries) are ignored. `length = k` gives `ops.selection.topk_log_prob`.
    O(n + k) per row (it is `topk_log_prob` with per-row counts)."""
    return topk_log_prob(logits, order, valid=valid, k=jnp.asarray(length, jnp.int32))


def policy_gradient_loss(
    log_prob: Float[Array, "*l b"], advantages: Float[Array, " b"]
) -> Float[Array, ""]:
    """REINFORCE surrogate -mean_b(A_b * sum_layers log pi(selection_b)); advantages are held constant."""
    total = log_prob.reshape(-1, log_prob.shape[-1]).sum(axis=0)
    return -jnp.mean(jax.lax.stop_gradient(advantages) * total)


def router_entropy(
    router_logits: Float[Array, "*l b s"], valid: Bool[Array, "b s"], *, temperature: float | Float[Array, ""] = 1.0
) -> Float[Array, ""]:
    """Mean entropy of the Plackett-Luce first draw, softmax(logits / T) over the valid tokens of each row."""
    logits = router_logits.astype(jnp.float32) / temperature
    # A finite fill (not -inf) keeps 0 * log 0 and its gradient finite on padding.
    log_p = jax.nn.log_softmax(jnp.where(valid, logits, -1e9), axis=-1)
    p_log_p = jnp.where(valid, jnp.exp(log_p) * log_p, 0.0)
    return -jnp.mean(jnp.sum(p_log_p, axis=-1))


def temperature_schedule(step: Int[Array, ""] | int, *, start: float, end: float, steps: int) -> Float[Array, ""]:
    """Cosine anneal of the sampling temperature from `start` to `end` over `steps`, then held at `end`."""
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def grpo_loss(
    log_probs: Float[Array, "b t"],
    old_log_probs: Float[Array, "b t"],
    advantages: Float[Array, " b"],
    mask: Bool[Array, "b t"],
    *,
    clip_eps: float = 0.2,
    kl_weight: float = 0.0,
    ref_log_probs: Float[Array, "b t"] | None = None,
) -> Float[Array, ""]:
    """GRPO objective on sampled completions (token log-probs under the current, sampling and reference policies).

    Per token: min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) - beta * KL, with rho = exp(logp - logp_old) and the
    unbiased k3 estimator KL = exp(ref - logp) - (ref - logp) - 1; averaged over each completion's tokens, then over
    completions, and negated.
    """
    advantages = jax.lax.stop_gradient(advantages)[:, None]
    ratio = jnp.exp(log_probs - jax.lax.stop_gradient(old_log_probs))
    objective = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages)
    if kl_weight:
        if ref_log_probs is None:
            raise ValueError("grpo_loss: kl_weight > 0 needs ref_log_probs")
        delta = jax.lax.stop_gradient(ref_log_probs) - log_probs
        objective = objective - kl_weight * (jnp.exp(delta) - delta - 1.0)
    mask = mask.astype(jnp.float32)
    per_sequence = jnp.sum(objective * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return -jnp.mean(per_sequence)
