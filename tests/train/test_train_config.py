"""TrainConfig: YAML + dotted overrides, validation errors that name the key, round trip through YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from sra_jax import configs
from sra_jax.train.config import MeshConfig, TrainConfig

CONFIGS = Path(configs.__file__).resolve().parent


def test_overrides_change_one_key_and_keep_the_section_defaults():
    config = TrainConfig.load(None, ["model.hidden_size=32", "sra={}", "sra.window=8", "optim.learning_rate=3e-3"])
    assert config.model.hidden_size == 32 and config.model.head_dim == 8  # head_dim re-derived, vocab kept
    assert config.model.vocab_size == TrainConfig().model.vocab_size
    assert config.sra.window == 8 and config.optim.learning_rate == 3e-3


def test_yaml_round_trip(tmp_path):
    config = TrainConfig.load(None, ["sra={critical_fraction: 0.2}", "loss.kind=sl+rl", "mesh.fsdp=2"])
    path = tmp_path / "run.yaml"
    path.write_text(config.to_yaml())
    assert TrainConfig.load(path) == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.hiden_size=3", r"model\.hiden_size"),
        ("optim.learning_rate=-1", r"optim\.learning_rate"),
        ("optim.learning_rate=fast", r"optim\.learning_rate"),
        ("steps=2.5", r"steps"),
        ("mesh.data=0", r"mesh\.data"),
        ("loss.kind=rl", r"loss\.kind"),
        ("grad_accum=3", r"grad_accum"),
        ("sra={selection: magic}", r"selection"),
        ("checkpoint.keep=0", r"checkpoint\.keep"),
        ("novalue", r"dotted\.key=value"),
    ],
)
def test_bad_values_raise_errors_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.load(None, [override])


def test_mesh_resolves_minus_one_to_the_remaining_devices():
    assert MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == (2, 2, 2, 1)
    assert MeshConfig(data=2, sequence=-1).resolve(8) == (2, 1, 1, 4)
    with pytest.raises(ValueError, match="devices"):
        MeshConfig(data=3, fsdp=1, tensor=1).resolve(8)


def test_a_sequence_axis_must_divide_the_length_and_is_refused_for_grpo():
    assert TrainConfig.load(None, ["mesh.sequence=4", "data.seq_len=64"]).mesh.sequence == 4
    with pytest.raises(ValueError, match=r"mesh\.sequence"):
        TrainConfig.load(None, ["mesh.sequence=0"])
    with pytest.raises(ValueError, match=r"data\.seq_len=66 must be divisible by mesh\.sequence=4"):
        TrainConfig.load(None, ["mesh.sequence=4", "data.seq_len=66"])
    with pytest.raises(ValueError, match=r"mesh\.sequence=2 cannot train loss\.kind='grpo'"):
        TrainConfig.load(None, ["mesh.sequence=2", "sra={critical_fraction: 0.2}", "loss.kind=grpo"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiment_configs_load(path):
    TrainConfig.load(path)


def test_packaged_configs_resolve_by_name(tmp_path, monkeypatch):
    assert configs.names() == sorted(p.stem for p in CONFIGS.glob("*.yaml")) and "synthetic_sra" in configs.names()
    by_path = TrainConfig.load(CONFIGS / "synthetic_sra.yaml")
    assert TrainConfig.load("synthetic_sra") == by_path == TrainConfig.load("synthetic_sra.yaml")
    # A file in the working directory wins over a packaged name; an unknown name lists what is packaged.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "synthetic_sra.yaml").write_text("steps: 3\n")
    assert TrainConfig.load("synthetic_sra.yaml").steps == 3
    with pytest.raises(ValueError, match="does not exist.*packaged: .*synthetic_sra"):
        TrainConfig.load("no_such_config")


def test_temperature_schedule_is_off_by_default_and_needs_a_start():
    assert TrainConfig().loss.temperature_start is None  # tau stays at sra.tau
    with pytest.raises(ValueError, match=r"temperature_start"):
        TrainConfig.load(None, ["loss.temperature_end=0.5"])
