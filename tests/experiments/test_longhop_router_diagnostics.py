"""experiments/longhop_router_diagnostics.py at the tiny scale on a 2-step base: it writes the attention-vs-oracle
overlap (per layer and summed, both query sets, by dense correctness), the accuracy with the teacher's top-mass
keys forced as the critical sets, the dense value saliency and every training
signal's summary, each a probability where it is one."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_diagnostics_write_every_measure(tmp_path):
    experiment = _load("longhop_experiment_for_diagnostics", "longhop.py")
    base = experiment.Experiment("tiny", tmp_path / "work", tmp_path / "results", None, {}).base("direct", 0)
    diagnostics = _load("longhop_router_diagnostics", "longhop_router_diagnostics.py")
    out = tmp_path / "diagnostics.json"
    assert diagnostics.main(["--base", str(base), "--scale", "tiny", "--alphas", "0.25", "--eval-size", "8",
                             "--grad-rows", "4", "--rl-repeats", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["attention"]) == {"target", "all"}
    for per_layer in record["attention"].values():
        assert set(per_layer) == {"layer0", "sum"}
        for measures in per_layer.values():
            assert 0.0 <= measures["0.25"]["precision"] <= 1.0 and 0.0 <= measures["0.25"]["recall"] <= 1.0
    assert sum(v["rows"] for v in record["attention_target_by_dense_correct"].values()) == 8
    forced = record["teacher_top_mass_sets"]["0.25"]
    assert 0.0 <= forced["ci_low"] <= forced["accuracy"] <= forced["ci_high"] <= 1.0
    assert set(record["gradient"]) == {"st_ce", "st_teacher_kl", "distill", "reinforce/one_group",
                                       "reinforce/mean_of_2_groups", "reinforce_logp/one_group",
                                       "reinforce_logp/mean_of_2_groups"}
    for summary in [*record["gradient"].values(), record["dense_value_saliency"]]:
        auroc = summary["layer0"]["auroc"]
        assert math.isnan(auroc) or 0.0 <= auroc <= 1.0
        assert 0.0 <= summary["layer0"]["zero_fraction"] <= 1.0
