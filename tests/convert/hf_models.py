"""Tiny random transformers `LlamaForCausalLM` checkpoints covering the layouts a converter must get right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
BASE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    # Larger than the default 0.02 so logits spread out: parity then checks something and greedy has few near-ties.
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
}
# name -> (config overrides, save_pretrained max_shard_size or None)
CONFIGS: dict[str, tuple[dict, str | None]] = {
    "gqa": ({}, None),
    "mqa_tied": ({"num_key_value_heads": 1, "tie_word_embeddings": True}, None),
    "llama3_rope_sharded": ({"rope_scaling": LLAMA3_ROPE, "num_hidden_layers": 3}, "40KB"),
    "odd_vocab_mha": ({"vocab_size": 97, "num_key_value_heads": 4}, None),
    "explicit_head_dim": ({"head_dim": 24, "num_key_value_heads": 2}, None),
}


def build_hf_model(
    name: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> transformers.LlamaForCausalLM:
    overrides, _ = CONFIGS[name]
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def save_hf_model(
    model: transformers.LlamaForCausalLM, path: Path, max_shard_size: str | None = None
) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def padded_batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [3, 12], attention_mask) with rows left-padded by 0, 4 and 9 tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (3, 12))
    mask = np.ones_like(tokens)
    for row, pad in enumerate((0, 4, 9)):
        mask[row, :pad] = 0
        tokens[row, :pad] = 0
    return tokens, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Our padding convention: position -1 where transformers has attention_mask 0."""
    return np.where(mask == 1, np.cumsum(mask, axis=1) - 1, -1).astype(np.int32)


def torch_bits(tensor: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor, for bit-for-bit comparisons (NaN-safe, -0.0 != 0.0)."""
    return tensor.detach().contiguous().flatten().view(torch.uint8).numpy()


def write_random_checkpoint(path: Path, config, dtype=np.float32, seed: int = 0) -> Path:
    """A random HF checkpoint for `config` written straight from the mapping table: no torch, no model init."""
    from sra_jax.convert.hf import write_hf_dir
    from sra_jax.convert.mapping import param_specs
    from sra_jax.convert.safetensors_io import TensorSource

    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)

    def produce(shape):
        return lambda: (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)

    sources = [TensorSource(s.hf_name, dtype, s.hf_shape, produce(s.hf_shape)) for s in param_specs(config)]
    path.mkdir(parents=True)
    write_hf_dir(path, config, None, sources, [], max_shard_bytes=2 * 10**9)
    return path
