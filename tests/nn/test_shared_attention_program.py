"""Inside a jitted model the SRA layers share one attention program (`attention_pallas._shared_spec_attention`, a
nested jit): it is traced and lowered once however many layers call it, and the model's outputs and gradients are
bit-identical to the unshared program's (each layer tracing its own copy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_model, random_tokens
from flax import nnx

from sra_jax.config import SRAConfig
from sra_jax.nn import LeftPaddedKVCache
from sra_jax.ops import attention_pallas

# window 3 and 25% critical tokens at 32 tokens: the critical tokens go through the compact path's gathered keys
SRA = SRAConfig(critical_fraction=0.25, window=3, num_global=1, router_hidden=8)
B, S = 2, 32


def _unshared(*args, platform=None, **kwargs):
    return attention_pallas._spec_attention(*args, **kwargs)


def _programs():
    """(training loss and its gradients, prefill logits into a KV cache), both jitted afresh (no cached trace)."""
    model = make_model(SRA, attention_impl="pallas")
    graph, state = nnx.split(model)
    tokens = random_tokens(B, S, seed=3)

    @jax.jit
    def loss_and_grads(state):
        def loss(state):
            logits, aux = nnx.merge(graph, state)(tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux.selection_log_prob.sum()

        return jax.value_and_grad(loss)(state)

    @jax.jit
    def prefill(state):
        cache = LeftPaddedKVCache.create(model.config, jnp.full((B,), S), prompt_len=S, max_len=S + 4,
                                         critical_capacity=SRA.num_critical(S) + 4)
        logits, aux = nnx.merge(graph, state)(tokens, cache=cache)
        return logits, aux.cache.k, aux.critical

    return state, loss_and_grads, prefill


@pytest.fixture(scope="module")
def shared_and_unshared():
    state, loss_and_grads, prefill = _programs()
    shared = (loss_and_grads(state), prefill(state), prefill.lower(state).as_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_pallas, "_shared_spec_attention", _unshared)
        state, loss_and_grads, prefill = _programs()
        unshared = (loss_and_grads(state), prefill(state), prefill.lower(state).as_text())
    return shared, unshared


def test_layers_share_one_lowered_attention_program(shared_and_unshared):
    (_, _, text), (_, _, unshared_text) = shared_and_unshared
    layers = make_model(SRA).config.num_hidden_layers
    assert text.count("func.func private @_shared_spec_attention") == 1
    assert text.count("call @_shared_spec_attention(") == layers
    assert "_shared_spec_attention" not in unshared_text


def test_shared_program_is_bit_identical_forward_and_gradients(shared_and_unshared):
    (grads, prefill, _), (grads_ref, prefill_ref, _) = shared_and_unshared
    for got, want in zip(jax.tree.leaves((grads, prefill)), jax.tree.leaves((grads_ref, prefill_ref)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.isfinite(np.asarray(grads[0]))
