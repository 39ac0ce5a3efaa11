"""Shared by the subprocess tests: a tiny config, the train command line, and reading metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "model.num_attention_heads=2",
    "model.num_key_value_heads=1", "model.max_position_embeddings=64", "data.seq_len=48",
    "data.synthetic={min_hops: 1, max_hops: 2, min_distractors: 0, max_distractors: 2, value_range: 10, "
    "operand_max: 5, operators: '+-'}",
    "batch_size=8", "optim.warmup_steps=2", "log.every=1", "log.tensorboard=false", "log.progress=false",
    "checkpoint.every=1", "checkpoint.keep=2",
]


def train_command(tmp: Path, steps: int, *extra: str) -> list[str]:
    overrides = [*TINY, f"steps={steps}", f"checkpoint.dir={tmp / 'ckpt'}", f"log.dir={tmp / 'log'}", *extra]
    return [sys.executable, "-m", "sra_jax.cli", "train", *(a for o in overrides for a in ("--set", o))]


def losses_by_step(log_dir: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    path = log_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                out[record["step"]] = record["loss"]
    return out


def wait_for_step(proc: subprocess.Popen, log_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while max(losses_by_step(log_dir), default=0) < step:
        assert proc.poll() is None, f"run exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "run did not reach the step in time"
        time.sleep(0.2)


ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def cached_env(cache_dir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default ENV) plus a JAX persistent compilation cache in `cache_dir`, every program cached.

    For tests that start several processes running the same programs (a run, then its resume): the first process
    compiles, the later ones load the same executables from the cache instead of compiling them again. Same
    programs, so the numbers (and bit-identity checks between the runs) are unchanged. A size limit turns on the
    cache's file lock, so a process never reads an entry another one is still writing."""
    return dict(ENV if env is None else env, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                JAX_COMPILATION_CACHE_MAX_SIZE=str(4 << 30))
