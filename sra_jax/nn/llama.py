"""`Llama`: a Llama 3 decoder in Flax NNX whose attention layers may use Sparse Reasoning Attention.

The parameter tree (names, shapes, logical axes) is a contract with sra_jax.convert and sra_jax.train; see
docs/nn.md, "Parameter tree". `model(tokens, positions, cache)` returns float32 logits and a `ModelAux` with one row per layer.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int, Shaped

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn import decode
from sra_jax.nn.attention import SharedSelection, SparseReasoningAttention
from sra_jax.nn.cache import KVCache, LeftPaddedKVCache
from sra_jax.nn.dsa_cache import DSACache
from sra_jax.nn.nsa_cache import NSACache
from sra_jax.nn.per_query import PER_QUERY_CACHES, build_per_query, call_per_query, uses_per_query
from sra_jax.nn.layers import MLP, RMSNorm, partitioned
from sra_jax.ops.attention import attention_flops as ops_attention_flops

ATTENTION_IMPLS = ("reference", "gather", "xla", "cudnn", "pallas")
# Rematerialisation of each decoder layer in the backward pass (jax.checkpoint policies): "none" keeps every
# activation, "full" keeps only the layer inputs, "dots_saveable" keeps matmul outputs and recomputes the rest.
REMAT_POLICIES = {"none": None, "full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}


def most_segments(segment_ids: Int[Array | np.ndarray, "*rows s"], positions: Int[Array | np.ndarray, "*rows s"]) -> int:
    """The most packed segments holding a valid token (position >= 0) in any row of concrete `segment_ids` (any
    leading axes, e.g. a batch's micro-batch axis)."""
    ids = np.asarray(segment_ids).reshape(-1, np.shape(segment_ids)[-1])
    valid = np.asarray(positions).reshape(ids.shape) >= 0
    return max((len(np.unique(row[ok])) for row, ok in zip(ids, valid, strict=True)), default=0)


def _remat_layer(layer: nnx.Module, policy, tau, max_segments: int | None):
    """`layer` as a pure function under jax.checkpoint: its state goes in as an argument and the module is rebuilt
    inside, so nothing crosses trace levels (a layer's forward pass changes no state)."""
    graphdef, state = nnx.split(layer)

    def pure(state, x, positions, segment_ids, key, critical, shared):
        return nnx.merge(graphdef, state)(x, positions, segment_ids=segment_ids, key=key, critical=critical,
                                          shared=shared, cache=None, tau=tau, max_segments=max_segments)

    return functools.partial(jax.checkpoint(pure, policy=policy), state)


def check_sra_layers(sra: SRAConfig | None, num_hidden_layers: int) -> None:
    """ValueError when `sra.layers` names a layer the model does not have (it would silently stay dense)."""
    missing = sorted(i for i in (sra.layers or ()) if i >= num_hidden_layers) if sra is not None else []
    if missing:
        raise ValueError(f"sra.layers={list(sra.layers)} names layers {missing} the model does not have "
                         f"(num_hidden_layers={num_hidden_layers}: layers 0..{num_hidden_layers - 1})")


def check_token_ids(tokens: Shaped[Array, "..."], vocab_size: int) -> None:
    """ValueError for concrete token ids outside [0, vocab_size). Traced ids (inside jit) and arrays spread over
    other processes cannot be checked here: `Llama` then gives NaN logits for a row holding such an id (negative ids
    included, they do not wrap)."""
    if isinstance(tokens, jax.core.Tracer) or tokens.size == 0 or not getattr(tokens, "is_fully_addressable", True):
        return
    host = np.asarray(tokens)  # numpy, not jnp: a concrete array may be closed over inside another trace
    low, high = int(host.min()), int(host.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"tokens hold ids in [{low}, {high}]; they must lie in [0, vocab_size={vocab_size})")


@struct.dataclass
class ModelAux:
    """Per-layer results stacked on a leading axis of length num_hidden_layers (`sra_layers` names the SRA ones;
    a dense layer has zero logits / log-prob / fraction, no critical token and density 1).

    router_logits      [L, b, s] float32
    critical           [L, b, s] bool, the critical set the mask used
    selection_log_prob [L, b] log-prob of the selection used: Plackett-Luce of the ordered draw, or for
                       selection="bernoulli" the exact capped-Bernoulli log-prob (0 where nothing was drawn: dense
                       layers, static-mask layers after the first, decode steps)
    selected_fraction  [L, b] critical / valid tokens of this call
    mask_density       [L, b] visible (query, key) pairs / causal pairs: the layer's attention compute relative to
                       dense attention
    visible_pairs, causal_pairs [L, b] float32, the counts behind mask_density (attention FLOPs, `attention_flops`).
                       visible_pairs is what the layer computed: SRA, the pairs its mask kept; NSA, the pairs of its
                       compressed, selected and window branches; DSA, each query's selected visible keys plus the
                       lightning indexer's scoring of every causal pair in attention-pair equivalents (FLOPs ratio),
                       so a DSA layer's density can exceed 1 where top_k covers every visible key. Forward work
                       only: the DSA indexer's KL training loss is not counted.
    selection_pairs    [L, b] float32, the part of visible_pairs that is selection work, not attention (the DSA
                       indexer; 0 elsewhere): visible_pairs - selection_pairs are the pairs attended
    cache              the updated KVCache, or None
    indexer_loss       [L] float32, the DSA indexer's KL loss of each DSA layer (0 elsewhere; see sra_jax.nn.per_query)
    """

    router_logits: Any
    critical: Any
    selection_log_prob: Any
    selected_fraction: Any
    mask_density: Any
    visible_pairs: Any
    causal_pairs: Any
    cache: Any = None
    indexer_loss: Any = None
    selection_pairs: Any = None
    sra_layers: tuple[int, ...] = struct.field(pytree_node=False, default=())


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(input_norm(x)), then + mlp(post_attention_norm(x)). `attn` is a
    SparseReasoningAttention, or an NSAAttention / DSAAttention where `sra.attention` asks for one (see
    sra_jax.nn.per_query). Returns (x, stats, shared selection, cache, indexer loss)."""

    def __init__(
        self,
        config: LlamaConfig,
        sra: SRAConfig | None,
        *,
        layer: int,
        selects: bool,
        dtype,
        param_dtype,
        attention_impl: str,
        decode_kernel: str = "auto",
        rngs: nnx.Rngs,
    ):
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_norm = RMSNorm(config.hidden_size, **norm)
        self.layer = layer
        self.per_query = uses_per_query(sra, layer)
        if self.per_query:
            self.attn = build_per_query(config, sra, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.attn = SparseReasoningAttention(
                config,
                sra,
                layer=layer,
                selects=selects,
                dtype=dtype,
                param_dtype=param_dtype,
                attention_impl=attention_impl,
                decode_kernel=decode_kernel,
                rngs=rngs,
            )
        self.post_attention_norm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "b s d"], positions: Int[Array, "b s"], **kwargs):
        if self.per_query:
            h, stats, loss, cache = call_per_query(self.attn, self.layer, self.input_norm(x), positions,
                                                   segment_ids=kwargs.get("segment_ids"), cache=kwargs.get("cache"))
            shared = None
        elif isinstance(kwargs.get("cache"), PER_QUERY_CACHES):  # a dense layer of an NSA / DSA model: the KVCache inside
            outer = kwargs.pop("cache")
            h, stats, shared, kv = self.attn(self.input_norm(x), positions, cache=outer.kv, **kwargs)
            cache, loss = outer.replace(kv=kv), jnp.zeros((), jnp.float32)
        else:
            h, stats, shared, cache = self.attn(self.input_norm(x), positions, **kwargs)
            loss = jnp.zeros((), jnp.float32)
        x = x + h
        x = x + self.mlp(self.post_attention_norm(x))
        return x, stats, shared, cache, loss


class Llama(nnx.Module):
    """Llama 3 decoder with optional SRA layers. `dtype` is the compute dtype, `param_dtype` the storage dtype.
    `remat` ("none", "full", "dots_saveable"; see REMAT_POLICIES) rematerialises each decoder layer when no cache
    is given (training and scoring), trading compute for activation memory.
    With attention_impl="pallas", decode steps (a cache and at most `sra_jax.nn.decode.MAX_DECODE_TOKENS` new tokens)
    run the sparse decode kernel (window + globals + critical slots only); `decode_kernel` picks its backend, "off"
    keeps the block-sparse kernel (see `set_decode_kernel`)."""

    def __init__(
        self,
        config: LlamaConfig,
        sra: SRAConfig | None = None,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: str = "reference",
        decode_kernel: str = "auto",
        remat: str = "none",
    ):
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={attention_impl!r} must be one of {ATTENTION_IMPLS}")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} must be one of {tuple(REMAT_POLICIES)}")
        self.remat = remat
        self.config = config
        self.sra = sra
        self.dtype = dtype
        check_sra_layers(sra, config.num_hidden_layers)
        # Layers with a router (SRA); NSA / DSA layers (sra.attention) are not listed.
        self.sra_layers = tuple(i for i in range(config.num_hidden_layers)
                                if sra is not None and sra.attention == "sra" and sra.applies_to(i))
        self.embed = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(stddev=0.02), ("vocab", "embed")),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                DecoderLayer(
                    config,
                    sra,
                    layer=i,
                    selects=sra is not None and (sra.mask == "dynamic" or self.sra_layers[:1] == (i,)),
                    dtype=dtype,
                    param_dtype=param_dtype,
                    attention_impl=attention_impl,
                    decode_kernel=decode_kernel,
                    rngs=rngs,
                )
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(
                config.hidden_size,
                config.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=partitioned(nnx.initializers.lecun_normal(), ("embed", "vocab")),
                rngs=rngs,
            )

    def __call__(
        self,
        tokens: Shaped[Array, "..."],
        positions: Shaped[Array, "..."] | None = None,
        cache: KVCache | DSACache | NSACache | None = None,
        *,
        segment_ids: Shaped[Array, "..."] | None = None,
        key: jax.Array | None = None,
        critical: Shaped[Array, "..."] | None = None,
        tau: float | Float[Array, ""] | None = None,
        max_segments: int | None = None,
        logits_to_keep: int | None = None,
    ) -> tuple[Float[Array, "b n v"], ModelAux]:
        """Logits (float32) and aux for `tokens` [b, s]. positions default to arange (after the cache's tokens);
        a negative position marks padding. A `LeftPaddedKVCache` sets the positions itself (pass none). `key` samples the critical sets (Gumbel top-k), `critical` [L, b, s]
        forces them. `tau` is the selection temperature of this call (default: sra.tau); pass a jnp scalar to anneal it
        under jit without recompiling. With a cache the call writes its tokens at `cache.index` and returns the cache
        in `aux.cache`. `max_segments` (static, with segment_ids): at most this many packed segments with valid
        tokens in a row; it bounds the critical keys of packed rows (num_critical(s) + max_segments), which lets
        attention gather them instead of visiting every causal block; checked when segment_ids are concrete.
        `logits_to_keep` (static int n): logits of the last n positions only, [b, n, vocab] (a long prefill then
        never builds [b, s, vocab]); None keeps all.
        (Annotations are loose here on purpose: `_check_inputs` names the problem in a ValueError.)"""
        self._check_inputs(tokens, positions, cache, segment_ids, critical)
        check_token_ids(tokens, self.config.vocab_size)
        b, s = tokens.shape
        if positions is None and cache is not None:
            positions = cache.next_positions(s)
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if isinstance(tau, (int, float)) and not tau > 0:
            raise ValueError(f"tau={tau} must be > 0")
        if logits_to_keep is not None and (
            not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or not 1 <= logits_to_keep <= s
        ):
            raise ValueError(f"logits_to_keep={logits_to_keep!r} must be None or an integer in [1, {s}]")
        self._check_max_segments(max_segments, segment_ids, positions)
        return self._forward(
            tokens, positions.astype(jnp.int32), cache, segment_ids, key, critical, tau, max_segments, logits_to_keep
        )

    @staticmethod
    def _check_max_segments(max_segments: int | None, segment_ids, positions) -> None:
        """A segment counts when it holds a valid token (position >= 0)."""
        if max_segments is None:
            return
        if not isinstance(max_segments, int) or isinstance(max_segments, bool) or max_segments < 1:
            raise ValueError(f"max_segments={max_segments!r} must be None or an integer >= 1")
        if any(isinstance(x, jax.core.Tracer) for x in (segment_ids, positions)) or segment_ids is None:
            return
        most = most_segments(segment_ids, positions)
        if most > max_segments:
            raise ValueError(f"max_segments={max_segments}, but a row of segment_ids holds {most} segments")

    def _forward(
        self,
        tokens: Int[Array, "b s"],
        positions: Int[Array, "b s"],
        cache: KVCache | DSACache | NSACache | None,
        segment_ids: Int[Array, "b s"] | None,
        key: jax.Array | None,
        critical: Bool[Array, "layers b s"] | None,
        tau: float | Float[Array, ""] | None = None,
        max_segments: int | None = None,
        logits_to_keep: int | None = None,
    ) -> tuple[Float[Array, "b n v"], ModelAux]:
        num_layers = self.config.num_hidden_layers
        if cache is not None:
            cache = cache.replace(
                positions=jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.index.astype(jnp.int32)))
            )
        layer_keys = None if key is None else jax.random.split(key, num_layers)
        # Under jit ids cannot be checked: any id outside [0, vocab) reads the embedding's NaN fill (negative ids
        # too, instead of wrapping to a real row), so a bad id shows as NaN logits, never as a plausible answer.
        in_vocab = (tokens >= 0) & (tokens < self.config.vocab_size)
        x = self.embed(jnp.where(in_vocab, tokens, self.config.vocab_size)).astype(self.dtype)
        shared: SharedSelection | None = None
        rows, indexer_losses = [], []
        # Rematerialised layers (training: no cache); decode keeps its plain path.
        remat = self.remat != "none" and cache is None
        for i, layer in enumerate(self.layers):
            layer_key = None if layer_keys is None else layer_keys[i]
            layer_critical = None if critical is None else critical[i]
            layer_in = shared if self.sra is not None and self.sra.mask == "static" else None
            if remat:
                call = _remat_layer(layer, REMAT_POLICIES[self.remat], tau, max_segments)
                out = call(x, positions, segment_ids, layer_key, layer_critical, layer_in)
            else:
                out = layer(x, positions, segment_ids=segment_ids, key=layer_key, critical=layer_critical,
                            shared=layer_in, cache=cache, tau=tau, max_segments=max_segments)
            x, stats, layer_shared, cache, indexer_loss = out
            shared = shared or layer_shared
            rows.append(stats)
            indexer_losses.append(indexer_loss)
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        h = self.norm(x)
        logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
        if cache is not None:
            cache = cache.replace(index=cache.index + tokens.shape[1])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
        aux = ModelAux(
            router_logits=stacked.router_logits,
            critical=stacked.critical,
            selection_log_prob=stacked.selection_log_prob,
            selected_fraction=stacked.selected_fraction,
            mask_density=stacked.visible_pairs / jnp.maximum(stacked.causal_pairs, 1.0),
            visible_pairs=stacked.visible_pairs,
            causal_pairs=stacked.causal_pairs,
            cache=cache,
            indexer_loss=jnp.stack(indexer_losses),
            selection_pairs=stacked.selection_pairs,
            sra_layers=self.sra_layers,
        )
        return logits.astype(jnp.float32), aux

    def _check_inputs(self, tokens, positions, cache, segment_ids, critical) -> None:
        """User mistakes become ValueErrors naming the argument, before any tracing."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq] (rank 2), got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        for name, value in (("positions", positions), ("segment_ids", segment_ids)):
            if value is not None and value.shape != tokens.shape:
                raise ValueError(f"{name} shape {value.shape} must equal tokens shape {tokens.shape}")
            if value is not None and not jnp.issubdtype(value.dtype, jnp.integer):
                raise ValueError(f"{name} must be integers, got dtype {value.dtype}")
        expected = (self.config.num_hidden_layers, *tokens.shape)
        if critical is not None and critical.shape != expected:
            raise ValueError(f"critical shape {critical.shape} must be [layers, batch, seq] = {expected}")
        if critical is not None and critical.dtype != jnp.bool_:
            raise ValueError(f"critical must be boolean, got dtype {critical.dtype}")
        if cache is None:
            return
        if segment_ids is not None:
            raise ValueError("segment_ids cannot be combined with a KV cache (decode one sequence per row)")
        if isinstance(getattr(cache, "kv", cache), LeftPaddedKVCache) and positions is not None:  # or one wrapped
            raise ValueError("positions cannot be given with a LeftPaddedKVCache: it sets each token's position from "
                             "its slot (slot - kv_start), which keeps its left-padded layout; pass positions=None")
        if cache.batch != tokens.shape[0]:
            raise ValueError(f"cache batch ({cache.batch}) does not match tokens batch ({tokens.shape[0]})")
        if cache.num_layers != self.config.num_hidden_layers:
            raise ValueError(
                f"cache has {cache.num_layers} layers, the model has {self.config.num_hidden_layers}"
            )
        if tokens.shape[1] > cache.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} is longer than the cache (max_len={cache.max_len})")
        if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + tokens.shape[1] > cache.max_len:
            raise ValueError(
                f"cache holds {int(cache.index)} tokens; {tokens.shape[1]} more exceed max_len={cache.max_len}"
            )

    def set_decode_kernel(self, decode_kernel: str) -> None:
        """Switch every layer's decode path (e.g. "off" for the block-sparse kernel) on a built model."""
        decode.check_decode_kernel(decode_kernel)
        for layer in self.layers:
            if not layer.per_query:
                layer.attn.decode_kernel = decode_kernel

    def router_flops_per_token(self) -> int:
        """FLOPs all routers spend on one token."""
        return sum(layer.attn.router.flops_per_token() for layer in self.layers
                   if not layer.per_query and layer.attn.router is not None)


def attention_flops(config: LlamaConfig, aux: ModelAux) -> tuple[Float[Array, " b"], Float[Array, " b"]]:
    """(dense, SRA) attention FLOPs per sequence of the call that produced `aux`, summed over layers.

    Each visible (query, key) pair costs a q.k dot product and a weighted add of v: 4 * head_dim FLOPs per query head.
    Dense counts every causal pair; the sparse count is `aux.visible_pairs`: the pairs SRA masks kept, the pairs NSA
    / DSA layers attended plus the DSA indexer's selection work (see `ModelAux`); dense layers count as dense.
    """
    heads = dict(num_heads=config.num_attention_heads, head_dim=config.head_dim)
    return ops_attention_flops(aux.causal_pairs.sum(0), **heads), ops_attention_flops(aux.visible_pairs.sum(0), **heads)


def router_flops(model: Llama, num_tokens: int) -> int:
    """FLOPs the routers of `model` spend on `num_tokens` tokens."""
    return model.router_flops_per_token() * num_tokens
