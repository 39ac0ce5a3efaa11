import pytest

from sra_jax.config import LlamaConfig, RopeScaling, SRAConfig

LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}


def test_llama_3_1_config_round_trips_through_hf_dict():
    cfg = LlamaConfig.from_hf(LLAMA_3_1_8B)
    assert cfg.head_dim == 128 and cfg.num_groups == 4
    assert cfg.rope_scaling == RopeScaling(factor=8.0, original_max_position_embeddings=8192)
    again = LlamaConfig.from_hf(cfg.to_hf())
    assert again == cfg


def test_explicit_head_dim_is_kept():
    assert LlamaConfig.tiny(head_dim=32).head_dim == 32


@pytest.mark.parametrize(
    "change, words",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"model_type": "mistral"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"hidden_size": -1}, "hidden_size"),
    ],
)
def test_unrepresentable_hf_config_names_the_key(change, words):
    with pytest.raises(ValueError, match=words):
        LlamaConfig.from_hf({**LLAMA_3_1_8B, **change})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"critical_fraction": 0.0}, "critical_fraction"),
        ({"critical_fraction": 1.5}, "critical_fraction"),
        ({"window": 0}, "window"),
        ({"window": -3}, "window"),
        ({"num_global": -1}, "num_global"),
        ({"tau": 0.0}, "tau"),
        ({"selection": "argmax"}, "selection"),
        ({"mask": "fixed"}, "mask"),
        ({"queries": "some"}, "queries"),
        ({"layers": (0, -1)}, "layers"),
    ],
)
def test_sra_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SRAConfig(**kwargs)


@pytest.mark.parametrize("fraction, n, k", [(0.1, 100, 10), (0.1, 5, 1), (1.0, 7, 7), (0.05, 1000, 50), (0.3, 10, 3)])
def test_num_critical_is_ceil_of_fraction_clamped(fraction, n, k):
    assert SRAConfig(critical_fraction=fraction).num_critical(n) == k


def test_sra_layers_selects_layers():
    cfg = SRAConfig(layers=[1, 3])
    assert cfg.layers == (1, 3) and cfg.applies_to(3) and not cfg.applies_to(0)
    assert SRAConfig().applies_to(17)
