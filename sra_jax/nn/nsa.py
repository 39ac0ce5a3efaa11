"""`NSAAttention`: a Llama attention layer with Native Sparse Attention (see `sra_jax.ops.nsa`). The q/k/v/o
projections have the names and shapes of `SparseReasoningAttention` (a Llama checkpoint loads into them); the extra
weights are `nsa_cmp_weights_k/v` [l], `nsa_cmp_pos_k/v` [l, head_dim] (the compression pool) and `nsa_gate`
(hidden -> 3 * heads, the branch gates)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from sra_jax.config import LlamaConfig, NSAConfig
from sra_jax.nn.layers import attention_projections, linear, project_qkv
from sra_jax.ops import nsa


class NSAAttention(nnx.Module):
    def __init__(
        self,
        config: LlamaConfig,
        *,
        block: int = 32,
        stride: int = 16,
        block_sel: int = 64,
        top_n: int = 16,
        window: int = 512,
        selected_backend: str = "auto",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        # the settings' checks are NSAConfig's (the values a Llama layer is built from)
        NSAConfig(block=block, stride=stride, block_sel=block_sel, top_n=top_n, window=window,
                  selected_backend=selected_backend)  # fmt: skip
        self.config = config
        self.block, self.stride, self.block_sel, self.top_n, self.window = block, stride, block_sel, top_n, window
        self.selected_backend = selected_backend
        hidden, hd, hq = config.hidden_size, config.head_dim, config.num_attention_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(config, **kw)
        self.nsa_gate = linear(hidden, hq * 3, ("embed", None), use_bias=True, **kw)
        mean = jnp.full((block,), 1.0 / block, param_dtype)
        self.nsa_cmp_weights_k = nnx.Param(mean)
        self.nsa_cmp_weights_v = nnx.Param(mean)
        self.nsa_cmp_pos_k = nnx.Param(jnp.zeros((block, hd), param_dtype))
        self.nsa_cmp_pos_v = nnx.Param(jnp.zeros((block, hd), param_dtype))

    def __call__(
        self,
        x: Float[Array, "b s d"],
        positions: Int[Array, "b s"],
        *,
        segment_ids: Int[Array, "b s"] | None = None,
        cache=None,
        with_pairs: bool = False,
    ) -> Float[Array, "b s d"] | tuple[Float[Array, "b s d"], Float[Array, " b"]]:
        """x is the RMS-normed layer input; returns the attention output (before the residual), and with `with_pairs`
        also the (query, key) pairs the three branches attended per row (`ops.nsa.nsa_pair_counts` of this call's
        selection, summed; what `Llama` reports in `ModelAux.visible_pairs`). Decoding with a cache goes through
        `Llama` with an `NSACache` (`sra_jax.nn.nsa_cache.nsa_decode_layer`)."""
        if cache is not None:
            raise ValueError(
                "NSAAttention: a KV cache belongs to the model (Llama(..., cache=NSACache...)); a layer decodes "
                "through sra_jax.nn.nsa_cache.nsa_decode_layer(attn, layer, x, positions, cache)"
            )
        b, s, _ = x.shape
        q, k, v = project_qkv(self.config, self.q_proj, self.k_proj, self.v_proj, x, positions)
        fn = self.selected_fn(segment_ids)
        out, blocks = nsa.nsa_attention(
            q, k, v, self.gates(x), positions, **self.compression_params(),
            block=self.block, stride=self.stride, block_sel=self.block_sel, top_n=self.top_n, window=self.window,
            segment_ids=segment_ids, selected_fn=lambda q, k, v, blocks: fn(q, k, v, blocks, positions),
        )  # fmt: skip
        out = self.o_proj(out.reshape(b, s, -1))
        if not with_pairs:
            return out
        pairs = nsa.nsa_pair_counts(blocks, positions, segment_ids, block=self.block, stride=self.stride,
                                    block_sel=self.block_sel, window=self.window)  # fmt: skip
        return out, sum(pairs)

    def gates(self, x: Float[Array, "b s d"]) -> Float[Array, "b s hq 3"]:
        """The branch gates in [0, 1] (compressed, selected, window) of each query head."""
        b, s, _ = x.shape
        return jax.nn.sigmoid(self.nsa_gate(x).reshape(b, s, self.config.num_attention_heads, 3))

    def compression_params(self) -> dict[str, Array]:
        """The compression pool's weights, as `ops.nsa.nsa_attention` takes them."""
        return dict(cmp_weights_k=self.nsa_cmp_weights_k[...], cmp_pos_k=self.nsa_cmp_pos_k[...],
                    cmp_weights_v=self.nsa_cmp_weights_v[...], cmp_pos_v=self.nsa_cmp_pos_v[...])  # fmt: skip

    def selected_fn(self, segment_ids: Int[Array, "b s"] | None):
        """The selected branch `fn(q, k, v, blocks, positions)`: `ops.nsa.nsa_selected` with impl=selected_backend."""
        bs, impl = self.block_sel, self.selected_backend

        def fn(q, k, v, blocks, positions):
            return nsa.nsa_selected(q, k, v, blocks, positions, block_sel=bs, segment_ids=segment_ids, impl=impl)

        return fn
