"""`DSAAttention`: a Llama attention layer with DeepSeek Sparse Attention (see `sra_jax.ops.dsa`). q/k/v/o as
`SparseReasoningAttention`; the lightning indexer's weights are `indexer_q` (hidden -> heads_i * dim_i),
`indexer_k` (hidden -> dim_i) and `indexer_w` (hidden -> heads_i)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from sra_jax.config import LlamaConfig
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
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if min(top_k, indexer_heads, indexer_dim, block_q) < 1:
            raise ValueError(f"top_k, indexer_heads, indexer_dim, block_q must be >= 1, got "
                             f"{top_k}, {indexer_heads}, {indexer_dim}, {block_q}")  # fmt: skip
        self.config = config
        self.top_k, self.indexer_heads, self.indexer_dim, self.block_q = top_k, indexer_heads, indexer_dim, block_q
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
    ) -> tuple[Float[Array, "b s d"], Float[Array, ""]]:
        """Returns (attention output before the residual, indexer KL warm-up loss; the loss sends no gradient into
        the main q/k projections)."""
        if cache is not None:
            raise ValueError("DSAAttention: decode with a KV cache is not supported by this module yet (cache=...)")
        b, s, _ = x.shape
        q, k, v = project_qkv(self.config, self.q_proj, self.k_proj, self.v_proj, x, positions)
        qi = self.indexer_q(x).reshape(b, s, self.indexer_heads, self.indexer_dim)
        scores = dsa.indexer_scores(qi, self.indexer_k(x), self.indexer_w(x), positions, segment_ids)
        idx, valid = dsa.top_k_keys(scores, self.top_k)
        out = dsa.dsa_attention_gather(q, k, v, idx, valid, positions, segment_ids, block_q=self.block_q)
        loss = dsa.indexer_kl_loss(q, k, scores, positions, segment_ids)
        return self.o_proj(out.reshape(b, s, -1)), loss
