"""Router distillation (sra_jax.train.router_distill, loss term "router_distill"): the teacher walk is the dense
forward, the term's value equals a direct dense computation (full [s, s] probabilities, numpy KL), per-segment KL
matches a per-segment loop, only router parameters get its gradient, and the config keys are checked."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.data.longhop import LonghopBatch
from sra_jax.nn import Llama
from sra_jax.nn.layers import project_qkv
from sra_jax.ops.nsa import masked_attention, token_mask
from sra_jax.train import objectives
from sra_jax.train.config import LossConfig, TrainConfig
from sra_jax.train.longhop_eval import top_mass_overlap, top_mass_sets
from sra_jax.train.router_distill import distill_kl, query_weights, router_distill_loss, teacher_attention

CONFIG = LlamaConfig.tiny(vocab_size=32, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2)
SRA = SRAConfig(critical_fraction=0.25, window=3, num_global=2, router_hidden=8, selection="gumbel_topk")


@pytest.fixture(scope="module")
def model():
    return Llama(CONFIG, SRA, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    b, s = 3, 14
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, size=(b, s)), jnp.int32)
    positions = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    positions[1, 11:] = -1  # a padded row
    target = np.zeros((b, s), bool)
    target[:, 9:11] = True  # the "answer": tokens 9, 10 (queries 8, 9 predict them)
    target[2, 12] = True
    return tokens, jnp.asarray(positions), jnp.asarray(target)


def test_the_teacher_walk_is_the_dense_forward(model, batch):
    tokens, positions, target = batch
    inputs, masses = teacher_attention(model, tokens, positions, None, query_weights(positions, target, "all"))
    assert len(inputs) == len(masses) == CONFIG.num_hidden_layers
    # A one-layer dense Llama with layer 0's weights and layer 1's input norm as its final norm: its logits are the
    # head applied to the walk's input of layer 1.
    short = Llama(dataclasses.replace(CONFIG, num_hidden_layers=1), rngs=nnx.Rngs(1))
    short.embed.embedding[...] = model.embed.embedding[...]
    nnx.update(short.layers[0], nnx.state(model.layers[0], nnx.All(nnx.Param, nnx.Not(nnx.PathContains("router")))))
    short.norm.scale[...] = model.layers[1].input_norm.scale[...]
    if model.lm_head is not None:
        short.lm_head.kernel[...] = model.lm_head.kernel[...]
    head = model.embed.attend if model.lm_head is None else model.lm_head
    want, _ = short(tokens, positions)
    valid = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(head(inputs[1]))[valid], np.asarray(want)[valid],
                               rtol=1e-5, atol=1e-5)  # float32, the same ops in another order


def _direct_loss(model, tokens, positions, target, queries):
    """Full probabilities, numpy mass and KL, from the walk's layer inputs (checked above)."""
    weights = np.asarray(query_weights(positions, target, queries))
    inputs, _ = teacher_attention(model, tokens, positions, None, jnp.asarray(weights))
    pos = np.asarray(positions)
    valid = pos >= 0
    qp, kp = pos[:, :, None], pos[:, None, :]
    counted = (kp >= SRA.num_global) & (qp - kp >= SRA.window)
    total = 0.0
    for i in model.sra_layers:
        attn = model.layers[i].attn
        q, k, _ = project_qkv(CONFIG, attn.q_proj, attn.k_proj, attn.v_proj, inputs[i], positions)
        _, p = masked_attention(q, k, k, token_mask(positions, positions))
        mass = np.einsum("bhqk,bqk,bq->bk", np.asarray(p, np.float64), counted, weights)
        logits = np.asarray(attn.router(inputs[i]), np.float64)
        kls = []
        for row in range(len(pos)):
            if mass[row].sum() == 0:
                continue
            t = mass[row][valid[row]] / mass[row].sum()
            z = logits[row][valid[row]]
            log_r = z - np.log(np.exp(z - z.max()).sum()) - z.max()
            kls.append(np.sum(np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - log_r), 0)))
        total += np.mean(kls)
    return total


@pytest.mark.parametrize("queries", ["target", "all"])
def test_the_loss_equals_a_direct_dense_computation(model, batch, queries):
    tokens, positions, target = batch
    got = router_distill_loss(model, tokens, positions, target, queries=queries, block_q=4)
    assert float(got) > 0
    # float32 blockwise sums against float64 numpy of float32 probabilities
    np.testing.assert_allclose(float(got), _direct_loss(model, tokens, positions, target, queries), rtol=1e-4)


def test_packed_segments_get_one_distribution_each():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 9)), jnp.float32)
    mass = jnp.asarray(rng.uniform(size=(2, 9)) * (rng.uniform(size=(2, 9)) > 0.3), jnp.float32)
    segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 3, 3, 3, 3]], jnp.int32)
    valid = segment_ids > 0
    want = []
    for row in range(2):
        for seg in set(np.asarray(segment_ids[row]).tolist()) - {0}:
            keys = np.asarray(segment_ids[row]) == seg
            m = np.asarray(mass[row])[keys]
            if m.sum() == 0:
                continue
            t, z = m / m.sum(), np.asarray(logits[row], np.float64)[keys]
            log_r = z - np.log(np.exp(z).sum())
            want.append(np.sum(np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - log_r), 0)))
    got = distill_kl(logits, mass, valid, segment_ids)
    np.testing.assert_allclose(float(got), np.mean(want), rtol=1e-5)  # float32 vs float64
    one_row = distill_kl(logits, mass, valid)  # without segment ids: one distribution per row
    assert float(one_row) != pytest.approx(float(got))


def test_only_router_parameters_get_the_gradient(model, batch):
    tokens, positions, target = batch
    loss = LossConfig(kind="sl", sl_weight=0.0, router_distill_weight=2.0)

    def value(m):
        outputs = objectives.Outputs(model=m, tokens=tokens, positions=positions, segment_ids=None,
                                     target_mask=target, logits=None, aux=None, tau=None, metrics={})
        contribution, metrics = objectives.router_distill_term(outputs, loss)
        return contribution, metrics

    (contribution, metrics), grads = nnx.value_and_grad(value, has_aux=True)(model)
    assert float(contribution) == pytest.approx(2.0 * float(metrics["router_distill"]))
    flat = nnx.to_flat_state(nnx.state(grads, nnx.Param))
    routers = {path: g for path, g in flat if "router" in map(str, path)}
    others = {path: g for path, g in flat if "router" not in map(str, path)}
    assert routers and others
    assert all(float(jnp.abs(g[...]).max()) > 0 for g in routers.values())
    assert all(float(jnp.abs(g[...]).max()) == 0 for g in others.values())


def test_config_keys_are_checked_and_the_term_is_off_by_default():
    assert LossConfig().router_distill_weight == 0
    assert "router_distill" not in objectives.active_terms(LossConfig(kind="rl"), has_sra=True)
    on = LossConfig(kind="rl", router_distill_weight=0.5)
    assert objectives.active_terms(on, has_sra=True) == ("indexer_kl", "router_distill", "router_rl")
    assert "router_distill" not in objectives.active_terms(on, has_sra=False)
    with pytest.raises(ValueError, match="router_distill_queries"):
        LossConfig(router_distill_queries="answer")
    with pytest.raises(ValueError, match="router_distill_weight"):
        LossConfig(router_distill_weight=-1.0)
    with pytest.raises(ValueError, match="sra.attention"):
        TrainConfig.load(None, ["loss.router_distill_weight=1.0"])  # the default config has no SRA
    with pytest.raises(ValueError, match="queries"):
        query_weights(jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), bool), "answer")


def test_top_mass_sets_take_the_heaviest_prompt_keys_and_score_them_against_the_oracle():
    positions = np.tile(np.arange(10, dtype=np.int32), (2, 1))
    oracle = np.zeros((2, 10), bool)
    oracle[:, [2, 3]] = True
    batch = LonghopBatch(tokens=np.zeros((2, 10), np.int32), positions=positions, loss_mask=np.zeros((2, 10), bool),
                         oracle=oracle, prompt_lengths=np.array([8, 8]), answers=np.zeros(2, np.int32),
                         hops=np.ones(2, np.int32))
    mass = np.zeros((2, 10))
    mass[0, [2, 5, 9]] = [3.0, 2.0, 9.0]  # key 9 is past the prompt: never picked
    mass[1, [3, 2]] = [1.0, 0.5]
    chosen = top_mass_sets(mass, batch, 0.2)  # ceil(0.2 * 10) = 2 keys a row
    assert chosen[0].nonzero()[0].tolist() == [2, 5] and chosen[1].nonzero()[0].tolist() == [2, 3]
    overlap = top_mass_overlap(mass, batch, 0.2)
    assert overlap["precision"] == pytest.approx(3 / 4) and overlap["recall"] == pytest.approx(3 / 4)
    assert overlap["oracle_mass_share"] == pytest.approx((3.0 + 1.5) / (5.0 + 1.5))
