"""Top-k gather attention: each query attends to its own list of key indices (DeepSeek Sparse Attention)."""

from pallas_kernels.topk.api import topk_attention

__all__ = ["topk_attention"]
