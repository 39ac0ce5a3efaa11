"""The Llama model: parameter-tree contract, equivalence with plain causal attention, SRA limits, gradients, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, make_model, random_tokens
from flax import nnx

from sra_jax.config import LlamaConfig, RopeScaling, SRAConfig
from sra_jax.nn import KVCache, Llama, attention_flops, router_flops


def flat_params(model: Llama) -> dict[str, nnx.Param]:
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def expected_tree(config: LlamaConfig, router_hidden: int | None) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """docs/nn.md, "Parameter tree": name -> (shape, logical axes)."""
    d, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    tree = {"embed.embedding": ((config.vocab_size, d), ("vocab", "embed")), "norm.scale": ((d,), ("norm",))}
    if not config.tie_word_embeddings:
        tree["lm_head.kernel"] = ((d, config.vocab_size), ("embed", "vocab"))
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        tree |= {
            p + "input_norm.scale": ((d,), ("norm",)),
            p + "post_attention_norm.scale": ((d,), ("norm",)),
            p + "attn.q_proj.kernel": ((d, q), ("embed", "q_heads")),
            p + "attn.k_proj.kernel": ((d, kv), ("embed", "kv_heads")),
            p + "attn.v_proj.kernel": ((d, kv), ("embed", "kv_heads")),
            p + "attn.o_proj.kernel": ((q, d), ("q_heads", "embed")),
            p + "mlp.gate_proj.kernel": ((d, inter), ("embed", "mlp")),
            p + "mlp.up_proj.kernel": ((d, inter), ("embed", "mlp")),
            p + "mlp.down_proj.kernel": ((inter, d), ("mlp", "embed")),
        }
        if router_hidden:
            tree |= {
                p + "attn.router.hidden.kernel": ((d, router_hidden), ("embed", "router_hidden")),
                p + "attn.router.hidden.bias": ((router_hidden,), ("router_hidden",)),
                p + "attn.router.score.kernel": ((router_hidden, 1), ("router_hidden", None)),
            }
        elif router_hidden == 0:
            tree[p + "attn.router.score.kernel"] = ((d, 1), ("embed", None))
    return tree


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("router_hidden", [None, 0, 16])
def test_parameter_tree_matches_the_contract(tie, router_hidden):
    config = LlamaConfig.tiny(tie_word_embeddings=tie)
    sra = None if router_hidden is None else SRAConfig(router_hidden=router_hidden)
    params = flat_params(Llama(config, sra, rngs=nnx.Rngs(0)))
    got = {name: (var[...].shape, var.get_metadata()["out_sharding"]) for name, var in params.items()}
    assert got == expected_tree(config, router_hidden)
    assert nnx.get_partition_spec(nnx.state(Llama(config, sra, rngs=nnx.Rngs(0)), nnx.Param)) is not None


def test_static_mask_gives_a_router_only_to_the_first_sra_layer():
    config = LlamaConfig.tiny(num_hidden_layers=3)
    model = Llama(config, SRAConfig(mask="static", layers=(1, 2)), rngs=nnx.Rngs(0))
    assert [layer.attn.router is not None for layer in model.layers] == [False, True, False]
    assert [layer.attn.sra is not None for layer in model.layers] == [False, True, True]


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions, theta):
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    angles = positions[..., None] * inv_freq
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
    rotated = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def plain_causal_llama(model: Llama, tokens: np.ndarray) -> np.ndarray:
    """An independent float64 numpy Llama (HF semantics, causal softmax attention) reading the model's weights."""
    cfg = model.config
    p = {k: np.asarray(v[...], np.float64) for k, v in flat_params(model).items()}
    b, s = tokens.shape
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    positions = np.broadcast_to(np.arange(s), (b, s))
    causal = np.tril(np.ones((s, s), bool))
    x = p["embed.embedding"][tokens]
    for i in range(cfg.num_hidden_layers):
        w = lambda name: p[f"layers.{i}.{name}"]  # noqa: E731, B023 - called in this iteration
        h = _rms(x, w("input_norm.scale"), cfg.rms_norm_eps)
        q = _rope((h @ w("attn.q_proj.kernel")).reshape(b, s, hq, hd), positions, cfg.rope_theta)
        k = _rope((h @ w("attn.k_proj.kernel")).reshape(b, s, hkv, hd), positions, cfg.rope_theta)
        v = (h @ w("attn.v_proj.kernel")).reshape(b, s, hkv, hd)
        k, v = np.repeat(k, hq // hkv, axis=2), np.repeat(v, hq // hkv, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        scores = np.where(causal, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, hq * hd)
        x = x + out @ w("attn.o_proj.kernel")
        h = _rms(x, w("post_attention_norm.scale"), cfg.rms_norm_eps)
        gate = h @ w("mlp.gate_proj.kernel")
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w("mlp.up_proj.kernel"))) @ w("mlp.down_proj.kernel")
    h = _rms(x, p["norm.scale"], cfg.rms_norm_eps)
    head = p["embed.embedding"].T if cfg.tie_word_embeddings else p["lm_head.kernel"]
    return h @ head


@pytest.mark.parametrize("tie", [False, True])
def test_sra_off_equals_a_plain_causal_attention_model(tie):
    model = make_model(config=LlamaConfig.tiny(tie_word_embeddings=tie))
    tokens = random_tokens(2, 12)
    logits, aux = forward(model, tokens)
    assert logits.dtype == jnp.float32
    # float32 model vs float64 numpy: a few ulps per op over 2 layers.
    np.testing.assert_allclose(logits, plain_causal_llama(model, np.asarray(tokens)), atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(aux.mask_density, 1.0)
    assert not aux.critical.any()


def _copy_shared_params(source: Llama, target: Llama) -> None:
    """Give `target` every parameter of `source` (the router, absent from a dense source, keeps its init)."""
    nnx.update(target, nnx.state(source, nnx.Param))


@pytest.mark.parametrize(
    ("selection", "queries"), [("topk", "critical"), ("gumbel_topk", "all"), ("sparsemax", "critical")]
)
def test_sra_with_every_token_critical_and_a_full_window_equals_dense(selection, queries):
    seq = 10
    dense = make_model()
    sra = SRAConfig(critical_fraction=1.0, window=seq, num_global=0, selection=selection, queries=queries)
    sparse = make_model(sra)
    _copy_shared_params(dense, sparse)
    tokens = random_tokens(2, seq)
    key = jax.random.key(1) if selection == "gumbel_topk" else None
    want, _ = forward(dense, tokens)
    got, aux = forward(sparse, tokens, key=key)
    # The straight-through gate multiplies values by exactly 1.0, so the outputs agree to rounding.
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(aux.mask_density, 1.0)


def test_sra_with_a_small_window_differs_from_dense_and_reports_its_sparsity(sra):
    dense = make_model()
    sparse = make_model(sra)
    _copy_shared_params(dense, sparse)
    tokens = random_tokens(2, 16)
    logits, aux = forward(sparse, tokens)
    assert not np.allclose(logits, forward(dense, tokens)[0], atol=1e-3)
    assert aux.router_logits.shape == aux.critical.shape == (2, 2, 16)
    k = sra.num_critical(16)
    np.testing.assert_array_equal(aux.critical.sum(-1), k)
    np.testing.assert_allclose(aux.selected_fraction, k / 16)
    assert np.all((aux.mask_density > 0) & (aux.mask_density < 1))
    assert np.all(np.isfinite(aux.selection_log_prob)) and np.all(aux.selection_log_prob < 0)
    dense_flops, sra_flops = attention_flops(sparse.config, aux)
    np.testing.assert_allclose(sra_flops / dense_flops, aux.mask_density.mean(0), rtol=1e-6)
    # Router: Linear(64, 16) + bias + silu, Linear(16, 1); per layer, 2 layers.
    assert router_flops(sparse, 16) == 16 * 2 * (2 * 64 * 16 + 4 * 16)


def test_sra_off_for_a_layer_leaves_that_layer_dense():
    sparse = make_model(SRAConfig(critical_fraction=0.25, window=2, selection="topk", layers=(1,)))
    _, aux = forward(sparse, random_tokens(1, 12))
    assert aux.sra_layers == (1,)
    np.testing.assert_array_equal(aux.mask_density[0], 1.0)
    assert not aux.critical[0].any() and aux.critical[1].any()
    assert sparse.layers[0].attn.router is None


def test_static_mask_reuses_the_first_sra_layers_critical_set():
    model = make_model(SRAConfig(critical_fraction=0.25, window=2, mask="static", selection="gumbel_topk"))
    _, aux = forward(model, random_tokens(2, 12), key=jax.random.key(3))
    np.testing.assert_array_equal(aux.critical[0], aux.critical[1])
    np.testing.assert_array_equal(aux.selection_log_prob[1], 0.0)


def test_forced_critical_sets_are_used_as_given(sra):
    model = make_model(sra)
    critical = jnp.zeros((2, 2, 12), bool).at[:, :, jnp.array([2, 7])].set(True)
    _, aux = forward(model, random_tokens(2, 12), critical=critical)
    np.testing.assert_array_equal(aux.critical, critical)


def test_left_padding_does_not_change_the_logits_of_real_tokens():
    model = make_model()
    tokens = random_tokens(1, 8)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], axis=1)
    positions = jnp.concatenate([jnp.full((1, 3), -1), jnp.arange(8)[None]], axis=1)
    want, _ = forward(model, tokens)
    got, _ = forward(model, padded, positions)
    np.testing.assert_allclose(got[:, 3:], want, atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(got))


def test_packed_segments_attend_only_within_their_segment():
    model = make_model()
    a, b = random_tokens(1, 5, seed=1), random_tokens(1, 7, seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None]
    segments = jnp.concatenate([jnp.zeros(5, jnp.int32), jnp.ones(7, jnp.int32)])[None]
    got, _ = forward(model, packed, positions, segment_ids=segments)
    np.testing.assert_allclose(got[:, :5], forward(model, a)[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[:, 5:], forward(model, b)[0], atol=1e-5, rtol=1e-5)


def _next_token_loss(model: Llama, tokens, key):
    """Cross-entropy only: the router's one path to it is the straight-through value gate (no log-prob term)."""
    logits, _ = model(tokens, key=key)
    targets = jnp.roll(tokens, -1, axis=1)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1).mean()


@pytest.mark.parametrize("selection", ["gumbel_topk", "sparsemax"])
def test_gradients_are_finite_for_every_parameter_and_reach_the_router_through_the_gate(selection):
    sra = SRAConfig(critical_fraction=0.25, window=2, num_global=1, selection=selection, hard=True, router_hidden=8)
    model = make_model(sra)
    grads = nnx.jit(nnx.grad(_next_token_loss))(model, random_tokens(2, 12), jax.random.key(0))
    flat = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    assert set(flat) == set(flat_params(model))
    for name, g in flat.items():
        assert np.all(np.isfinite(g)), name
    router = {name: np.abs(g).sum() for name, g in flat.items() if ".router." in name}
    assert len(router) == 2 * 3 and all(g > 0 for g in router.values()), router


def test_selection_log_prob_is_differentiable_in_the_router(sra):
    model = make_model(SRAConfig(**{**sra.__dict__, "selection": "gumbel_topk"}))

    def log_prob(model, tokens, key):
        return model(tokens, key=key)[1].selection_log_prob.sum()

    grads = nnx.jit(nnx.grad(log_prob))(model, random_tokens(2, 12), jax.random.key(0))
    router = [np.asarray(v[...]) for p, v in nnx.to_flat_state(grads) if "router" in p]
    assert all(np.all(np.isfinite(g)) and np.abs(g).sum() > 0 for g in router)


def test_bfloat16_compute_with_float32_params_is_close_to_float32():
    sra = SRAConfig(critical_fraction=1.0, window=16, selection="topk")
    f32 = make_model(sra)
    bf16 = make_model(sra, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    tokens = random_tokens(2, 16)
    want, _ = forward(f32, tokens)
    got, _ = forward(bf16, tokens)
    assert got.dtype == jnp.float32
    assert bf16.embed.embedding[...].dtype == jnp.float32
    # bfloat16 keeps 8 significant bits (a rounding step of 2^-8 = 0.4% relative); about a dozen roundings along
    # the residual stream compound to a few steps. Measured: max error 1.1-1.7%, mean 0.2% of the largest logit.
    error, scale = np.abs(np.asarray(got) - np.asarray(want)), np.abs(np.asarray(want)).max()
    assert error.max() < 0.03 * scale and error.mean() < 0.005 * scale
    assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) > 0.9


def test_llama3_rope_scaling_runs_and_changes_far_positions():
    config = LlamaConfig.tiny(rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16))
    scaled, plain = make_model(config=config), make_model()
    tokens = random_tokens(1, 4)
    positions = jnp.arange(100, 104)[None]
    assert not np.allclose(forward(scaled, tokens, positions)[0], forward(plain, tokens, positions)[0], atol=1e-4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m(jnp.zeros((2, 3, 4), jnp.int32)), "rank 2"),
        (lambda m: m(jnp.zeros((2, 4), jnp.float32)), "integer"),
        (lambda m: m(jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 5), jnp.int32)), "positions shape"),
        (lambda m: m(jnp.zeros((2, 4), jnp.int32), segment_ids=jnp.zeros((1, 4), jnp.int32)), "segment_ids shape"),
        (lambda m: m(jnp.zeros((2, 4), jnp.int32), critical=jnp.zeros((2, 4), bool)), "critical shape"),
        (lambda m: m(jnp.zeros((2, 4), jnp.int32), cache=KVCache.init(m.config, 3, 8)), "cache batch"),
        (lambda m: m(jnp.zeros((2, 9), jnp.int32), cache=KVCache.init(m.config, 2, 8)), "longer than the cache"),
        (
            lambda m: m(jnp.zeros((2, 2), jnp.int32), cache=KVCache.init(m.config, 2, 8).replace(index=jnp.int32(7))),
            "exceed max_len",
        ),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call(make_model())


def test_unknown_attention_impl_is_rejected():
    with pytest.raises(ValueError, match="attention_impl"):
        make_model(attention_impl="flash")


@pytest.mark.parametrize("sra", [None, SRAConfig(critical_fraction=0.25, window=3, num_global=1, selection="topk")])
def test_gather_attention_impl_matches_the_reference(sra):
    tokens = random_tokens(2, 12)
    want, want_aux = forward(make_model(sra), tokens)
    got, got_aux = forward(make_model(sra, attention_impl="gather"), tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got_aux.critical, want_aux.critical)


def test_bernoulli_empty_selection_keeps_every_row_finite():
    """A router that scores every token 0 selects nothing without a key (logit > 0 is the cut): attention falls back
    to window + global keys, and the logits, log-prob and gradients stay finite."""
    sra = SRAConfig(critical_fraction=0.5, window=2, num_global=0, selection="bernoulli", router_hidden=0)
    model = make_model(sra)
    for layer in model.layers:
        layer.attn.router.score.kernel[...] = jnp.zeros_like(layer.attn.router.score.kernel[...])
    logits, aux = forward(model, random_tokens(2, 12))
    assert not np.asarray(aux.critical).any() and np.all(np.asarray(aux.selected_fraction) == 0)
    assert np.all(np.isfinite(logits))
    np.testing.assert_allclose(aux.selection_log_prob, 12 * np.log(0.5), rtol=1e-6)  # p = 1/2 per token
    grads = nnx.jit(nnx.grad(_next_token_loss))(model, random_tokens(2, 12), jax.random.key(0))
    assert all(np.all(np.isfinite(np.asarray(v[...]))) for _, v in nnx.to_flat_state(grads))


def test_bernoulli_selected_fraction_varies_and_the_gate_reaches_the_router():
    sra = SRAConfig(critical_fraction=0.5, window=2, num_global=1, selection="bernoulli", router_hidden=8)
    model = make_model(sra)
    tokens = random_tokens(2, 16)
    fractions = {float(forward(model, tokens, key=jax.random.key(s))[1].selected_fraction[0, 0]) for s in range(6)}
    assert len(fractions) > 1 and max(fractions) <= 0.5  # the router picks how many, under the cap
    grads = nnx.jit(nnx.grad(_next_token_loss))(model, tokens, jax.random.key(0))
    router = [np.abs(np.asarray(v[...])).sum() for p, v in nnx.to_flat_state(grads) if "router" in p]
    assert len(router) == 2 * 3 and all(g > 0 for g in router)


def test_model_tau_is_a_traced_argument_that_reaches_the_router_gradient():
    """model(..., tau=t): one compiled function for every t, and the straight-through gate's backward (the soft
    relaxation at temperature t) changes with t."""
    model = make_model(SRAConfig(critical_fraction=0.25, window=2, num_global=1, selection="gumbel_topk",
                                 router_hidden=8))
    tokens, traces = random_tokens(2, 12), []

    @nnx.jit
    def router_grad(model, tau):
        traces.append(tau)

        def loss(model):
            logits, _ = model(tokens, key=jax.random.key(0), tau=tau)
            return -jax.nn.log_softmax(logits).mean()

        grads = nnx.grad(loss)(model)
        return jnp.concatenate([jnp.ravel(v[...]) for p, v in nnx.to_flat_state(grads) if "router" in p])

    cold, hot = router_grad(model, jnp.float32(0.2)), router_grad(model, jnp.float32(5.0))
    assert len(traces) == 1
    assert np.all(np.isfinite(cold)) and not np.allclose(cold, hot, rtol=1e-3)
