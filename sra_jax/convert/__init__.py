"""Hugging Face Llama safetensors <-> `sra_jax.nn.Llama` <-> orbax checkpoints, streamed one tensor at a time."""

from sra_jax.convert.hf import load_hf, save_hf
from sra_jax.convert.orbax_io import hf_to_orbax, load_orbax, orbax_to_hf, save_orbax

__all__ = ["hf_to_orbax", "load_hf", "load_orbax", "orbax_to_hf", "save_hf", "save_orbax"]
