"""experiments/longhop.py end to end at its tiny scale: every variant and split gets a row with every column, the
results file states the hypothesis, SRA, NSA and DSA are retrofitted onto the exported base through init.from (routers
/ extras only: the Llama tensors of their exports equal the base export's), and a second invocation resumes (trains and scores
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

from sra_jax.convert.source import load_source
from sra_jax.train import longhop_eval
from sra_jax.train.data import LonghopStream
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
                        "learned_distill_rl", "nsa", "dsa"}
    for row in record["rows"]:
        assert set(longhop_experiment.ROW_KEYS) <= set(row)
        assert 0.0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1.0
    assert {row["split"] for row in record["rows"]} == set(longhop_experiment.SPLITS)
    oracle = [row for row in record["rows"] if row["variant"] == "oracle"]
    assert all(row["router_precision"] == row["router_recall"] == 1.0 for row in oracle)
    window = [row for row in record["rows"] if row["variant"] == "window"]
    assert all(row["selected_fraction"] == 0.0 and row["attention_flops_vs_dense"] < 1.0 for row in window)
    # NSA / DSA rows: no router to score; DSA (top_k 10 of up to 40 keys) attends a share of the causal pairs, and its
    # FLOPs add the indexer's scoring of every causal pair on top
    per_query = [row for row in record["rows"] if row["variant"] in ("nsa", "dsa")]
    assert len(per_query) == 2 * len(longhop_experiment.SPLITS)
    assert all(row["router_precision"] is None and row["router_recall"] is None for row in per_query)
    for row in per_query:
        assert 0.0 < row["selected_fraction"] < 1.0 and row["attention_flops_vs_dense"] > 0.0
        if row["variant"] == "dsa":
            assert row["selected_fraction"] < row["attention_flops_vs_dense"] < 1.0
    assert record["per_query"]["dsa-a0.25"]["top_k"] == 10 and record["per_query"]["nsa-a0.25"]["top_n"] == 2
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
    for kind in ("nsa", "dsa"):  # the per-query retrofits: only their extras train, the Llama stays the base's
        stage = Stage(work / f"perquery-direct-{kind}-a0.25-seed0")
        written = yaml.safe_load(stage.config_path.read_text())
        assert written["init"] == {"from": str(base.export), "trainable": "router"}
        assert written["sra"]["attention"] == kind
        tensors = load_file(stage.export / "model.safetensors")
        assert tensors.keys() == base_tensors.keys()
        assert all(np.array_equal(base_tensors[k], tensors[k]) for k in base_tensors)
        assert (stage.export / "sra_router.safetensors").is_file()
    experiment = longhop_experiment.Experiment("tiny", work, tmp_path / "results", None, {})
    # a source that does not fit the model is refused before anything runs
    eval_data = experiment.train_config("direct", 0, sra=None, loss=longhop_experiment.LossConfig(kind="sl"),
                                        steps=1).data
    batch = LonghopStream(eval_data, 8).eval_batch(8, "test")
    with pytest.raises(ValueError, match="'per_query' scores exactly the models with NSA / DSA layers"):
        longhop_eval.score(load_source(stage.export)[2], batch, "learned", alpha=0.25)
    with pytest.raises(ValueError, match="'per_query' scores exactly"):
        longhop_eval.score(load_source(router.export)[2], batch, "per_query", alpha=0.25)
    with pytest.raises(ValueError, match="learned_kinds"):
        longhop_experiment.Experiment("tiny", work, tmp_path / "results", None, {"learned_kinds": ("rl", "joint")})
    with pytest.raises(ValueError, match="per_query_kinds"):
        longhop_experiment.Experiment("tiny", work, tmp_path / "results", None, {"per_query_kinds": ("sra",)})
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
