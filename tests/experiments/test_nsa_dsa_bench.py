"""The NSA / DSA benchmark script runs end to end at a tiny size on CPU and writes its record."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_nsa_dsa_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(REPO_ROOT / "experiments" / "nsa_dsa_bench.py"),
        "--seq",
        "128",
        "--block",
        "16",
        "--top-n",
        "3",
        "--window",
        "32",
        "--top-k",
        "16",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "16",
        "--dense-impl",
        "xla",
        "--kernel-backend",
        "reference",
        "--dsa-backend",
        "reference",
        "--copy-mib",
        "4",
        "--topk-configs",
        "16:4:2",
        "--indexer-topk",
        "sort,threshold:2",
        "--dtype",
        "float32",
        "--reps",
        "1",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"})
    rec = json.loads(out.read_text())
    ops = ["dense_causal", "nsa_selected", "nsa_window", "dsa_gather", "dsa_topk_kernel"]
    ops += ["dsa_select_attend"] * 2 + ["dsa_indexer_topk"] * 2
    assert [r["op"] for r in rec["rows"]] == ops + ["dsa_decode", "dsa_decode", "dense_decode"]
    timed = rec["rows"][:7]
    assert all(r["ms_fwd"] > 0 and r["ms_fwdbwd"] > 0 and "speedup_fwdbwd_vs_dense" in r for r in timed[1:])
    assert [r["impl"] for r in rec["rows"][7:9]] == ["sort", "threshold:2"]
    assert rec["rows"][8]["mismatch_queries_vs_sort"] == 0.0  # the same keys per query on CPU
    assert all(r["ms"] > 0 and r["hbm_floor_ms"] > 0 for r in rec["rows"][9:])
    for r in (rec["rows"][1], rec["rows"][4]):  # the NSA selected branch and DSA on the top-k kernel vs the gather
        assert r["rel_err_fwd_vs_gather"] < 1e-5 and r["rel_err_dk_vs_gather"] < 1e-5, r
