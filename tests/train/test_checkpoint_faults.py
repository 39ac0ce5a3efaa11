"""Fault injection on checkpoints: every kind of damage to the newest step (truncated, emptied, bit-flipped files,
deleted folders, an unverified save, a save killed midway, a full disk) ends in a restore of the newest good step or
a clear refusal, and the good steps stay intact."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sra_jax.train import manifest
from sra_jax.train.checkpoint import CheckpointError, Checkpointer, host_int
from sra_jax.train.config import CheckpointConfig, TrainConfig
from sra_jax.train.loop import run

from train_helpers import ENV, REPO, TINY, cached_env, losses_by_step, train_command

STEPS = 3
# One file of each kind orbax writes into a step (relative to the step folder; the data file is the largest one).
FILE_KINDS = ["DATA", "state/_METADATA", "state/manifest.ocdbt", "state/ocdbt.process_0/manifest.ocdbt",
              "state/_sharding", "state/array_metadatas/process_0", "_CHECKPOINT_METADATA", "meta/metadata",
              manifest.MANIFEST]


def _config(directory: Path, *extra: str) -> TrainConfig:
    return TrainConfig.load(None, [*TINY, f"steps={STEPS}", "checkpoint.keep=3", f"checkpoint.dir={directory}",
                                   *extra])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A finished 3-step run with verified checkpoints at steps 1, 2, 3, and the state of step 2 as restored."""
    directory = tmp_path_factory.mktemp("pristine") / "ckpt"
    config = _config(directory)
    result = run(config)
    assert result.exit_code == 0
    with Checkpointer(directory, config.checkpoint) as checkpointer:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, result.state)
        step2 = checkpointer.manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return directory, config, result.state, step2.state


def _copy(pristine, tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(pristine[0], directory)
    return directory


def _file(step_dir: Path, kind: str) -> Path:
    if kind == "DATA":
        return max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    return step_dir / kind


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(a)),
                                                    jax.tree.leaves(jax.device_get(b)), strict=True))


def _restore(directory: Path, config: TrainConfig, target, **checkpoint_changes):
    checkpoint = dataclasses.replace(config.checkpoint, dir=str(directory), **checkpoint_changes)
    with Checkpointer(directory, checkpoint, run_config=config.to_dict(), owner=True) as checkpointer:
        return checkpointer.restore_latest(target)


def _assert_good_steps_intact(directory: Path, steps) -> None:
    for step in steps:
        manifest.verify(directory / str(step))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2
    data[at: at + 8] = bytes(b ^ 0xFF for b in data[at: at + 8])  # eight bytes, size unchanged
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _empty, _flip], ids=["truncated", "emptied", "bit-flipped"])
def test_damage_to_any_file_of_the_newest_step_falls_back_to_the_previous_good_step(pristine, tmp_path, damage,
                                                                                     caplog):
    _, config, final, step2 = pristine
    for kind in FILE_KINDS:
        directory = _copy(pristine, tmp_path / kind.replace("/", "_"))
        damage(_file(directory / "3", kind))
        with caplog.at_level("WARNING"):
            restored = _restore(directory, config, final)
        assert host_int(restored.step) == 2 and _same(restored, step2), kind
        assert "step 3" in caplog.text and "damaged" in caplog.text
        assert (directory / "damaged" / "3").is_dir() and not (directory / "3").exists()
        _assert_good_steps_intact(directory, [1, 2])
        caplog.clear()


def test_a_reader_skips_a_damaged_step_and_moves_or_deletes_nothing(pristine, tmp_path):
    _, config, final, step2 = pristine
    directory = _copy(pristine, tmp_path)
    _flip(_file(directory / "3", "DATA"))
    in_progress = directory / "4.orbax-checkpoint-tmp-123"  # a live run's save in progress
    in_progress.mkdir()
    checkpoint = dataclasses.replace(config.checkpoint, dir=str(directory))
    with Checkpointer(directory, checkpoint) as reader:  # e.g. an evaluation beside the running training
        restored = reader.restore_latest(final)
        with pytest.raises(ValueError, match="owner=True"):
            reader.save(final, step=5)
    assert host_int(restored.step) == 2 and _same(restored, step2)
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "3", in_progress.name]


@pytest.mark.parametrize("removed", ["3/state", "3/meta", "3", "3/" + manifest.MANIFEST])
def test_deleted_folders_or_manifest_fall_back_to_the_previous_good_step(pristine, tmp_path, removed):
    _, config, final, step2 = pristine
    directory = _copy(pristine, tmp_path)
    target = directory / removed
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    restored = _restore(directory, config, final)
    assert host_int(restored.step) == 2 and _same(restored, step2)
    _assert_good_steps_intact(directory, [1, 2])


def test_every_step_damaged_is_refused_and_nothing_is_moved_or_deleted(pristine, tmp_path):
    _, config, final, _ = pristine
    directory = _copy(pristine, tmp_path)
    for step in (1, 2, 3):
        _flip(_file(directory / str(step), "DATA"))
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step 3: .*sha256.*step 1: "):
        _restore(directory, config, final)
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "3"]


def test_a_resume_with_another_config_is_refused_naming_the_keys_unless_allowed(pristine, tmp_path):
    _, config, final, _ = pristine
    directory = _copy(pristine, tmp_path)
    other_model = _config(directory, "model.intermediate_size=96")
    with pytest.raises(CheckpointError, match=r"model\.intermediate_size \(checkpoint 64, now 96\)"):
        _restore(directory, other_model, final)
    with_sra = _config(directory, "sra={critical_fraction: 0.5, window: 4, num_global: 1}")
    with pytest.raises(CheckpointError, match=r"refused.* sra \(checkpoint off, now on\).*allow_config_change"):
        _restore(directory, with_sra, final)
    longer = _config(directory, "steps=6")
    with pytest.raises(CheckpointError, match=r"steps \(checkpoint 3, now 6\)"):
        _restore(directory, longer, final)
    restored = _restore(directory, longer, final, allow_config_change=True)  # same shapes: allowed on request
    assert host_int(restored.step) == 3 and _same(restored, final)


def _tiny_state(step: int, size: int = 256):
    return {"step": jnp.asarray(step, jnp.int32), "w": jnp.full((size,), float(step), jnp.float32)}


def test_rotation_keeps_the_newest_good_steps_and_a_failed_save_deletes_nothing(tmp_path, monkeypatch):
    config = CheckpointConfig(dir=str(tmp_path), every=1, keep=2, async_save=True)
    with Checkpointer(tmp_path, config, owner=True) as checkpointer:
        for step in (1, 2, 3):
            checkpointer.save(_tiny_state(step), step=step)
        checkpointer.wait()
        assert checkpointer._steps() == [3, 2] and checkpointer.latest_step() == 3

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(manifest, "write", disk_full)  # the save's last write fails
        checkpointer.save(_tiny_state(4), step=4)
        with pytest.raises(CheckpointError, match=r"save of step 4 .*No space left on device.*intact"):
            checkpointer.wait()
        monkeypatch.undo()
        _assert_good_steps_intact(tmp_path, [2, 3])
        assert checkpointer.latest_step() == 3
    restored = Checkpointer(tmp_path, config, owner=True).restore_latest(_tiny_state(0))
    assert int(restored["step"]) == 3 and not (tmp_path / "4").exists()


def test_a_full_disk_fails_the_save_with_one_line_and_keeps_the_good_steps(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        config = CheckpointConfig(dir=str(mount), every=1, keep=5, async_save=True)
        checkpointer = Checkpointer(mount, config, owner=True)
        with pytest.raises(CheckpointError, match=r"save of step \d+ .*intact"):
            for step in range(1, 10):
                checkpointer.save(_tiny_state(step, size=24_000), step=step)  # ~100 kB each
            checkpointer.wait()
        good = [s for s in range(1, 10) if (mount / str(s) / manifest.MANIFEST).is_file()]
        assert good, "the first steps fit"
        _assert_good_steps_intact(mount, good)
        restored = Checkpointer(mount, config).restore_latest(_tiny_state(0, size=24_000))
        assert int(restored["step"]) == good[-1]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# A child process saves steps 1 and 2 (verified), starts step 3, then dies by SIGKILL at the given point.
_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from sra_jax.train.checkpoint import Checkpointer
    from sra_jax.train.config import CheckpointConfig
    directory, when = sys.argv[1], sys.argv[2]
    state = lambda step: {"step": jnp.asarray(step, jnp.int32), "w": jnp.full((2_000_000,), float(step))}
    checkpointer = Checkpointer(directory, CheckpointConfig(dir=directory, every=1, keep=3, async_save=True),
                                owner=True)
    for step in (1, 2, 3):
        checkpointer.save(state(step), step=step)
    if when == "after_write":  # orbax finished step 3, its manifest is not written yet
        checkpointer.manager.wait_until_finished()
    else:  # orbax is writing step 3 into its temporary folder
        import pathlib, time
        root = pathlib.Path(directory)
        while not any(".orbax-checkpoint-tmp" in p.name for p in root.iterdir()):
            assert not (root / "3").exists(), "the save finished before it could be killed"
            time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("when", ["during_write", "after_write"])
def test_a_save_killed_midway_leaves_the_good_steps_and_is_cleaned_up(tmp_path, when):
    directory = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(directory), when],
                          env=dict(ENV, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    config = CheckpointConfig(dir=str(directory), every=1, keep=3)
    target = {"step": jnp.asarray(0, jnp.int32), "w": jnp.zeros((2_000_000,))}
    checkpointer = Checkpointer(directory, config, owner=True)
    restored = checkpointer.restore_latest(target)
    checkpointer.close()
    assert int(restored["step"]) == 2 and float(restored["w"][0]) == 2.0
    _assert_good_steps_intact(directory, [1, 2])
    leftovers = [p.name for p in directory.iterdir() if p.name not in ("1", "2", "damaged")]
    assert leftovers == [], leftovers  # orbax's temporary folder of the killed save is gone


def test_cli_resumes_past_a_bit_flipped_newest_step_and_refuses_another_model_in_one_line(tmp_path):
    env = cached_env(tmp_path / "jax-cache")
    steps = 4
    first = subprocess.run(train_command(tmp_path, steps), env=env, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    expected = losses_by_step(tmp_path / "log")
    _flip(_file(tmp_path / "ckpt" / str(steps), "DATA"))  # bit rot in the newest step
    again = subprocess.run(train_command(tmp_path, steps), env=env, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"checkpoint step {steps} " in again.stderr and "sha256" in again.stderr
    assert f"resumed from {tmp_path / 'ckpt'} at step {steps - 1}" in again.stderr
    assert losses_by_step(tmp_path / "log") == expected  # the redone step is bit-identical
    _assert_good_steps_intact(tmp_path / "ckpt", [steps - 1, steps])

    refused = subprocess.run(train_command(tmp_path, steps, "model.intermediate_size=96"), env=env, cwd=REPO,
                             capture_output=True, text=True)
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert "Traceback" not in refused.stderr and "model.intermediate_size (checkpoint 64, now 96)" in last
