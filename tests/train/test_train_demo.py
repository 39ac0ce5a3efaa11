"""`sra-jax demo` end to end on a few steps: one table with every row and column."""

from __future__ import annotations

from sra_jax.train import demo


def test_demo_prints_one_table_with_every_critical_set_source(capsys):
    assert demo.main(["--steps", "2", "--router-steps", "1", "--eval-size", "8", "--context-len", "48"]) == 0
    out = capsys.readouterr().out
    words = set(out.split())  # rich may wrap a header over several lines
    for word in ("dense", "window", "random", "oracle", "learned", "accuracy", "selected", "FLOPs", "covered"):
        assert word in words, word
    assert out.count("┏") == 1  # exactly one table
