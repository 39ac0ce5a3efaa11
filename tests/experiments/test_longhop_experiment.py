"""experiments/longhop.py end to end at its tiny scale: every variant and split gets a row with every column, the
results file states the hypothesis, SRA is retrofitted onto the exported base through init.from (routers only: the
Llama tensors of the router export equal the base export's), and a second invocation resumes (trains and scores
nothing twice, also on a machine that kept only the record: rows.jsonl + meta.json); a damaged export no longer
verifies."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from sra_jax.train.stages import Stage

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "longhop.py"
spec = importlib.util.spec_from_file_location("longhop_experiment", SCRIPT)
longhop_experiment = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = longhop_experiment  # dataclasses look their module up there
spec.loader.exec_module(longhop_experiment)


def test_tiny_run_writes_every_row_and_resumes(tmp_path, capsys):
    args = ["--scale", "tiny", "--workdir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results"),
            "--record-dir", str(tmp_path / "record")]
    assert longhop_experiment.main([*args, "--time-budget", "0"]) == 3  # out of time before any stage: resumable
    assert longhop_experiment.main(args) == 0
    (json_path,) = (tmp_path / "results").glob("longhop-*.json")
    record = json.loads(json_path.read_text())
    assert record["hypothesis"] == longhop_experiment.HYPOTHESIS
    assert "Hypothesis (stated before running)" in json_path.with_suffix(".md").read_text()
    variants = {row["variant"] for row in record["rows"]}
    assert variants == {"dense", "window", "oracle", "random", "learned_rl", "learned_rl_kl", "learned_distill",
                        "learned_distill_rl"}
    for row in record["rows"]:
        assert set(longhop_experiment.ROW_KEYS) <= set(row)
        assert 0.0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1.0
    assert {row["split"] for row in record["rows"]} == set(longhop_experiment.SPLITS)
    oracle = [row for row in record["rows"] if row["variant"] == "oracle"]
    assert all(row["router_precision"] == row["router_recall"] == 1.0 for row in oracle)
    window = [row for row in record["rows"] if row["variant"] == "window"]
    assert all(row["selected_fraction"] == 0.0 and row["attention_flops_vs_dense"] < 1.0 for row in window)
    capsys.readouterr()
    assert longhop_experiment.main(args) == 0
    assert "training" not in capsys.readouterr().out
    assert len(json.loads(json_path.read_text())["rows"]) == len(record["rows"])

    work = tmp_path / "work"
    base, router = Stage(work / "base-direct-seed0"), Stage(work / "router-direct-rl-a0.25-seed0")
    written = yaml.safe_load(router.config_path.read_text())
    assert written["init"] == {"from": str(base.export), "trainable": "router"} and "model" not in written
    base_tensors, router_tensors = (load_file(s.export / "model.safetensors") for s in (base, router))
    assert base_tensors.keys() == router_tensors.keys()
    assert all(np.array_equal(base_tensors[k], router_tensors[k]) for k in base_tensors)
    assert (router.export / "sra_router.safetensors").is_file() and not (base.export / "sra_router.safetensors").exists()
    experiment = longhop_experiment.Experiment("tiny", work, tmp_path / "results", None, {})
    with pytest.raises(ValueError, match="learned_kinds"):
        longhop_experiment.Experiment("tiny", work, tmp_path / "results", None, {"learned_kinds": ("rl", "joint")})
    config = experiment.train_config("direct", 0, sra=None, loss=longhop_experiment.LossConfig(kind="sl"),
                                     steps=longhop_experiment.SCALES["tiny"].base_steps)
    assert base.verified(config) and not base.verified(dataclasses.replace(config, steps=config.steps + 1))
    damaged = base.export / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last tensor
    damaged.write_bytes(bytes(data))
    assert not base.verified(config)
    capsys.readouterr()
    elsewhere = [*args[:3], str(tmp_path / "fresh-work"), *args[4:]]  # the stages are gone, the record is kept
    assert longhop_experiment.main(elsewhere) == 0
    assert "training" not in capsys.readouterr().out
    assert len(json.loads(json_path.read_text())["rows"]) == len(record["rows"])
