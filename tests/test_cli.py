"""The `sra-jax` dispatcher: usage, unknown commands, and commands whose module ships only with the repository."""

import subprocess
import sys

from sra_jax import cli


def test_usage_lists_every_command(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_unknown_command_is_named(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_bench_outside_the_repository_says_where_to_run_it(tmp_path):
    # From a folder without benchmarks/ the command must explain itself instead of raising ModuleNotFoundError.
    code = "import sys; from sra_jax import cli; sys.exit(cli.main(['bench', '--help']))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "run it from the sra-jax repository root" in result.stderr
