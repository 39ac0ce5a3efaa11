"""`experiments/sequence_parallel_step.py --tiny` on CPU: the same code as the one-GPU run (S shards simulated under
vmap, one shard, per-shard jnp and per-shard kernels in interpret mode, unsharded SRA attention; a 2-layer model's loss and gradients through the model-level wiring with
simulated shards against the unsharded model), and the sharded results agree with the unsharded ones."""

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
        "sequence_parallel_4_shards_jnp", "sequence_parallel_1_shard_jnp", "sequence_parallel_4_shards_pallas",
        "sequence_parallel_1_shard_pallas", "unsharded_reference", "model_step_unsharded",
        "model_step_sequence_parallel_4_shards_jnp", "model_step_sequence_parallel_4_shards_pallas"]
    for row in record["rows"][:5]:
        assert row["ms_fwd"] > 0 and row["ms_fwdbwd"] > 0
        # float32, same keys summed in another order (blocks, halo, gathered set): ~1e-6 measured
        assert row["max_abs_diff_vs_unsharded"] < 1e-4
    assert record["rows"][-3]["ms_fwdbwd"] > 0
    for model in record["rows"][-2:]:  # per-shard jnp, then the per-shard kernels (interpret mode)
        assert model["ms_fwdbwd"] > 0
        # the whole model through the sequence-parallel wiring: float32 sums in another order (~1e-6 measured)
        assert model["loss_abs_diff_vs_unsharded"] < 1e-5
        assert model["grad_max_abs"] > 0.1 and model["grad_max_abs_diff_vs_unsharded"] < 1e-4
