"""NSA / DSA layers inside `Llama`: `SRAConfig.attention` "nsa" or "dsa" puts an `NSAAttention` / `DSAAttention` in
place of `SparseReasoningAttention` on the layers `SRAConfig.layers` names. They carry the Llama q/k/v/o projections
under the same names (a Llama checkpoint loads into them); their extra parameters (`EXTRA_PARAM_NAMES`) are what the
retrofit path initialises fresh, trains under `init.trainable: router` and exports into `sra_router.safetensors`.

These layers have no router: their `ModelAux` row has zero router logits and no critical token; its visible pairs
are the (query, key) pairs the layer attended (`ops.nsa.nsa_pair_counts`, `ops.dsa.dsa_pair_counts`) plus its
selection work in attention-pair equivalents (`selection_pairs`, also in `ModelAux.selection_pairs`), so mask
density and attention FLOPs count the compute the layer did. A DSA decode call (with a cache) counts as dense.
The DSA indexer's KL loss goes to `ModelAux.indexer_loss`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn.attention import LayerStats
from sra_jax.nn.dsa import DSAAttention
from sra_jax.nn.dsa_cache import DSACache, dsa_decode_layer
from sra_jax.nn.nsa import NSAAttention
from sra_jax.nn.nsa_cache import NSACache, nsa_decode_layer
from sra_jax.ops import dsa, masks
from sra_jax.ops.attention import attention_flops as ops_attention_flops

# Parameter names of NSAAttention / DSAAttention that a Llama checkpoint does not have.
EXTRA_PARAM_NAMES = frozenset(
    {"nsa_gate", "nsa_cmp_weights_k", "nsa_cmp_weights_v", "nsa_cmp_pos_k", "nsa_cmp_pos_v",
     "indexer_q", "indexer_k", "indexer_w"}
)  # fmt: skip


def is_extra_param(path) -> bool:
    """Whether a parameter path (strings, ints or nnx path keys) is a router or an NSA / DSA extra: the
    parameters a Llama checkpoint lacks."""
    names = {str(getattr(k, "key", k)) for k in path}
    return "router" in names or not names.isdisjoint(EXTRA_PARAM_NAMES)


# The caches of models with NSA / DSA layers: each wraps a KVCache in `kv`, which the model's dense layers use.
PER_QUERY_CACHES = (DSACache, NSACache)


def uses_per_query(sra: SRAConfig | None, layer: int) -> bool:
    return sra is not None and sra.attention in ("nsa", "dsa") and sra.applies_to(layer)


def build_per_query(config: LlamaConfig, sra: SRAConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
    """The NSAAttention / DSAAttention of a layer, with the settings of `sra.nsa` / `sra.dsa`."""
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if sra.attention == "nsa":
        return NSAAttention(config, **dataclasses.asdict(sra.nsa), **kw)
    return DSAAttention(config, **dataclasses.asdict(sra.dsa), **kw)


def call_per_query(
    attn: nnx.Module,
    layer: int,
    x: Float[Array, "b s d"],
    positions: Int[Array, "b s"],
    *,
    segment_ids: Int[Array, "b s"] | None = None,
    cache=None,
) -> tuple[Float[Array, "b s d"], LayerStats, Float[Array, ""], DSACache | NSACache | None]:
    """(output, the layer's LayerStats row, indexer loss: 0 for NSA and decode calls, the updated cache).
    With a cache, DSA layers decode with a `DSACache` (`sra_jax.nn.dsa_cache`), NSA layers with an `NSACache`
    (`sra_jax.nn.nsa_cache`)."""
    attended = None  # pairs the layer attended; None: a decode call, counted as dense
    if cache is not None:
        decode_layer = dsa_decode_layer if isinstance(attn, DSAAttention) else nsa_decode_layer
        out, cache = decode_layer(attn, layer, x, positions, cache)
        loss = jnp.zeros((), jnp.float32)
    elif isinstance(attn, DSAAttention):
        out, loss, attended = attn(x, positions, segment_ids=segment_ids, with_pairs=True)
    else:
        (out, attended), loss = attn(x, positions, segment_ids=segment_ids, with_pairs=True), jnp.zeros((), jnp.float32)
    b, s = positions.shape
    no_critical = jnp.zeros((b, s), bool)
    spec = masks.SRAMaskSpec.create(positions, no_critical, segment_ids=segment_ids, window=2**30,
                                    num_global=0, max_critical=0)  # fmt: skip
    causal, _ = masks.visible_pair_counts(spec)
    selection = selection_pairs(attn, causal) if attended is not None else jnp.zeros_like(causal)
    stats = LayerStats(
        router_logits=jnp.zeros((b, s), jnp.float32),
        critical=no_critical,
        selection_log_prob=jnp.zeros((b,), jnp.float32),
        selected_fraction=jnp.zeros((b,), jnp.float32),
        visible_pairs=(causal if attended is None else attended) + selection,
        causal_pairs=causal,
        selection_pairs=selection,
    )
    return out, stats, loss.astype(jnp.float32), cache


def selection_pairs(attn: nnx.Module, causal_pairs: Float[Array, " b"]) -> Float[Array, " b"]:
    """The selection work of a layer that is not attention, in attention-pair equivalents (its FLOPs over the
    `ops.attention.attention_flops` of one pair): a DSA layer's lightning indexer scores every causal (query, key)
    pair (`ops.dsa.indexer_flops_per_pair`); NSA scores blocks with its compressed branch, already counted as
    attended pairs, so 0."""
    if not isinstance(attn, DSAAttention):
        return jnp.zeros_like(causal_pairs)
    per_pair = ops_attention_flops(1.0, num_heads=attn.config.num_attention_heads, head_dim=attn.config.head_dim)
    return causal_pairs * (dsa.indexer_flops_per_pair(attn.indexer_heads, attn.indexer_dim) / per_pair)
