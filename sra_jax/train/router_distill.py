"""Router distillation: train each SRA router toward the attention mass the dense teacher puts on every key (the
DeepSeek-V3.2 indexer warm-up, for a per-token router).

The teacher is the trained model's own weights with every token critical (SRA attention is then exactly dense).
Walking its layers, each SRA layer with a router gets the attention mass its queries put on every key
(`sra_jax.ops.attention_mass`, summed over heads, over the queries of `queries`, counting only the pairs outside
the query's window and the global tokens: what the critical set must supply), normalised per segment of a row into a
distribution `t`. The router's scores on the teacher's layer input, softmaxed over the valid tokens of each segment,
give `r`; the loss is KL(t || r), averaged over the (row, segment)s that receive mass. Everything the teacher
computes is under stop_gradient, so only router parameters get a gradient. With static masks (one router for every
SRA layer) the target is the mass summed over the SRA layers.

Query sets (`QUERY_SETS`): "target", the queries that predict loss-masked tokens (the answer); "all", every valid
query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from sra_jax.nn.layers import project_qkv
from sra_jax.ops.attention_mass import attention_mass, query_logsumexp
from sra_jax.train.config import ROUTER_DISTILL_QUERIES as QUERY_SETS


def query_weights(positions: Int[Array, "b s"], target_mask: Bool[Array, "b s"], queries: str) -> Float[Array, "b s"]:
    """1 on the queries whose attention counts: "all" valid queries, or "target": position t when token t + 1 is
    loss-masked (logits at t predict token t + 1)."""
    if queries not in QUERY_SETS:
        raise ValueError(f"queries={queries!r} must be one of {QUERY_SETS}")
    valid = positions >= 0
    if queries == "all":
        return valid.astype(jnp.float32)
    predicts_target = jnp.pad(target_mask[:, 1:], ((0, 0), (0, 1)))
    return (valid & predicts_target).astype(jnp.float32)


def teacher_attention(
    model: nnx.Module,
    tokens: Int[Array, "b s"],
    positions: Int[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None,
    weights: Float[Array, "b s"],
    *,
    block_q: int = 64,
) -> tuple[list[Float[Array, "b s d"]], list[Float[Array, "b s"] | None]]:
    """The dense teacher's pass (every token critical): each layer's RMS-normed input and, for SRA layers, the
    attention mass of every key (None for the other layers); both without gradient."""
    sra = model.sra
    num_layers = model.config.num_hidden_layers
    everything = jnp.ones(tokens.shape, bool)
    x = model.embed(tokens).astype(model.dtype)
    inputs, masses, shared = [], [], None
    for i, layer in enumerate(model.layers):
        x = jax.lax.stop_gradient(x)
        h = layer.input_norm(x)
        inputs.append(h)
        if i in model.sra_layers:
            attn = layer.attn
            q, k, _ = project_qkv(model.config, attn.q_proj, attn.k_proj, attn.v_proj, h, positions)
            lse = query_logsumexp(q, k, positions, segment_ids, block_q=block_q)
            masses.append(attention_mass(q, k, lse, positions, segment_ids, weights, window=sra.window,
                                         num_global=sra.num_global, block_q=block_q))
        else:
            masses.append(None)
        if i + 1 < num_layers:
            x, _, layer_shared, _, _ = layer(x, positions, segment_ids=segment_ids, critical=everything,
                                             shared=shared if sra is not None and sra.mask == "static" else None)
            shared = shared or layer_shared
    return inputs, masses


def distill_kl(
    router_logits: Float[Array, "b s"],
    mass: Float[Array, "b s"],
    valid: Bool[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
) -> Float[Array, ""]:
    """Mean over (row, segment)s with mass of KL(mass normalised || softmax(router_logits over the segment's valid
    tokens)). Segment ids run from 0 to at most s (the packing convention)."""
    b, s = router_logits.shape
    seg = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids
    num_segments = s + 1
    seg = jnp.clip(seg, 0, s)
    mass = jnp.where(valid, jax.lax.stop_gradient(mass), 0.0)
    logits = jnp.where(valid, router_logits.astype(jnp.float32), -jnp.inf)
    seg_sum = jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, num_segments=num_segments))
    seg_max = jax.vmap(lambda x, i: jax.ops.segment_max(x, i, num_segments=num_segments))
    top = jax.lax.stop_gradient(seg_max(logits, seg))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    top_at = jnp.take_along_axis(top, seg, axis=1)
    expo = jnp.where(valid, jnp.exp(logits - top_at), 0.0)
    log_norm = jnp.take_along_axis(jnp.log(jnp.maximum(seg_sum(expo, seg), 1e-30)) + top, seg, axis=1)
    log_r = jnp.where(valid, logits - log_norm, 0.0)
    total = seg_sum(mass, seg)  # [b, segments]
    t = mass / jnp.maximum(jnp.take_along_axis(total, seg, axis=1), 1e-30)
    pointwise = jnp.where(t > 0, t * (jnp.log(jnp.where(t > 0, t, 1.0)) - log_r), 0.0)
    kl = seg_sum(pointwise, seg)
    counts = total > 0
    return jnp.where(counts, kl, 0.0).sum() / jnp.maximum(counts.sum(), 1)


def router_distill_loss(
    model: nnx.Module,
    tokens: Int[Array, "b s"],
    positions: Int[Array, "b s"],
    target_mask: Bool[Array, "b s"],
    segment_ids: Int[Array, "b s"] | None = None,
    *,
    queries: str = "target",
    block_q: int = 64,
) -> Float[Array, ""]:
    """The sum over routers of `distill_kl` to the dense teacher's attention mass (see the module docstring); 0 for
    a model without routers."""
    weights = query_weights(positions, target_mask, queries)
    sra = model.sra
    if sra is None or not model.sra_layers:
        return jnp.zeros((), jnp.float32)
    inputs, masses = teacher_attention(model, tokens, positions, segment_ids, weights, block_q=block_q)
    valid = positions >= 0
    total = jnp.zeros((), jnp.float32)
    for i in model.sra_layers:
        router = model.layers[i].attn.router
        if router is None:  # static masks: this layer uses the first SRA layer's set (its mass is counted there)
            continue
        mass = masses[i]
        if sra.mask == "static":
            mass = sum(masses[j] for j in model.sra_layers)
        total = total + distill_kl(router(jax.lax.stop_gradient(inputs[i])), mass, valid, segment_ids)
    return total


__all__ = ["QUERY_SETS", "distill_kl", "query_weights", "router_distill_loss", "teacher_attention"]
