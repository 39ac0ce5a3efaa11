"""`experiments/reasoning_tradeoff.py --preset tiny` end to end: the result files exist, follow the schema, hold
finite numbers, and the cost accounting is consistent (SRA never attends more than dense, only SRA pays a router)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"accuracy_mean", "accuracy_ci95", "flops_per_query", "flops_vs_standard", "latency_ms",
                "generated_tokens", "prompt_tokens", "selected_fraction", "tokens_selected",
                "attention_flops_ratio_vs_dense", "router_flops_per_query"}


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("results")
    subprocess.run([sys.executable, str(ROOT / "experiments" / "reasoning_tradeoff.py"), "--preset", "tiny",
                    "--out", str(out)], check=True, cwd=ROOT, timeout=600)
    (json_path,) = out.glob("reasoning_tradeoff-tiny-*.json")
    assert json_path.with_suffix(".md").is_file()
    return json.loads(json_path.read_text())


def test_record_names_device_date_versions_seeds_and_config(record):
    assert record["experiment"] == "reasoning_tradeoff" and record["preset"] == "tiny"
    assert record["device"] and record["date"] and {"jax", "flax", "python"} <= set(record["versions"])
    assert len(record["seeds"]) >= 2
    assert set(record["config"]["train_configs"]) == {"standard", "cot", "sra"}
    assert record["config"]["train_configs"]["sra"]["loss"]["kind"] == "sl+rl"
    assert isinstance(record["verdict"], str) and record["verdict"]


def test_every_run_and_summary_is_finite(record):
    assert len(record["runs"]) == 3 * len(record["seeds"])
    for run in record["runs"]:
        for key, value in run.items():
            if isinstance(value, float):
                assert math.isfinite(value), (run["variant"], key, value)
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["flops_per_query"] > 0 and run["latency_ms"] > 0
    for variant, summary in record["summary"].items():
        assert SUMMARY_KEYS <= set(summary), variant
        low, high = summary["accuracy_ci95"]
        assert low <= summary["accuracy_mean"] <= high


def test_cost_accounting_is_sane(record):
    summary = record["summary"]
    assert summary["standard"]["flops_vs_standard"] == pytest.approx(1.0)
    # Dense variants attend to every causal pair and run no router; SRA attends to at most that and pays a router.
    for dense in ("standard", "cot"):
        assert summary[dense]["attention_flops_ratio_vs_dense"] == pytest.approx(1.0)
        assert summary[dense]["router_flops_per_query"] == 0
    assert summary["sra"]["attention_flops_ratio_vs_dense"] <= 1.0
    assert summary["sra"]["router_flops_per_query"] > 0
    assert 0 < summary["sra"]["selected_fraction"] < 1
    # Same held-out prompts for every variant.
    assert summary["standard"]["prompt_tokens"] == summary["cot"]["prompt_tokens"] == summary["sra"]["prompt_tokens"]
