"""Greedy evaluation generation (sra_jax.evals.generation) against sra_jax.generate and the model's own forward."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.evals.generation import greedy_generate
from sra_jax.generate import generate

CONFIG = LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, max_position_embeddings=128)
PROMPTS = [[5, 9, 13, 2, 7, 30, 31], [4], [60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def model():
    from sra_jax.nn import Llama

    return Llama(CONFIG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def reference(model):
    return generate(model, PROMPTS, max_new_tokens=12)


def test_matches_sra_jax_generate_greedy(model, reference):
    result = greedy_generate(model, PROMPTS, max_new_tokens=12, chunk=5, bucket=16)
    assert result.tokens == reference
    assert result.stopped == [False] * len(PROMPTS)
    assert result.prompt_tokens == result.generated_tokens == 0  # no SRA layer


def test_stop_tokens_end_each_row_at_its_first_stop(model, reference):
    stop = reference[0][4]
    result = greedy_generate(model, PROMPTS, max_new_tokens=12, stop_tokens=[stop], chunk=3)
    for row, ref in zip(result.tokens, reference):
        end = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row == ref[:end]
    assert result.stopped == [stop in ref for ref in reference]


def test_a_stop_callback_ends_a_row_after_the_chunk_that_triggered_it(model, reference):
    result = greedy_generate(model, PROMPTS, max_new_tokens=12, stop=lambda ids: len(ids) >= 5, chunk=4)
    assert result.tokens == [ref[:8] for ref in reference]
    assert result.stopped == [True] * len(PROMPTS)


def test_sra_counts_match_the_models_own_selection():
    from sra_jax.nn import Llama

    sra = SRAConfig(critical_fraction=0.25, window=2, num_global=1)
    model = Llama(CONFIG, sra, rngs=nnx.Rngs(4))
    result = greedy_generate(model, PROMPTS, max_new_tokens=6, bucket=16, chunk=4)
    width = 16
    tokens = np.zeros((len(PROMPTS), width), np.int32)
    positions = np.full((len(PROMPTS), width), -1, np.int32)
    for row, prompt in enumerate(PROMPTS):
        tokens[row, width - len(prompt):] = prompt
        positions[row, width - len(prompt):] = np.arange(len(prompt))
    # The prefill is the prompt less its last column, without a cache the selection is the same top-k.
    _, aux = model(jnp.asarray(tokens[:, :-1]), jnp.asarray(positions[:, :-1]))
    valid = positions[:, :-1] >= 0
    layers = list(aux.sra_layers)
    assert layers
    expected = sum(int((np.asarray(aux.critical[i]) & valid).sum()) for i in layers)
    assert result.prompt_critical == expected
    assert result.prompt_tokens == valid.sum() * len(layers)
    # Decode steps: the last prompt token and 5 new ones per row (the 6th token is never fed back).
    assert result.generated_tokens == 6 * len(PROMPTS) * len(layers)
    assert 0 <= result.generated_critical <= result.generated_tokens


def test_bad_input_is_named(model):
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        greedy_generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        greedy_generate(model, [[1] * 100], max_new_tokens=40)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, [[1]], max_new_tokens=0)
