"""Block-sparse attention: layouts, the token rule, GPU (Triton) and TPU (Mosaic) Pallas kernels."""

from pallas_kernels.block_sparse.api import block_sparse_attention
from pallas_kernels.block_sparse.compact import (
    compact_bounds,
    compact_is_cheaper,
    critical_counts,
    sra_compact_attention,
)
from pallas_kernels.block_sparse.gpu import GpuConfig
from pallas_kernels.block_sparse.layout import (
    BlockLayout,
    causal_block_mask,
    layout_from_block_mask,
    layout_from_token_mask,
    random_causal_block_mask,
    sra_layout,
)
from pallas_kernels.block_sparse.token_mask import MaskRule

__all__ = [
    "BlockLayout",
    "GpuConfig",
    "MaskRule",
    "block_sparse_attention",
    "causal_block_mask",
    "compact_bounds",
    "compact_is_cheaper",
    "critical_counts",
    "layout_from_block_mask",
    "layout_from_token_mask",
    "random_causal_block_mask",
    "sra_compact_attention",
    "sra_layout",
]
