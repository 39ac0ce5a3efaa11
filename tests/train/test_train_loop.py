"""The loop under preemption: kill -9 then resume continues bit-identically; SIGTERM saves and exits 0;
non-finite steps are skipped and, repeated, stop the run with finite checkpoints."""

from __future__ import annotations

import dataclasses
import json
import time
import os
import random
import signal
import subprocess

import jax
import numpy as np
import pytest
import yaml

from sra_jax.train.checkpoint import Checkpointer
from sra_jax.train.config import TrainConfig
from sra_jax.train.loop import EXIT_BAD_STEPS, run

from train_helpers import ENV, REPO, TINY, cached_env, losses_by_step, train_command, wait_for_step


def test_kill_9_then_resume_continues_bit_identically(tmp_path):
    steps = 10
    env = cached_env(tmp_path / "jax-cache")  # the 3 runs compile the same programs once
    uninterrupted = tmp_path / "a"
    subprocess.run(train_command(uninterrupted, steps), check=True, env=env, cwd=REPO, capture_output=True)
    expected = losses_by_step(uninterrupted / "log")
    assert sorted(expected) == list(range(1, steps + 1))

    killed = tmp_path / "b"
    kill_at = random.Random(os.getpid()).randint(3, steps - 3)
    proc = subprocess.Popen(train_command(killed, steps), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_step(proc, killed / "log", kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(train_command(killed, steps), env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    assert losses_by_step(killed / "log") == expected  # exact float equality, every step


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
    proc = subprocess.Popen(train_command(tmp_path, 10_000, "checkpoint.every=1000"), env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, tmp_path / "log", 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    last_logged = max(losses_by_step(tmp_path / "log"))
    config = TrainConfig.load(None, TINY)
    with Checkpointer(tmp_path / "ckpt", config.checkpoint) as checkpointer:
        assert checkpointer.latest_step() == last_logged  # saved at preemption, though every=1000


def test_non_finite_steps_are_skipped_then_stop_the_run_with_finite_checkpoints(tmp_path):
    # A huge unclipped learning rate blows the weights up after one step; every later loss is non-finite.
    config = TrainConfig.load(None, [*TINY, "steps=20", "max_bad_steps=3", "optim.learning_rate=1e30",
                                     "optim.warmup_steps=0", "optim.clip_norm=null",
                                     f"checkpoint.dir={tmp_path / 'ckpt'}"])
    result = run(config)
    assert result.exit_code == EXIT_BAD_STEPS and result.reason == "bad_steps"
    skipped = [h["skipped"] for h in result.history]
    assert skipped[-3:] == [1.0, 1.0, 1.0] and len(skipped) < 20
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(result.state.params)))
    with Checkpointer(tmp_path / "ckpt", config.checkpoint) as checkpointer:
        restored = checkpointer.restore_latest(result.state)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(restored.params)))


@pytest.mark.parametrize("form", ["direct"])
def test_cli_print_config_prints_the_resolved_yaml(form, capsys):
    from sra_jax.train.cli import main

    assert main(["--set", f"data.form={form}", "--set", "steps=7", "--print-config"]) == 0
    assert "steps: 7" in capsys.readouterr().err


def test_throughput_benchmark_variants_parse_and_bad_options_fail():
    from sra_jax.benchmarks.train_throughput import parse_variant

    name, overrides, bench = parse_variant("dense: sra=null; attention_impl=cudnn; bench.data=random")
    assert (name, overrides, bench) == ("dense", ["sra=null", "attention_impl=cudnn"], {"bench.data": "random"})
    assert parse_variant("plain:") == ("plain", [], {})
    with pytest.raises(ValueError, match="NAME: key=value"):
        parse_variant("no colon here")
    with pytest.raises(ValueError, match="bench options"):
        parse_variant("x: bench.mode=fast")
    with pytest.raises(ValueError, match="key=value"):
        parse_variant("x: sra")


def test_a_signal_between_the_loops_reads_of_the_flag_still_checkpoints_the_last_logged_step(tmp_path, monkeypatch):
    """A SIGTERM can land at any instruction. A flag that turns true between two reads within one step (what a real
    signal did in CI: step 10 logged, no checkpoint at 10) must not let the run exit without saving what it logged."""
    from sra_jax.train.loop import StopFlag

    class SetWhileRead(StopFlag):
        def __init__(self, reads_before_set):
            super().__init__()
            self.reads = 0
            self.reads_before_set = reads_before_set

        def __bool__(self):  # the signal "arrives" right after read number `reads_before_set`
            self.reads += 1
            if self.reads > self.reads_before_set:
                self.signal = signal.SIGTERM
            return super().__bool__()

    config = TrainConfig.load(None, [*TINY, "steps=50", "checkpoint.every=1000", f"checkpoint.dir={tmp_path / 'ckpt'}"])
    # The three runs differ only in their checkpoint folder: build the trainer once so its jitted step compiles once;
    # each run still gets its own copy of the initial state (the step donates it).
    import sra_jax.train.loop as loop_module

    first = loop_module.create_trainer(config, loop_module.sharding.make_mesh(
        config.mesh.resolve(jax.device_count())))
    monkeypatch.setattr(loop_module, "create_trainer",
                        lambda _config, _mesh: (first[0], jax.tree.map(lambda x: x.copy(), first[1])))
    for reads_before_set in (5, 6, 7):  # the flip lands on different reads within a step
        ckpt = tmp_path / f"ckpt{reads_before_set}"
        result = run(dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, dir=str(ckpt))),
                     stop=SetWhileRead(reads_before_set))
        assert result.exit_code == 0 and result.reason == "preempted"
        with Checkpointer(ckpt, config.checkpoint) as checkpointer:
            assert checkpointer.latest_step() == len(result.history)


def test_a_stop_flag_passed_in_and_set_later_stops_the_run(tmp_path):
    """The caller's flag is the one the loop watches (an unset flag is falsy, so `stop or StopFlag()` lost it)."""
    from sra_jax.train.loop import StopFlag

    config = TrainConfig.load(None, [*TINY, "steps=50", f"checkpoint.dir={tmp_path / 'ckpt'}"])
    flag = StopFlag()

    def on_step(step, metrics):
        if step == 3:
            flag.signal = signal.SIGTERM

    result = run(config, stop=flag, on_step=on_step)
    assert result.exit_code == 0 and len(result.history) < 10
    with Checkpointer(tmp_path / "ckpt", config.checkpoint) as checkpointer:
        assert checkpointer.latest_step() == len(result.history)


def test_the_log_folder_holds_the_resolved_config_and_timestamped_rows(tmp_path):
    config = TrainConfig.load(None, [*TINY, "steps=2", "checkpoint.dir=null", f"log.dir={tmp_path}"])
    started = time.time()
    run(config)
    assert TrainConfig.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == config
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    times = [row["time"] for row in rows]
    assert len(rows) == 2 and started <= times[0] <= times[1] <= time.time()


def test_the_recorder_logs_every_n_steps_and_the_last_and_counts_consecutive_skipped_steps(tmp_path):
    from sra_jax.train.loop import Recorder, PendingStep

    config = TrainConfig.load(None, [*TINY, "steps=5", "log.every=2", "max_bad_steps=2", f"log.dir={tmp_path}"])
    recorder = Recorder(config, num_params=1000, progress=None, task=None)
    positions = np.zeros((1, 8, 48), np.int32)
    for step, skipped in enumerate([0.0, 1.0, 0.0, 1.0, 1.0]):
        metrics = {"loss": 1.0 + step, "grad_norm": 1.0, "mask_density": 1.0, "tokens": 384.0, "skipped": skipped}
        recorder.record(PendingStep(step, positions, None, jax.tree.map(jax.numpy.asarray, metrics), time.perf_counter()))
        assert recorder.bad_steps == [0, 1, 0, 1, 2][step] and recorder.must_stop == (step == 4)
    recorder.close()
    assert [row["step"] for row in recorder.history] == [1, 2, 3, 4, 5]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 5] and all("time" in row and "lr" in row for row in rows)
    assert rows[-1]["loss"] == 5.0 and TrainConfig.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == config


def test_bfloat16_params_keep_one_state_type_so_the_step_compiles_once():
    """AdamW moments are float32 from the start: moments in the parameters' bfloat16 turned float32 after the first
    update (float32 gradients), so step 2 compiled the train step again (100 s at 8B) and a resumed state differed."""
    from sra_jax.train import sharding
    from sra_jax.train.data import make_stream
    from sra_jax.train.step import create_trainer

    config = TrainConfig.load("synthetic_sra", ["batch_size=2", "param_dtype=bfloat16", "compute_dtype=bfloat16",
                                                "log.dir=null"])
    trainer, state = create_trainer(config, sharding.make_mesh((1, 1, 1)))
    stream = make_stream(config)
    types = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.weak_type), tree)  # noqa: E731
    first = types(state)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert moments and all(x.dtype == np.float32 for x in moments)
    for step in range(2):
        state, _ = trainer.step_fn(state, trainer.put_batch(stream.batch(step)))
        assert types(state) == first, f"step {step + 1} changed the state's types"
