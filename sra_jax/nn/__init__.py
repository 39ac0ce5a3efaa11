"""Flax NNX modules of sra-jax: the Llama 3 decoder with Sparse Reasoning Attention, its router and KV cache."""

from sra_jax.nn.attention import SparseReasoningAttention
from sra_jax.nn.cache import KVCache, LeftPaddedKVCache
from sra_jax.nn.layers import MLP, RMSNorm
from sra_jax.nn.llama import DecoderLayer, Llama, ModelAux, attention_flops, router_flops
from sra_jax.nn.router import Router
from sra_jax.nn.selection import Selection, critical_counts, select

__all__ = [
    "MLP",
    "DecoderLayer",
    "KVCache",
    "LeftPaddedKVCache",
    "Llama",
    "ModelAux",
    "RMSNorm",
    "Router",
    "Selection",
    "SparseReasoningAttention",
    "attention_flops",
    "critical_counts",
    "router_flops",
    "select",
]
