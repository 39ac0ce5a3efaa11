"""`Llama(remat=...)`: rematerialised decoder layers give the loss and gradients of the plain model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn import Llama
from sra_jax.train import losses

CONFIG = LlamaConfig.tiny(num_hidden_layers=3)
SRA = SRAConfig(critical_fraction=0.25, window=4, mask="static", selection="gumbel_topk", router_hidden=16)


def _loss_and_grads(remat: str):
    model = Llama(CONFIG, SRA, rngs=nnx.Rngs(0), remat=remat)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CONFIG.vocab_size)
    mask = jnp.broadcast_to(jnp.arange(16) >= 8, (2, 16))

    def loss(params):
        logits, aux = nnx.merge(graphdef, params)(tokens, key=jax.random.key(2))
        # CE (Llama weights, through the straight-through selection) + a router term (its logits).
        return losses.cross_entropy(logits, tokens, mask) + 0.1 * jnp.mean(aux.router_logits ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def plain():
    return _loss_and_grads("none")


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_matches_no_remat(plain, remat):
    value, grads = _loss_and_grads(remat)
    ref_value, ref_grads = plain
    # The same ops run again in the backward pass but XLA fuses and orders the recomputed sums differently: float32
    # round-off only, bounded relative to each gradient's scale.
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    flat, ref_flat = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(ref_grads))
    assert flat.keys() == ref_flat.keys()
    for path in ref_flat:
        ref = np.asarray(ref_flat[path].get_value())
        np.testing.assert_allclose(flat[path].get_value(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                   err_msg=str(path))


def test_bad_remat_is_refused():
    with pytest.raises(ValueError, match="remat='some'"):
        Llama(CONFIG, None, rngs=nnx.Rngs(0), remat="some")


@pytest.mark.parametrize("remat", ["none", "full"])
def test_remat_wraps_each_layer_in_a_checkpoint(remat):
    model = Llama(CONFIG, None, rngs=nnx.Rngs(0), remat=remat)
    graphdef, params = nnx.split(model, nnx.Param)
    jaxpr = str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(jnp.zeros((1, 8), jnp.int32))[0])(params))
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") == (CONFIG.num_hidden_layers if remat != "none" else 0)
