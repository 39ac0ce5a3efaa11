"""Block-sparse, top-k gather and sparse-decode attention kernels in Pallas (GPU via Triton, TPU via Mosaic), with references.

jax only: this package never imports sra_jax.
"""

from pallas_kernels import decode, reference
from pallas_kernels.block_sparse import (
    BlockLayout,
    GpuConfig,
    MaskRule,
    block_sparse_attention,
    causal_block_mask,
    compact_bounds,
    compact_is_cheaper,
    critical_counts,
    layout_from_block_mask,
    layout_from_token_mask,
    random_causal_block_mask,
    sra_compact_attention,
    sra_layout,
)
from pallas_kernels.decode import sparse_decode_attention
from pallas_kernels.topk import topk_attention

__all__ = [
    "BlockLayout",
    "GpuConfig",
    "MaskRule",
    "block_sparse_attention",
    "causal_block_mask",
    "compact_bounds",
    "compact_is_cheaper",
    "critical_counts",
    "decode",
    "layout_from_block_mask",
    "layout_from_token_mask",
    "random_causal_block_mask",
    "reference",
    "sparse_decode_attention",
    "sra_compact_attention",
    "sra_layout",
    "topk_attention",
]
