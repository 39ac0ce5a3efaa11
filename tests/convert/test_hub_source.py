"""Hub names `hf://org/name[@revision]`: resolved offline through a huggingface_hub cache laid out by the test, by
`resolve_source`, `sra-jax convert` and `sra-jax generate`; a name not in the cache is one clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sra_jax.cli import main as cli
from sra_jax.convert.source import load_source, parse_hub_name, resolve_path, resolve_source
from tests.conftest import REPO_ROOT
from tests.user_sources import add_to_hub_cache, write_tiny_llama

COMMIT, OLD_COMMIT = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache holding org/tiny (main -> COMMIT; tag v0 -> OLD_COMMIT, a differently seeded model)."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "hub"
    snapshot = add_to_hub_cache(cache, "org/tiny", write_tiny_llama(root / "model"), commit=COMMIT)
    add_to_hub_cache(cache, "org/tiny", write_tiny_llama(root / "model_v0", seed=1), commit=OLD_COMMIT, refs=("v0",))
    return cache, snapshot


@pytest.fixture
def offline_cache(hub, monkeypatch):
    """The test's cache as huggingface_hub's cache, with the network off."""
    from huggingface_hub import constants

    cache, _ = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import time: patch the loaded value too
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_hub_names_resolve_to_cached_snapshots(offline_cache):
    cache, snapshot = offline_cache
    assert resolve_path("hf://org/tiny") == snapshot
    assert resolve_path(f"hf://org/tiny@{COMMIT}") == snapshot
    assert resolve_path("hf://org/tiny@v0").name == OLD_COMMIT
    source = resolve_source("hf://org/tiny")
    assert (source.kind, source.path, source.config.vocab_size) == ("hf", snapshot, 300)
    _, _, main_model = load_source("hf://org/tiny")
    _, _, old_model = load_source("hf://org/tiny@v0")
    assert not np.array_equal(np.asarray(main_model.embed.embedding.get_value()),
                              np.asarray(old_model.embed.embedding.get_value()))


def test_a_name_missing_from_the_cache_says_where_it_looked_and_how_to_download(offline_cache):
    cache, _ = offline_cache
    with pytest.raises(FileNotFoundError) as error:
        resolve_source("hf://org/absent")
    message = str(error.value)
    assert "org/absent" in message and str(cache) in message and "hf download org/absent" in message
    with pytest.raises(FileNotFoundError, match="at revision 'v9'.*hf download org/tiny --revision v9"):
        resolve_path("hf://org/tiny@v9")


@pytest.mark.parametrize("name", ["hf://org", "hf://org/name/extra", "hf:///name", "hf://org/name@"])
def test_malformed_hub_names_are_refused(name):
    with pytest.raises(ValueError, match="must look like hf://org/name"):
        parse_hub_name(name)


def test_hf_home_chooses_the_cache_as_in_huggingface_hub(hub, tmp_path):
    """A fresh process, so huggingface_hub reads HF_HOME at import as it does for users: the cache is HF_HOME/hub."""
    cache, snapshot = hub
    home = tmp_path / "home"
    home.mkdir()
    (home / "hub").symlink_to(cache)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    script = "from sra_jax.convert.source import resolve_path; print(resolve_path('hf://org/tiny'))"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == snapshot.resolve()  # found through the HF_HOME/hub symlink


def test_cli_convert_and_generate_take_hub_names(offline_cache, tmp_path, capsys):
    _, snapshot = offline_cache
    assert cli(["-q", "convert", "hf-to-orbax", "hf://org/tiny", str(tmp_path / "orbax")]) == 0
    assert resolve_source(tmp_path / "orbax").kind == "orbax"
    capsys.readouterr()
    # The snapshot's tokenizer.json encodes the prompt and decodes the completion.
    assert cli(["-q", "generate", "--checkpoint", "hf://org/tiny", "--prompt", "What is 12 plus 30?", "--chat",
                "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert cli(["-q", "generate", "--checkpoint", "hf://org/absent", "--prompt", "x"]) == 2
    assert "hf download org/absent" in capsys.readouterr().err


def test_init_from_a_hub_name_takes_the_model_section_and_refuses_a_missing_name(offline_cache):
    from sra_jax.train.config import TrainConfig

    config = TrainConfig.load(None, ["init.from=hf://org/tiny", "sra.window=4"])
    assert (config.model.vocab_size, config.model.hidden_size) == (300, 32)
    with pytest.raises(ValueError, match=r"init.from='hf://org/absent': .*hf download org/absent"):
        TrainConfig.load(None, ["init.from=hf://org/absent"])
