"""`experiments/sequence_parallel_step.py --tiny` on CPU: the same code as the one-GPU run (S shards simulated under
vmap, one shard, unsharded SRA attention), and the sharded outputs agree with the unsharded one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_step_times_every_variant_and_they_agree(tmp_path):
    spec = importlib.util.spec_from_file_location("sequence_parallel_step", ROOT / "experiments" /
                                                  "sequence_parallel_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "step.json"
    assert module.main(["--tiny", "--reps", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [row["variant"] for row in record["rows"]] == [
        "sequence_parallel_4_shards", "sequence_parallel_1_shard", "unsharded_reference"]
    for row in record["rows"]:
        assert row["ms_fwd"] > 0 and row["ms_fwdbwd"] > 0
        # float32, same keys summed in another order (blocks, halo, gathered set): ~1e-6 measured
        assert row["max_abs_diff_vs_unsharded"] < 1e-4
