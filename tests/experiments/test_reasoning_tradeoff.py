"""`experiments/reasoning_tradeoff.py --preset tiny --workers 3` end to end (the parallel path the GPU run uses: one
process per variant and seed, latency timed one worker at a time): the result files exist, follow the schema, hold
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
                    "--workers", "3", "--deadline-s", "560", "--out", str(out)], check=True, cwd=ROOT, timeout=600)
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
    assert record["parallel"]["workers"] == 3 and record["failed_runs"] == []


def test_every_run_and_summary_is_finite(record):
    assert len(record["runs"]) == 3 * len(record["seeds"])
    for run in record["runs"]:
        for key, value in run.items():
            if isinstance(value, float):
                assert math.isfinite(value), (run["variant"], key, value)
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["flops_per_query"] > 0 and run["latency_ms"] > 0
        assert run["steps_trained"] == run["steps_planned"] and not run["stopped_by_budget"]
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


def _load_module():
    import importlib.util

    if "reasoning_tradeoff" in sys.modules:
        return sys.modules["reasoning_tradeoff"]
    spec = importlib.util.spec_from_file_location("reasoning_tradeoff", ROOT / "experiments" / "reasoning_tradeoff.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_presets_build_valid_train_configs():
    """Every preset and variant gives a TrainConfig the trainer accepts (the GPU preset is never trained here)."""
    module = _load_module()
    for name in module.PRESETS:
        for variant in module.VARIANTS:
            config = module.train_config(module.get_preset(name), variant, seed=0)
            assert (config.sra is not None) == (variant == "sra")
            assert config.data.form == ("cot" if variant == "cot" else "direct")
    gpu = module.train_config(module.get_preset("gpu", "gumbel_topk"), "sra", seed=0)
    assert gpu.sra.selection == "gumbel_topk" and gpu.compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match="variant"):
        module.train_config(module.get_preset("tiny"), "sparse", seed=0)


def _summary(std, cot, sra, *, cis=None, selected=0.2, sra_flops=1.05):
    cis = cis or {}
    rows = {}
    for name, acc in (("standard", std), ("cot", cot), ("sra", sra)):
        rows[name] = {"accuracy_mean": acc, "accuracy_ci95": cis.get(name, [acc - 0.01, acc + 0.01]),
                      "flops_vs_standard": {"standard": 1.0, "cot": 4.0, "sra": sra_flops}[name],
                      "selected_fraction": selected if name == "sra" else 1.0}
    return rows


def test_verdict_says_what_the_numbers_show():
    module = _load_module()
    reproduced = module.verdict(_summary(0.5, 0.7, 0.69), chance=0.05)
    assert reproduced.startswith("Reproduced in shape") and "95%" in reproduced  # keeps 95% of the gain
    assert module.verdict(_summary(0.5, 0.7, 0.5), chance=0.05).startswith("Not reproduced: SRA keeps 0%")
    assert "no CoT gain" in module.verdict(_summary(0.5, 0.4, 0.5), chance=0.05)
    noisy = module.verdict(_summary(0.19, 0.23, 0.19, cis={"cot": [0.03, 0.43], "standard": [0.15, 0.22]}), 0.05)
    assert "within the seed-to-seed spread" in noisy
    assert "within the seed-to-seed spread" not in module.verdict(_summary(0.19, 0.40, 0.19), chance=0.05)
    assert "no critical tokens" in module.verdict(_summary(0.19, 0.40, 0.19, selected=0.0), chance=0.05)
    at_chance = _summary(0.05, 0.06, 0.05, cis={v: [0.0, 0.1] for v in ("standard", "cot", "sra")})
    assert module.verdict(at_chance, chance=0.1).startswith("Not reproduced, and not testable")
