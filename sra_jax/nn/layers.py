"""Small building blocks shared by the model: logical-axis initialisers, the attention layers' q/k/v/o projections
(`attention_projections`, `project_qkv`), `RMSNorm`, the SwiGLU `MLP`."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from sra_jax.config import LlamaConfig
from sra_jax.ops import rope

Initializer = Callable[..., jax.Array]


def partitioned(init: Initializer, names: tuple[str | None, ...]) -> Initializer:
    """Attach logical axis names (metadata `out_sharding`) to a parameter initialiser.

    Flax shards such a parameter eagerly when it is created, which needs a mesh; without one (tests, CPU demos) the
    names are kept as metadata only, for the trainer's rules table (`nnx.get_partition_spec`).
    """
    eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
    return nnx.with_partitioning(init, names, eager_sharding=eager)


def linear(
    in_features: int,
    out_features: int,
    names: tuple[str | None, str | None],
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    use_bias: bool = False,
) -> nnx.Linear:
    """`nnx.Linear` whose kernel (and bias, named after the output axis) carry logical axis names."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(nnx.initializers.lecun_normal(), names),
        bias_init=partitioned(nnx.initializers.zeros_init(), (names[1],)),
        rngs=rngs,
    )


def attention_projections(
    config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs
) -> tuple[nnx.Linear, nnx.Linear, nnx.Linear, nnx.Linear]:
    """The Llama attention projections `(q_proj, k_proj, v_proj, o_proj)`, bias-free, created in that order, with the
    shapes and logical axis names a Llama checkpoint loads into (every attention layer of the model uses them)."""
    hidden, hd = config.hidden_size, config.head_dim
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return (
        linear(hidden, hq * hd, ("embed", "q_heads"), **kw),
        linear(hidden, hkv * hd, ("embed", "kv_heads"), **kw),
        linear(hidden, hkv * hd, ("embed", "kv_heads"), **kw),
        linear(hq * hd, hidden, ("q_heads", "embed"), **kw),
    )


def project_qkv(
    config: LlamaConfig,
    q_proj: nnx.Linear,
    k_proj: nnx.Linear,
    v_proj: nnx.Linear,
    x: Float[Array, "b s d"],
    positions: Int[Array, "b s"],
) -> tuple[Float[Array, "b s hq hd"], Float[Array, "b s hkv hd"], Float[Array, "b s hkv hd"]]:
    """Project x to per-head q, k, v and apply RoPE (the config's theta and scaling) to q and k at `positions`."""
    b, s, _ = x.shape
    hq, hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    inv_freq = rope.rope_frequencies(hd, config.rope_theta, config.rope_scaling)
    q = rope.apply_rope(q_proj(x).reshape(b, s, hq, hd), positions, inv_freq)
    k = rope.apply_rope(k_proj(x).reshape(b, s, hkv, hd), positions, inv_freq)
    v = v_proj(x).reshape(b, s, hkv, hd)
    return q, k, v


class RMSNorm(nnx.Module):
    """Hugging Face `LlamaRMSNorm`: normalise in float32, cast back to the input dtype, then multiply by `scale`."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(partitioned(nnx.initializers.ones_init(), ("norm",))(None, (features,), param_dtype))

    def __call__(self, x: Float[Array, "*b d"]) -> Float[Array, "*b d"]:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: Float[Array, "b s d"]) -> Float[Array, "b s d"]:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
