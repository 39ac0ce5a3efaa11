"""`sra-jax eval` end to end: a tiny random Llama with the Llama 3 vocabulary, converted to an orbax checkpoint,
through the CLI on a few GSM8K / MATH problems; the synthetic path still works."""

from __future__ import annotations

import json

import pytest
from flax import nnx

from sra_jax.cli import main as sra_jax_main
from sra_jax.config import DSAConfig, LlamaConfig, SRAConfig

RECORD_KEYS = {"id", "prompt", "completion", "extracted", "gold", "correct", "generated_tokens", "stopped"}


def _tiny_checkpoint(path, sra: SRAConfig | None):
    from sra_jax.convert.orbax_io import save_orbax
    from sra_jax.nn import Llama

    config = LlamaConfig.tiny(vocab_size=128256, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                              num_key_value_heads=1, max_position_embeddings=4096)
    save_orbax(Llama(config, sra, rngs=nnx.Rngs(0)), path)
    return path


@pytest.mark.parametrize(("task", "sra", "extra"), [
    ("gsm8k", None, ["--cot", "--shots", "2"]),
    ("math", SRAConfig(critical_fraction=0.1, window=16, num_global=2), ["--shots", "1"]),
    ("gsm8k", SRAConfig(attention="dsa", layers=(1,), dsa=DSAConfig(top_k=16, indexer_heads=2, indexer_dim=8,
                                                                    impl="gather")), ["--shots", "1"]),
])
def test_eval_cli_writes_a_record_per_problem_and_a_summary(task, sra, extra, tmp_path, data_dir, capsys):
    checkpoint = _tiny_checkpoint(tmp_path / "model", sra)
    argv = ["eval", "--checkpoint", str(checkpoint), "--task", task, "--limit", "8", "--max-new-tokens", "6",
            "--batch-size", "3", "--data-dir", str(data_dir), "--output", str(tmp_path / "out"), *extra]
    assert sra_jax_main(argv) == 0
    name = f"{task}-{extra[-1]}shot-{'cot' if '--cot' in extra else 'direct'}"
    records = [json.loads(line) for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "out" / f"{name}.summary.json").read_text())
    assert len(records) == 8 and all(set(r) == RECORD_KEYS for r in records)
    assert all(1 <= r["generated_tokens"] <= 6 and r["prompt"].endswith(":") for r in records)
    assert summary["n"] == 8 and summary["correct"] == sum(r["correct"] for r in records)
    assert summary["accuracy"] == summary["correct"] / 8
    low, high = summary["ci95_wilson"]
    assert 0 <= low <= summary["accuracy"] <= high <= 1
    assert summary["shots"] == int(extra[-1]) and summary["cot"] == ("--cot" in extra)
    assert summary["generated_tokens"] == sum(r["generated_tokens"] for r in records)
    assert summary["wall_time_s"] > 0 and summary["model"]["vocab_size"] == 128256
    if sra is None or sra.attention != "sra":  # no router layer (DSA layers decode through their DSACache)
        assert summary["sra_selected_fraction"] is None
    else:  # ceil(10%) of each prompt, at least one token per row: a bit above 0.1
        assert 0.1 <= summary["sra_selected_fraction_prompt"] < 0.2
        assert 0 <= summary["sra_selected_fraction_generated"] <= 1
    assert "accuracy" in capsys.readouterr().out


def test_eval_cli_names_bad_input(tmp_path, data_dir, capsys):
    checkpoint = _tiny_checkpoint(tmp_path / "model", None)
    assert sra_jax_main(["eval", "--checkpoint", str(checkpoint), "--task", "gsm8k", "--data-dir",
                         str(tmp_path / "nowhere")]) == 1
    assert "no gsm8k data folder" in capsys.readouterr().err
    assert sra_jax_main(["eval", "--checkpoint", str(tmp_path / "missing"), "--task", "gsm8k", "--limit", "1",
                         "--data-dir", str(data_dir)]) == 1
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sra_jax_main(["eval", "--checkpoint", str(checkpoint), "--task", "mmlu"])


def test_synthetic_eval_still_works(capsys):
    assert sra_jax_main(["eval", "--size", "8", "--set", "data.seq_len=80"]) == 0
    assert "'accuracy'" in capsys.readouterr().out
