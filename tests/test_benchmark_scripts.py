"""The SRA decode benchmark runs end to end on CPU (tiny model) and writes its JSON, so a GPU run never dies of a typo.
Timings on CPU mean nothing; the check is that the decode-kernel path and the general path give the same logits."""

import json

from sra_jax.benchmarks import sra_decode_bench


def test_sra_decode_bench_paths_agree(tmp_path):
    out = tmp_path / "sra-decode.json"
    assert sra_decode_bench.main(["--tiny", "--lengths", "128", "--steps", "2", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    # The decode kernel path and the general path give the same logits (f32 tiny model).
    assert row["max_abs_logit_diff"] < 1e-4 * max(1.0, row["max_abs_logit"])


def test_op_bench_runs_at_tiny_size(tmp_path):
    """sra_jax/benchmarks/op_bench.py (the public op with default arguments vs dense, and prefill into cache slots)
    writes every row of the DESIGN.md record on CPU at a tiny size."""
    from sra_jax.benchmarks import op_bench

    out = tmp_path / "op.json"
    assert op_bench.main(["--smoke", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"device", "date", "versions", "rows"} <= set(record)
    impls = [(row["op"], row["impl"], row.get("queries")) for row in record["rows"]]
    for queries in ("critical", "all"):
        assert ("sra_attention", "public_op_default", queries) in impls
        assert ("sra_attention", "public_op_max_critical", queries) in impls
    assert sum(op == "sra_attention_cache" for op, _, _ in impls) == 4  # 2 cases x (dense, SRA)
    assert all(row["ms_fwd"] > 0 and row["ms_fwdbwd"] > 0 for row in record["rows"])
