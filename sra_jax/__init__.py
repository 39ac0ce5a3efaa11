"""sra-jax: Sparse Reasoning Attention for JAX / Flax NNX."""

from sra_jax.config import LlamaConfig, RopeScaling, SRAConfig

__all__ = ["LlamaConfig", "RopeScaling", "SRAConfig"]
__version__ = "0.1.0"
