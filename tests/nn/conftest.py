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


def assert_lists_match_flags(cache) -> None:
    """The cache's critical slot lists: the first num_critical entries of each row are nonzero(critical) in order,
    -1 after them (caches built by KVCache.init)."""
    critical = np.asarray(cache.critical)
    slots, counts = np.asarray(cache.critical_slots), np.asarray(cache.num_critical)
    for layer in range(critical.shape[0]):
        for row in range(critical.shape[1]):
            want = np.flatnonzero(critical[layer, row])
            assert counts[layer, row] == len(want), (layer, row)
            np.testing.assert_array_equal(slots[layer, row, : len(want)], want, err_msg=f"{layer=} {row=}")
            assert np.all(slots[layer, row, len(want) :] == -1), (layer, row)


def random_tokens(batch: int, seq: int, seed: int = 0, vocab: int = 256) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, seq)), jnp.int32)


@pytest.fixture
def config() -> LlamaConfig:
    return LlamaConfig.tiny()


@pytest.fixture
def sra() -> SRAConfig:
    return SRAConfig(critical_fraction=0.25, window=4, num_global=1, selection="topk", router_hidden=16)
