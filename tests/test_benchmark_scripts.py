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
