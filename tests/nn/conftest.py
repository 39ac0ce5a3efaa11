"""Small models shared by the nn tests (LlamaConfig.tiny: 2 layers, hidden 64, 4 heads, 2 kv heads)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn import Llama


def make_model(sra: SRAConfig | None = None, seed: int = 0, **kwargs) -> Llama:
    config = kwargs.pop("config", None) or LlamaConfig.tiny()
    return Llama(config, sra, rngs=nnx.Rngs(seed), **kwargs)


@nnx.jit
def forward(model: Llama, tokens, positions=None, cache=None, **kwargs):
    """`model(...)` compiled: one XLA program per (config, shape), shared by every test that uses it, which is much
    faster on CPU than eager op-by-op dispatch."""
    return model(tokens, positions, cache, **kwargs)


def random_tokens(batch: int, seq: int, seed: int = 0, vocab: int = 256) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, seq)), jnp.int32)


@pytest.fixture
def config() -> LlamaConfig:
    return LlamaConfig.tiny()


@pytest.fixture
def sra() -> SRAConfig:
    return SRAConfig(critical_fraction=0.25, window=4, num_global=1, selection="topk", router_hidden=16)
