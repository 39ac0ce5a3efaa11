"""`sra-jax demo` end to end on a few steps: one table with both models and every column."""

from __future__ import annotations

from sra_jax.train import demo


def test_demo_prints_one_table_with_dense_and_sra_rows(capsys):
    assert demo.main(["--steps", "2", "--eval-size", "8"]) == 0
    out = capsys.readouterr().out
    words = set(out.split())  # rich may wrap a header over several lines
    for word in ("dense", "SRA", "accuracy", "unseen", "tokens", "selected", "FLOPs", "wall"):
        assert word in words, word
    assert out.count("┏") == 1  # exactly one table
