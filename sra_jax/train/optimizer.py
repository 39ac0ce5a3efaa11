"""optax AdamW with linear warmup + cosine decay and global-norm clipping, from `OptimConfig`. The moments are
float32 whatever the parameters' dtype (mixed precision: bfloat16 parameters keep float32 AdamW state)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
    tx = adamw if config.clip_norm is None else optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
    return float32_state(tx)


def float32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` whose state is initialised from float32 copies of the parameters. The updates are float32 (gradients
    are accumulated in float32), so moments initialised in a bfloat16 parameter's dtype would turn float32 after the
    first step: a second compilation of the train step, and a checkpoint whose dtypes differ from a fresh state's."""

    def init(params):
        return tx.init(jax.tree.map(_float32, params))

    return optax.GradientTransformation(init, tx.update)


def _float32(x):
    floating = hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    return x.astype(jnp.float32) if floating and x.dtype != jnp.float32 else x
