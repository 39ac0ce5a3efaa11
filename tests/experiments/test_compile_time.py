"""`experiments/compile_time.py` on CPU at a tiny size: every stage on this device, and the cross-lowering for CUDA
(trace + lower only) that counts the SRA model's Triton kernels and the dense model's cuDNN calls without a GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def module():
    spec = importlib.util.spec_from_file_location("compile_time", ROOT / "experiments" / "compile_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(module, tmp_path, *extra) -> dict:
    out = tmp_path / "ct.json"
    args = ["--preset", "tiny", "--layers", "2", "--layers-small", "1", "--phases", "prefill", "--lengths", "16",
            "--in-process", "--out", str(out), *extra]
    assert module.main(args) == 0
    assert out.with_suffix(".md").is_file()
    return json.loads(out.read_text())


def test_every_stage_on_this_device(module, tmp_path):
    record = _run(module, tmp_path)
    assert record["platform"] == record["lowered_for"] == "cpu" and record["versions"]["jax"]
    assert [(r["model"], r["phase"]) for r in record["rows"]] == [("dense", "prefill"), ("sra", "prefill")]
    for row in record["rows"]:
        assert "error" not in row, row
        for stage in ("trace_s", "lower_s", "compile_s", "execute_s"):
            assert row[stage] > 0
        assert row["first_call_s"] == pytest.approx(row["trace_s"] + row["lower_s"] + row["compile_s"]
                                                    + row["execute_s"])
        assert row["layers"] == 2 and row["layers_small"] == 1 and "trace_s_per_layer" in row
        assert row["inlined_ops"] >= row["ops_in_text"] > 0 and row["largest_tensor_gib"] > 0


def test_lowering_for_cuda_without_a_gpu_counts_the_kernels(module, tmp_path):
    record = _run(module, tmp_path, "--lower-for", "cuda")
    dense, sra = record["rows"]
    assert record["lowered_for"] == "cuda" and "compile_s" not in sra
    assert dense["kernel_targets"] and all(t.startswith("__cudnn$") for t in dense["kernel_targets"])
    assert set(sra["kernel_targets"]) == {"__gpu$xla.gpu.triton"}
    # the layers share one attention program: its kernels appear once in the text and run once per layer
    assert sra["kernel_calls_executed"] == 2 * sra["kernel_calls_in_text"] > 0
    assert sra["distinct_kernels"] <= sra["kernel_calls_in_text"]


def test_module_stats_inline_calls():
    text = """
func.func public @main(%arg0: tensor<4x8xf32>) -> tensor<4x8xf32> {
  %0 = call @f(%arg0) : (tensor<4x8xf32>) -> tensor<4x8xf32>
  %1 = call @f(%0) : (tensor<4x8xf32>) -> tensor<4x8xf32>
  return %1 : tensor<4x8xf32>
}
func.func private @f(%arg0: tensor<4x8xf32>) -> tensor<4x8xf32> {
  %0 = stablehlo.add %arg0, %arg0 : tensor<4x8xf32>
  %1:2 = stablehlo.custom_call @__gpu$xla.gpu.triton(%0, %arg0) {ir = "abc"} : (tensor<4x8xf32>) -> tensor<16x8xbf16>
  return %0 : tensor<4x8xf32>
}
"""
    spec = importlib.util.spec_from_file_location("compile_time", ROOT / "experiments" / "compile_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stats = module.module_stats(text)
    assert stats["functions"] == 2 and stats["kernel_calls_in_text"] == 1 and stats["kernel_calls_executed"] == 2
    assert stats["distinct_kernels"] == 1 and stats["inlined_custom_call"] == 2 and stats["inlined_ops"] == 4  # f's 2 ops, twice
    assert stats["largest_tensor"] == "tensor<16x8xbf16>" and stats["largest_tensor_gib"] == 256 / 2**30


@pytest.mark.parametrize("model", ["dense", "sra"])
def test_the_prefill_constant_folds_no_statistic_or_layout(module, model):
    """The benchmark's prefill takes its positions from its shape, so they are compile-time constants. What XLA
    constant-folds from them (the statistics' sort and searches, the compact path's bands, valid-token counts) would
    cost compile seconds per layer at 32k and stay in the program as constants; the only large ones left are the
    cache's positions, which the program returns, and the selection's count table (one per program)."""
    s, decode_steps = 256, 2
    job = dict(preset="tiny", layers=2, batch=1, decode_steps=decode_steps, dtype="float32", lower_for="cpu",
               platform="cpu", sra_impl="pallas", dense_impl="xla", no_execute=True, model=model, phase="prefill",
               context=s)
    row = module.worker(job)
    assert row["compile_s"] > 0 and "execute_s" not in row
    allowed = {f"s32[1,{s + 2 * decode_steps}]": 1, **({f"s32[{s + 1}]": 1} if model == "sra" else {})}
    assert all(allowed.get(t, 0) >= n for t, n in row["compiled_large_constant_types"].items()), row
    assert row["compiled_sort"] >= 1  # the statistics' sort runs with the program
