"""sra_jax.ops: pure functions of arrays (no state, no Flax): selection, masks, RoPE, attention."""

from sra_jax.ops.attention import attention, attention_flops
from sra_jax.ops.masks import SRAMaskSpec, mask_density, sra_mask, to_block_layout
from sra_jax.ops.rope import apply_rope, rope_frequencies
from sra_jax.ops.selection import gumbel_topk, gumbel_topk_indices, sparsemax, topk_log_prob, topk_mask

__all__ = [
    "SRAMaskSpec",
    "apply_rope",
    "attention",
    "attention_flops",
    "gumbel_topk",
    "gumbel_topk_indices",
    "mask_density",
    "rope_frequencies",
    "sparsemax",
    "sra_mask",
    "to_block_layout",
    "topk_log_prob",
    "topk_mask",
]
