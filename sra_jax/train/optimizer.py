"""optax AdamW with linear warmup + cosine decay and global-norm clipping, from `OptimConfig`."""

from __future__ import annotations

import jax
import optax

from sra_jax.train.config import OptimConfig


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then cosine down to end_lr_fraction * learning_rate."""
    decay_steps = max(config.decay_steps or total_steps, config.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=decay_steps,
        end_value=config.learning_rate * config.end_lr_fraction,
    )


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (decoupled weight decay on every parameter with ndim >= 2)."""
    adamw = optax.adamw(
        learning_rate_schedule(config, total_steps),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )
    if config.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
