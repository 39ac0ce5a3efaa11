"""The `sra-jax` dispatcher: usage, unknown commands, and commands that must work from any folder."""

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


def test_bench_runs_from_any_folder(tmp_path):
    # The benchmarks ship inside the package: `sra-jax bench` must not depend on the working directory.
    code = "import sys; from sra_jax import cli; sys.exit(cli.main(['bench', '--help']))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--seq" in result.stdout
