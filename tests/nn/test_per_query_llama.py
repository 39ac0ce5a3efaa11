"""NSA / DSA layers inside `Llama` (`SRAConfig.attention`): forward + gradients, FLOP counts, the retrofit path of
both (train from a Hugging Face Llama with only the extras trainable; DSA in its indexer-KL warm-up stage),
export -> transformers / load_hf, and the cache refusal."""

from __future__ import annotations

import dataclasses


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sra_jax.cli import main as cli
from sra_jax.config import DSAConfig, LlamaConfig, NSAConfig, SRAConfig
from sra_jax.convert import load_hf
from sra_jax.convert.source import load_source
from sra_jax.nn import KVCache, Llama
from sra_jax.nn.dsa import DSAAttention
from sra_jax.nn.nsa import NSAAttention
from sra_jax.train.update import is_router_param

TINY_NSA = NSAConfig(block=4, stride=2, block_sel=4, top_n=2, window=4)
TINY_DSA = DSAConfig(top_k=4, indexer_heads=2, indexer_dim=8, block_q=4, indexer_block_k=8, impl="reference")
HF_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, initializer_range=0.1,
                 tie_word_embeddings=False)


def _flat(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("kind", ["nsa", "dsa"])
def test_llama_with_per_query_layers_forward_and_grad(kind):
    config = LlamaConfig.tiny()
    sra = SRAConfig(attention=kind, layers=(1,), nsa=TINY_NSA, dsa=TINY_DSA)
    model = Llama(config, sra, rngs=nnx.Rngs(0))
    assert isinstance(model.layers[1].attn, NSAAttention if kind == "nsa" else DSAAttention)
    assert model.sra_layers == ()
    dense = Llama(config, None, rngs=nnx.Rngs(0))
    # Same Llama parameter names and shapes; only the extras are new.
    ours, theirs = _flat(model), _flat(dense)
    extras = {p for p in ours if is_router_param(p)}
    assert extras and set(ours) - extras == set(theirs)
    assert all(ours[p].shape == theirs[p].shape for p in theirs)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size)
    positions = jnp.where(jnp.arange(16) < 12, jnp.arange(16), -1)[None].repeat(2, 0).at[0].set(jnp.arange(16))

    @nnx.jit
    def loss_and_grad(m):
        def loss(m):
            logits, aux = m(tokens, positions)
            return -jax.nn.log_softmax(logits)[..., 0].mean() + aux.indexer_loss.sum(), (logits, aux)

        return nnx.value_and_grad(loss, has_aux=True)(m)

    (_, (logits, aux)), grads = loss_and_grad(model)
    assert logits.shape == (2, 16, config.vocab_size) and bool(jnp.isfinite(logits).all())
    assert aux.indexer_loss.shape == (2,)
    assert (float(aux.indexer_loss[1]) > 0) == (kind == "dsa") and float(aux.indexer_loss[0]) == 0
    # the dense layer counts every causal pair; short rows: top_k / the window cover most keys
    np.testing.assert_array_equal(aux.visible_pairs[0], aux.causal_pairs[0])
    assert bool((aux.visible_pairs[1] > 0).all()) and (float(aux.selection_pairs[1].min()) > 0) == (kind == "dsa")
    grads = dict(nnx.to_flat_state(grads))
    for p in extras:
        assert bool(jnp.isfinite(grads[p].get_value()).all()), p
    assert any(float(jnp.abs(grads[p].get_value()).max()) > 0 for p in extras)


@pytest.mark.parametrize("kind", ["nsa", "dsa"])
def test_llama_counts_the_pairs_nsa_and_dsa_layers_attend(kind):
    """At 96 tokens (12 selection blocks, top-2; top_k 8 of up to 96 keys) a per-query layer's density is < 1 and
    its `ModelAux` row is the layer's own count (padding and packed segments in), plus for DSA the indexer's
    scoring of every causal pair at its FLOPs ratio; `attention_flops` sums the rows."""
    from sra_jax.nn import attention_flops
    from sra_jax.ops import dsa
    from sra_jax.ops.attention import attention_flops as pair_flops

    config = LlamaConfig.tiny()
    nsa_cfg = NSAConfig(block=8, stride=4, block_sel=8, top_n=2, window=8)
    dsa_cfg = dataclasses.replace(TINY_DSA, top_k=8, block_q=16, indexer_block_k=32)
    model = Llama(config, SRAConfig(attention=kind, layers=(0,), nsa=nsa_cfg, dsa=dsa_cfg), rngs=nnx.Rngs(0))
    s = 96
    tokens = jax.random.randint(jax.random.key(5), (2, s), 0, config.vocab_size)
    i = jnp.arange(s)
    positions = jnp.stack([i, jnp.where(i < 90, jnp.where(i < 40, i, i - 40), -1)])  # row 1: two segments + padding
    segment_ids = jnp.stack([jnp.zeros(s, jnp.int32), (i >= 40).astype(jnp.int32)])

    @nnx.jit
    def run(m):
        _, aux = m(tokens, positions, segment_ids=segment_ids)
        layer = m.layers[0]
        own = layer.attn(layer.input_norm(m.embed(tokens)), positions, segment_ids=segment_ids, with_pairs=True)
        return aux, own[-1]

    aux, attended = run(model)
    causal = np.asarray(aux.causal_pairs[0])
    np.testing.assert_array_equal(causal, [s * (s + 1) / 2, 40 * 41 / 2 + 50 * 51 / 2])
    ratio = dsa.indexer_flops_per_pair(2, 8) / float(pair_flops(1.0, num_heads=4, head_dim=config.head_dim))
    selection = causal * ratio if kind == "dsa" else np.zeros(2)
    np.testing.assert_allclose(np.asarray(aux.selection_pairs[0]), selection, rtol=1e-6)  # float32 product
    np.testing.assert_allclose(np.asarray(aux.visible_pairs[0]), np.asarray(attended) + selection, rtol=1e-6)
    assert bool((aux.mask_density[0] < 1).all()) and bool((aux.mask_density[1] == 1).all())
    dense, sparse = attention_flops(config, aux)
    per_pair = float(pair_flops(1.0, num_heads=4, head_dim=config.head_dim))
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(aux.visible_pairs).sum(0) * per_pair, rtol=1e-6)
    assert bool((sparse < dense).all())


def test_nsa_layers_refuse_a_plain_kv_cache_naming_the_layer():
    config = LlamaConfig.tiny(num_hidden_layers=1)
    model = Llama(config, SRAConfig(attention="nsa", layers=(0,), nsa=TINY_NSA), rngs=nnx.Rngs(0))
    cache = KVCache.init(config, batch=1, max_len=8)
    with pytest.raises(ValueError, match="layer 0 .*decodes with an NSACache"):
        model(jnp.zeros((1, 4), jnp.int32), cache=cache)


def test_config_validation_and_dict_round_trip():
    with pytest.raises(ValueError, match="SRAConfig.attention"):
        SRAConfig(attention="flash")
    with pytest.raises(ValueError, match="NSAConfig.stride"):
        NSAConfig(block=4, stride=8)
    with pytest.raises(ValueError, match="DSAConfig.top_k"):
        DSAConfig(top_k=0)
    sra = SRAConfig(attention="dsa", dsa=TINY_DSA)


    assert SRAConfig(**dataclasses.asdict(sra)) == sra


# Per-kind settings of the retrofit runs. DSA trains in its warm-up stage: the Llama frozen (init.trainable=router),
# the indexer learning from its KL to the dense attention distribution (indexer_loss=dense, loss.indexer_kl_weight).
RETROFIT = {
    "nsa": ["sra.nsa.block=4", "sra.nsa.stride=2", "sra.nsa.block_sel=4", "sra.nsa.top_n=2", "sra.nsa.window=4"],
    "dsa": ["sra.dsa.top_k=4", "sra.dsa.indexer_heads=2", "sra.dsa.indexer_dim=8", "sra.dsa.block_q=4",
            "sra.dsa.indexer_block_k=8", "sra.dsa.indexer_loss=dense", "sra.dsa.impl=gather"],
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(RETROFIT))
def retrofit(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"{kind}_retrofit")
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    hf_model.save_pretrained(root / "src", safe_serialization=True)
    sets = ["steps=2", "batch_size=2", "optim.warmup_steps=0", "log.dir=null", "log.progress=false",
            "checkpoint.async_save=false", "data.eval_size=8", f"checkpoint.dir={root / 'run'}",
            f"init.from={root / 'src'}", "init.trainable=router", f"sra.attention={kind}", "sra.layers=[1]",
            *RETROFIT[kind], "loss.teacher_kl_weight=0.0"]
    argv = ["-q", "train", "--config", "synthetic_sra", *[a for s in sets for a in ("--set", s)]]
    assert cli(argv) == 0
    assert cli(["-q", "export", "--checkpoint", str(root / "run"), "--out", str(root / "export")]) == 0
    return kind, root, hf_model


_forward = nnx.jit(lambda m, tokens: m(tokens))  # one compile per model kind, shared by the retrofit tests


def _with_fresh_extras(model: Llama) -> Llama:
    """`model` with its extras as the run started them (a fresh model of the run's seed 0)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fresh = dict(nnx.to_flat_state(nnx.state(Llama(model.config, model.sra, rngs=nnx.Rngs(0)), nnx.Param)))
    mixed = [(p, fresh[p] if is_router_param(p) else v) for p, v in nnx.to_flat_state(params)]
    return nnx.merge(graphdef, nnx.from_flat_state(mixed), rest)


def test_retrofit_trains_only_the_extras(retrofit):
    kind, root, _ = retrofit
    before = _flat(load_source(root / "src")[2])
    _, sra, trained = load_source(root / "run")
    assert sra.attention == kind and isinstance(trained.layers[1].attn, NSAAttention if kind == "nsa" else DSAAttention)
    after = _flat(trained)
    extras = [p for p in after if is_router_param(p)]
    assert extras and set(after) - set(extras) == set(before)
    for p in before:
        np.testing.assert_array_equal(after[p], before[p], err_msg=str(p))
    started = _flat(_with_fresh_extras(trained))
    trained_name = "nsa_gate" if kind == "nsa" else "indexer_q"
    assert any(not np.array_equal(after[p], started[p]) for p in extras if trained_name in map(str, p))
    if kind == "dsa":  # the warm-up stage lowered the indexer's KL to the dense attention distribution
        tokens = jax.random.randint(jax.random.key(2), (4, 32), 0, 128)
        kl_start = float(_forward(_with_fresh_extras(trained), tokens)[1].indexer_loss[1])
        kl_end = float(_forward(trained, tokens)[1].indexer_loss[1])
        assert kl_end < 0.97 * kl_start, (kl_start, kl_end)  # 1.043 -> 0.948 after the two steps


def test_export_loads_in_transformers_and_load_hf(retrofit):
    kind, root, hf_model = retrofit
    out = root / "export"
    assert (out / "sra_router.safetensors").exists() and (out / "sra_config.json").exists()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    for name, tensor in hf_model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)
    _, _, trained = load_source(root / "run")
    _, restored = load_hf(out)
    assert restored.sra.attention == kind and getattr(restored.sra, kind) == getattr(trained.sra, kind)
    assert _flat(restored).keys() == _flat(trained).keys()
    tokens = jax.random.randint(jax.random.key(2), (1, 12), 0, 128)
    np.testing.assert_array_equal(np.asarray(_forward(restored, tokens)[0]), np.asarray(_forward(trained, tokens)[0]))


def test_dsa_cache_decode_equals_full_recompute():
    from sra_jax.nn.dsa_cache import DSACache

    config = LlamaConfig.tiny()
    sra = SRAConfig(attention="dsa", layers=(1,), dsa=TINY_DSA)
    model = Llama(config, sra, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, config.vocab_size)
    step = nnx.jit(lambda m, t, c: m(t, cache=c))
    full, _ = step(model, tokens, None)
    cache = DSACache.init(config, sra, batch=2, max_len=16)
    logits, aux = step(model, tokens[:, :6], cache)
    outs = [logits]
    for t in range(6, 12):  # top_k=4 < visible keys: the decode steps select
        logits, aux = step(model, tokens[:, t : t + 1], aux.cache)
        outs.append(logits)
    # Same math in a different order (gathered vs dense softmax): float32 rounding only.
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert int(aux.cache.index) == 12
    with pytest.raises(ValueError, match="layer 1 .*DSACache"):
        model(tokens[:, :2], cache=KVCache.init(config, batch=2, max_len=8))


def test_the_indexer_kl_term_trains_the_dsa_indexers_and_nothing_else():
    """`loss.indexer_kl_weight` (on by default) is what trains a DSA indexer: its gradient reaches every indexer
    parameter and no other parameter (the indexer reads a detached input; its KL stops q / k)."""
    from sra_jax.train import objectives
    from sra_jax.train.config import LossConfig

    config = LlamaConfig.tiny()
    model = Llama(config, SRAConfig(attention="dsa", layers=(1,), dsa=TINY_DSA), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, config.vocab_size)

    def term(m):
        logits, aux = m(tokens)
        outputs = objectives.Outputs(model=m, tokens=tokens, positions=None, segment_ids=None, target_mask=None,
                                     logits=logits, aux=aux, tau=None, metrics={})
        value, metrics = objectives.indexer_kl_term(outputs, LossConfig(indexer_kl_weight=0.5))
        return value, metrics

    (value, metrics), grads = nnx.value_and_grad(term, has_aux=True)(model)
    assert float(value) == pytest.approx(0.5 * float(metrics["indexer_kl"])) and float(value) > 0
    flat = _flat_grads(grads)
    indexer = {p for p in flat if any("indexer" in str(k) for k in p)}
    assert indexer and all(np.abs(flat[p]).max() > 0 for p in indexer)
    assert all(not np.abs(flat[p]).any() for p in set(flat) - indexer)
    sra_only = Llama(config, SRAConfig(layers=(1,)), rngs=nnx.Rngs(0))
    logits, aux = sra_only(tokens)
    outputs = objectives.Outputs(model=sra_only, tokens=tokens, positions=None, segment_ids=None, target_mask=None,
                                 logits=logits, aux=aux, tau=None, metrics={})
    assert objectives.indexer_kl_term(outputs, LossConfig())[1] == {}


def _flat_grads(grads) -> dict:
    return {tuple(str(getattr(k, "key", k)) for k in path): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(grads)}
