"""Two CPU processes on localhost with jax.distributed (gloo collectives): train, save, and resume."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from train_helpers import ENV, REPO, TINY, losses_by_step


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_pair(tmp, steps: int, *extra: str) -> list[subprocess.CompletedProcess]:
    port = free_port()
    overrides = [*TINY, f"steps={steps}", "checkpoint.every=2", f"checkpoint.dir={tmp / 'ckpt'}",
                 f"log.dir={tmp / 'log'}", "mesh.data=2", *extra]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sra_jax.cli", "train", "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(i), *(a for o in overrides for a in ("--set", o))],
            env=dict(ENV, XLA_FLAGS=""), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.multiprocess
def test_two_processes_train_save_and_resume(tmp_path):
    first = launch_pair(tmp_path, 4)
    for done in first:
        assert done.returncode == 0, done.stderr[-3000:]
    assert "2 x cpu over 2 process(es)" in first[0].stderr.lower()
    assert sorted(losses_by_step(tmp_path / "log")) == [1, 2, 3, 4]
    second = launch_pair(tmp_path, 6, "checkpoint.allow_config_change=true")  # a longer schedule, asked for
    for done in second:
        assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in second[0].stderr and "at step 4" in second[0].stderr
    assert sorted(losses_by_step(tmp_path / "log")) == [1, 2, 3, 4, 5, 6]


def test_cli_reads_the_jax_distributed_env_vars(monkeypatch, capsys):
    import jax

    from sra_jax.train.cli import main

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "node0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert main(["--print-config"]) == 0
    assert calls == [dict(coordinator_address="node0:1234", num_processes=2, process_id=1)]
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(SystemExit, match=r"\$JAX_NUM_PROCESSES='two' must be an integer"):
        main(["--print-config"])
