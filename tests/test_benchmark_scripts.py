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


def test_train_throughput_packed_rows_are_whole_documents_with_segment_ids():
    """bench.data=packed (the 1B packed-8k training row): every slot is a token of some document, documents are
    contiguous with positions 0.. inside each, and the FLOP count sees the documents, not the rows."""
    import numpy as np
    import pytest

    from sra_jax.benchmarks import train_throughput
    from sra_jax.train.config import TrainConfig

    config = TrainConfig.load("synthetic_sra", ["data.seq_len=64", "data.pack=true", "batch_size=2",
                                                "model.max_position_embeddings=64"])
    batch = train_throughput.random_packed_batch(config, seed=0)
    assert batch["tokens"].shape == batch["segment_ids"].shape == (1, 2, 64)
    for ids, pos in zip(batch["segment_ids"].reshape(-1, 64), batch["positions"].reshape(-1, 64), strict=True):
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)  # 1, 2, ... contiguous
        starts = np.flatnonzero(np.diff(ids, prepend=0))
        want = np.arange(64) - np.repeat(starts, np.diff(np.append(starts, 64)))
        np.testing.assert_array_equal(pos, want)
        assert len(starts) >= 4  # documents of 4..16 tokens fill a 64-token row
    packed = train_throughput.model_flops(config, 1000, batch["positions"], 1.0, padding=False,
                                          segment_ids=batch["segment_ids"])
    rows = train_throughput.model_flops(config, 1000, batch["positions"], 1.0, padding=True)
    assert packed < rows  # causal pairs within documents only
    with pytest.raises(ValueError, match="data.pack=true"):
        train_throughput.time_step(TrainConfig.load("synthetic_sra", ["data.seq_len=64"]), {"bench.data": "packed"},
                                   steps=1, warmup=0, profile=None)
