"""`DSAAttention`: a Llama attention layer with DeepSeek Sparse Attention (see `sra_jax.ops.dsa`). q/k/v/o as
`SparseReasoningAttention`; the lightning indexer's weights are `indexer_q` (hidden -> heads_i * dim_i),
`indexer_k` (hidden -> dim_i) and `indexer_w` (hidden -> heads_i). The selection runs over query chunks (or key
blocks: `ops.dsa.indexer_top_k`, `indexer_topk`) and the default indexer loss reads only the selected keys, so no [s, s] array is built
and 32k contexts fit; indexer_loss="dense" gives the warm-up KL over every visible key (O(s^2) memory)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from sra_jax.config import DSAConfig, LlamaConfig
from sra_jax.nn.layers import attention_projections, linear, project_qkv
from sra_jax.ops import dsa


class DSAAttention(nnx.Module):
    def __init__(
        self,
        config: LlamaConfig,
        *,
        top_k: int = 2048,
        indexer_heads: int = 4,
        indexer_dim: int = 64,
        block_q: int = 64,
        indexer_block_k: int = 1024,
        indexer_loss: str = "selected",
        impl: str = "auto",
        indexer_topk: str = "threshold",
        indexer_query_chunk: int | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        # the settings' checks are DSAConfig's (the values a Llama layer is built from)
        DSAConfig(top_k=top_k, indexer_heads=indexer_heads, indexer_dim=indexer_dim, block_q=block_q,
                  indexer_block_k=indexer_block_k, indexer_loss=indexer_loss, impl=impl,
                  indexer_topk=indexer_topk, indexer_query_chunk=indexer_query_chunk)  # fmt: skip
        if impl not in dsa.DSA_IMPLS:
            raise ValueError(f"impl {impl!r} not in {dsa.DSA_IMPLS}")
        if indexer_topk not in dsa.INDEXER_TOPK_IMPLS:
            raise ValueError(f"indexer_topk {indexer_topk!r} not in {dsa.INDEXER_TOPK_IMPLS}")
        self.config = config
        self.top_k, self.indexer_heads, self.indexer_dim, self.block_q = top_k, indexer_heads, indexer_dim, block_q
        self.indexer_block_k, self.indexer_loss, self.impl = indexer_block_k, indexer_loss, impl
        self.indexer_topk, self.indexer_query_chunk = indexer_topk, indexer_query_chunk
        hidden = config.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(config, **kw)
        self.indexer_q = linear(hidden, indexer_heads * indexer_dim, ("embed", None), **kw)
        self.indexer_k = linear(hidden, indexer_dim, ("embed", None), **kw)
        self.indexer_w = linear(hidden, indexer_heads, ("embed", None), **kw)

    def __call__(
        self,
        x: Float[Array, "b s d"],
        positions: Int[Array, "b s"],
        *,
        segment_ids: Int[Array, "b s"] | None = None,
        cache=None,
        with_pairs: bool = False,
    ) -> (tuple[Float[Array, "b s d"], Float[Array, ""]]
          | tuple[Float[Array, "b s d"], Float[Array, ""], Float[Array, " b"]]):
        """Returns (attention output before the residual, indexer KL warm-up loss; the loss trains only the
        indexer: no gradient into the main q/k projections or the layer input), and with `with_pairs` also the
        (query, key) pairs attended per row (`ops.dsa.dsa_pair_counts` of this call's selection; what `Llama`
        reports in `ModelAux.visible_pairs`, beside the indexer's work)."""
        if cache is not None:
            raise ValueError("DSAAttention: a KV cache belongs to the model (Llama(..., cache=DSACache...)); a layer "
                             "decodes through sra_jax.nn.dsa_cache.dsa_decode_layer(attn, layer, x, positions, cache)")
        b, s, _ = x.shape
        q, k, v = project_qkv(self.config, self.q_proj, self.k_proj, self.v_proj, x, positions)
        # The indexer reads a detached input (as DeepSeek-V3.2 trains it): its KL loss trains the indexer alone, and
        # its top-k sends no gradient anywhere.
        xi = jax.lax.stop_gradient(x)
        qi = self.indexer_q(xi).reshape(b, s, self.indexer_heads, self.indexer_dim)
        ki, wi = self.indexer_k(xi), self.indexer_w(xi)
        idx, valid = self.select(qi, ki, wi, positions, segment_ids)
        out = dsa.dsa_attention(q, k, v, idx, valid, positions, segment_ids, impl=self.impl, block_q=self.block_q)
        if self.indexer_loss == "dense":
            loss = dsa.indexer_kl_loss(q, k, dsa.indexer_scores(qi, ki, wi, positions, segment_ids), positions,
                                       segment_ids)  # fmt: skip
        else:
            loss = dsa.indexer_kl_loss_selected(
                q, k, qi, ki, wi, idx, valid, positions, segment_ids, block_q=self.block_q
            )
        out = self.o_proj(out.reshape(b, s, -1))
        if not with_pairs:
            return out, loss
        return out, loss, dsa.dsa_pair_counts(idx, valid, positions, segment_ids)

    def select(
        self,
        qi: Float[Array, "b s hi di"],
        ki: Float[Array, "b s di"],
        wi: Float[Array, "b s hi"],
        positions: Int[Array, "b s"],
        segment_ids: Int[Array, "b s"] | None = None,
    ) -> tuple[Int[Array, "b s k"], Bool[Array, "b s k"]]:
        """Each query's top_k keys by the indexer (`ops.dsa.indexer_top_k` with this layer's settings)."""
        return dsa.indexer_top_k(
            qi, ki, wi, positions, segment_ids, top_k=self.top_k, block_k=self.indexer_block_k,
            impl=self.indexer_topk, query_chunk=self.indexer_query_chunk,
        )  # fmt: skip
