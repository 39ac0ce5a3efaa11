"""Sparse attention of a few new tokens against a KV cache (flash-decoding over window + critical slots)."""

from pallas_kernels.decode.api import decode_slots, sparse_decode_attention

__all__ = ["decode_slots", "sparse_decode_attention"]
