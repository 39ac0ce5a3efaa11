"""`load_hf` / `save_hf` against transformers: same logits, same greedy tokens, bit-identical weights both ways."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_models import CONFIGS, build_hf_model, padded_batch, positions_from_mask, save_hf_model, torch_bits

from sra_jax.config import SRAConfig
from sra_jax.convert import hf_to_orbax, load_hf, load_orbax, orbax_to_hf, save_hf
from sra_jax.convert.safetensors_io import INDEX_FILE, SafetensorsReader
from sra_jax.generate import generate

NAMES = list(CONFIGS)
# float32 on both sides; what remains is summation order in matmuls and softmax: measured <= 1.8e-6 on logits of
# magnitude ~3 (torch 2.13 CPU, jax 0.10.2 CPU), so 1e-5 leaves a 5x margin (the issue asks for <= 1e-4).
LOGIT_ATOL = 1e-5


@pytest.fixture(scope="module")
def loaded(hf_checkpoints):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_hf(hf_checkpoints[name][1])
        return cache[name]

    return get


def assert_same_state_dict(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(actual)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        np.testing.assert_array_equal(torch_bits(actual[name]), torch_bits(tensor), err_msg=name)


def assert_same_files(src, dst) -> None:
    """Every tensor of two checkpoint directories has the same name, dtype, shape and bytes."""
    a, b = SafetensorsReader(src), SafetensorsReader(dst)
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a:
        x, y = a.get(name), b.get(name)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert x.tobytes() == y.tobytes(), name


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_on_a_padded_batch(name, hf_checkpoints, loaded):
    hf_model, _ = hf_checkpoints[name]
    config, model = loaded(name)
    tokens, mask = padded_batch(config.vocab_size)
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    logits, _ = model(jnp.asarray(tokens, jnp.int32), jnp.asarray(positions_from_mask(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], expected[valid], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers_generate(name, hf_checkpoints, loaded):
    hf_model, _ = hf_checkpoints[name]
    config, model = loaded(name)
    tokens, mask = padded_batch(config.vocab_size, seed=1)
    hf_model.generation_config.eos_token_id = None  # always 32 tokens
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        expected = hf_model.generate(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=32,
        )[:, tokens.shape[1] :].tolist()
    prompts = [row[m == 1].tolist() for row, m in zip(tokens, mask)]
    assert generate(model, prompts, max_new_tokens=32, temperature=0.0) == expected


@pytest.mark.parametrize("name", NAMES)
def test_save_hf_output_loads_in_transformers_bit_identically(name, hf_checkpoints, loaded, tmp_path):
    hf_model, _ = hf_checkpoints[name]
    _, model = loaded(name)
    sharded = CONFIGS[name][1] is not None
    save_hf(model, tmp_path / "out", max_shard_bytes=40_000 if sharded else 10**9)
    assert (tmp_path / "out" / INDEX_FILE).exists() == sharded
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert_same_state_dict(hf_model.state_dict(), reloaded.state_dict())
    for key in ("head_dim", "num_key_value_heads", "tie_word_embeddings", "vocab_size"):
        assert getattr(reloaded.config, key) == getattr(hf_model.config, key), key
    assert reloaded.config.rope_parameters == hf_model.config.rope_parameters


@pytest.mark.parametrize("name", NAMES)
def test_hf_to_orbax_to_hf_is_byte_identical(name, hf_checkpoints, loaded, tmp_path):
    _, src = hf_checkpoints[name]
    hf_to_orbax(src, tmp_path / "orbax")
    orbax_to_hf(tmp_path / "orbax", tmp_path / "back", max_shard_bytes=40_000)
    assert_same_files(src, tmp_path / "back")
    # The orbax checkpoint also restores into the same model as load_hf.
    _, from_hf = loaded(name)
    _, from_orbax = load_orbax(tmp_path / "orbax")
    expected = nnx.to_flat_state(nnx.state(from_hf, nnx.Param))
    actual = dict(nnx.to_flat_state(nnx.state(from_orbax, nnx.Param)))
    for path, variable in expected:
        np.testing.assert_array_equal(np.asarray(actual[path].get_value()), np.asarray(variable.get_value()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_keep_their_bits(dtype, tmp_path):
    hf_model = build_hf_model("gqa", dtype)
    src = save_hf_model(hf_model, tmp_path / "src")
    _, model = load_hf(src)
    assert model.embed.embedding.get_value().dtype == jnp.dtype(str(dtype).removeprefix("torch."))
    save_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == str(
        dtype
    ).removeprefix("torch.")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype)
    assert_same_state_dict(hf_model.state_dict(), reloaded.state_dict())
    hf_to_orbax(src, tmp_path / "orbax")
    orbax_to_hf(tmp_path / "orbax", tmp_path / "back")
    assert_same_files(src, tmp_path / "back")


def test_routers_travel_beside_the_hf_files(hf_checkpoints, tmp_path):
    _, src = hf_checkpoints["gqa"]
    sra = SRAConfig(critical_fraction=0.25, window=4, num_global=1, selection="topk", router_hidden=8)
    _, model = load_hf(src, sra=sra, router_seed=3)
    save_hf(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "sra_router.safetensors").exists()
    transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")  # the HF part stays loadable
    hf_to_orbax(tmp_path / "hf", tmp_path / "orbax")
    orbax_to_hf(tmp_path / "orbax", tmp_path / "back")
    for directory in (tmp_path / "hf", tmp_path / "back"):
        assert_same_files(src, directory)
    routers = SafetensorsReader(tmp_path / "hf" / "sra_router.safetensors")
    back = SafetensorsReader(tmp_path / "back" / "sra_router.safetensors")
    assert sorted(routers.keys()) == sorted(back.keys()) and routers.keys()
    for key in routers:
        assert routers.get(key).tobytes() == back.get(key).tobytes(), key
    _, restored = load_orbax(tmp_path / "orbax")
    assert restored.sra == sra
    expected = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, variable in nnx.to_flat_state(nnx.state(restored, nnx.Param)):
        np.testing.assert_array_equal(
            np.asarray(variable.get_value()), np.asarray(expected[path].get_value())
        )
