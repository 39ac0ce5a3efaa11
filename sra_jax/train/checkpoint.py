"""orbax checkpoints of the whole `TrainState` (params, optimizer state, step, RNG) that are verified before they count.

The data position is the step (batches are a pure function of the step, see `sra_jax.train.data`), and it is also
written to a small JSON item beside the arrays so a human can read it. orbax writes each step into a temporary
folder and renames it when complete (with `async_save` the arrays are copied to host before `save` returns and
written in the background); temporary folders left by a killed save are removed when the next run opens the folder.

On top of that a step counts as a good checkpoint only once it is verified: when its save has finished (at the next
`save`, `wait` or `close`) every file is checksummed into `manifest.json` (`sra_jax.train.manifest`) together with
the run's config. Rotation keeps the newest `keep` good steps and deletes an older one only after a newer one has
been verified. `restore_latest` checks the checksums of the newest step; a damaged or unverified newest step is
reported in one logged line, moved to `<dir>/damaged/`, and the newest good step is restored instead. A resume whose
config differs from the checkpoint's in the keys of `RESUME_KEYS` is refused naming them, unless
`checkpoint.allow_config_change` is set.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sra_jax.convert.source import FROZEN_META_KEY, train_meta
from sra_jax.train import frozen as frozen_lib
from sra_jax.train import manifest
from sra_jax.train.config import CheckpointConfig

log = logging.getLogger(__name__)

# Config keys a resume must match (a section name covers all its keys): the model's shape, SRA on/off and its
# settings, and what fixes the schedule and the data order.
RESUME_KEYS = ("model", "sra", "steps", "optim.warmup_steps", "optim.decay_steps", "batch_size", "data.task",
               "data.seq_len", "data.seed", "param_dtype")
DAMAGED = "damaged"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from or saved to; the message says which step and why."""


def host_int(x: jax.Array) -> int:
    """A replicated scalar as a Python int (works when the array spans other processes' devices too)."""
    return int(np.asarray(x.addressable_data(0)))


def resume_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `RESUME_KEYS` of a `TrainConfig.to_dict()` as flat dotted keys (a section off reads as `sra: None`)."""
    view: dict[str, Any] = {}
    for key in RESUME_KEYS:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, Mapping):
            view.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            view[key] = value
    return view


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`key (checkpoint X, now Y)` for each resume key on which two configs differ."""
    old, new = resume_view(saved), resume_view(current)
    sra_on = {name: not ("sra" in view and view["sra"] is None) for name, view in (("old", old), ("new", new))}
    if sra_on["old"] != sra_on["new"]:
        word = {True: "on", False: "off"}
        sra = [f"sra (checkpoint {word[sra_on['old']]}, now {word[sra_on['new']]})"]
        old = {k: v for k, v in old.items() if not k.startswith("sra")}
        new = {k: v for k, v in new.items() if not k.startswith("sra")}
    else:
        sra = []
    return sra + [f"{k} (checkpoint {old.get(k)!r}, now {new.get(k)!r})"
                  for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class Checkpointer:
    """`ocp.CheckpointManager` for `TrainState` pytrees plus manifests, verified rotation and fallback restores.

    `run_config` (a `TrainConfig.to_dict()`) is written into each manifest (compared on restore) and, as "config",
    into each step's `meta` item (which `sra_jax.convert.source` reads to rebuild the model). `owner=True` is
    for the one run that writes the folder: only it saves, removes temporary folders of killed saves and moves damaged
    steps aside. A reader (an evaluation next to a live run) skips damaged steps and touches nothing, so it never
    removes a save in progress. `frozen` (`sra_jax.train.frozen.frozen_weights(config)`): save only the routers'
    parameters and reference the frozen ones; restores complete them from the target. Usable as a context manager.
    """

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig, *,
                 run_config: Mapping[str, Any] | None = None, owner: bool = False,
                 frozen: frozen_lib.FrozenWeights | None = None):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # rotation is ours: only after a newer step is verified
            save_interval_steps=config.every,
            enable_async_checkpointing=config.async_save,
            create=True,
            cleanup_tmp_directories=owner,
        )
        self.directory = os.path.abspath(directory)
        self.keep = config.keep
        self.allow_config_change = config.allow_config_change
        self.run_config = dict(run_config) if run_config is not None else None
        self.owner = owner
        self.frozen = frozen
        self._pending: int | None = None
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def due(self, step: int) -> bool:
        """Whether the interval asks for a checkpoint at `step` (lets the loop avoid reading the device step)."""
        return bool(self.manager.should_save(step))

    def save(self, state: Any, *, step: int | None = None, force: bool = False,
             extra: dict[str, Any] | None = None) -> bool:
        """Save `state` at its step if the interval says so (or `force`); returns whether a save started.

        The previous save is verified first. `step` is `state.step` when the caller knows it (reading it from the
        device waits for the step to finish).
        """
        if not self.owner:
            raise ValueError(f"Checkpointer({self.directory}) was opened as a reader; pass owner=True to save")
        self._verify_pending()
        step = host_int(state.step) if step is None else int(step)
        meta = {"step": step, "data_position": step}
        if self.run_config is not None:
            meta["config"] = self.run_config
        if self.frozen is not None:
            state, meta[FROZEN_META_KEY] = self.frozen.slim(state), self.frozen.meta
        meta.update(extra or {})
        try:
            started = self.manager.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=force,
            )
        except Exception as error:
            raise self._save_failed(step, error) from error
        if started:
            self._pending = step
        return bool(started)

    def _save_failed(self, step: int, error: BaseException) -> CheckpointError:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return CheckpointError(f"checkpoint save of step {step} in {self.directory} failed ({reason}); the verified "
                               f"checkpoints before it are intact: resume from them once the cause is fixed")

    def _verify_pending(self) -> None:
        """Wait for the running save, checksum it into its manifest, then rotate (only process 0 writes)."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                manifest.write(self._step_dir(step), step=step, config=self.run_config)
        except Exception as error:
            raise self._save_failed(step, error) from error
        if jax.process_index() == 0:
            self._rotate()
        _sync_hosts("sra_jax_checkpoint_verified")
        self.manager.reload()

    def _step_dir(self, step: int) -> Path:
        return Path(self.directory) / str(step)

    def _steps(self) -> list[int]:
        """Finished step folders (orbax renames a save to its bare step number when complete), newest first."""
        root = Path(self.directory)
        steps = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
        return sorted(steps, reverse=True)

    def _rotate(self) -> None:
        """Keep the newest `keep` steps that have a manifest; delete older steps (good beyond `keep`, or never
        verified) only when they are older than the newest verified one."""
        steps = self._steps()
        good = [s for s in steps if (self._step_dir(s) / manifest.MANIFEST).is_file()]
        if not good:
            return
        kept = set(good[: self.keep])
        for step in steps:
            if step < good[0] and step not in kept:
                shutil.rmtree(self._step_dir(step), ignore_errors=True)

    def latest_step(self) -> int | None:
        """The newest step that was verified when saved (its checksums are checked again by `restore_latest`)."""
        return next((s for s in self._steps() if (self._step_dir(s) / manifest.MANIFEST).is_file()), None)

    def restore_latest(self, target: Any) -> Any | None:
        """The newest good checkpoint restored into the structure, dtypes and shardings of `target`; None if the
        folder holds no checkpoint. Damaged newer steps are logged and (by the owner) moved to `<dir>/damaged/`;
        CheckpointError if no step is good or the config does not match."""
        damaged: list[tuple[int, str]] = []
        for step in self._steps():
            try:
                body = manifest.verify(self._step_dir(step))
            except manifest.DamagedCheckpoint as why:
                log.warning("checkpoint step %d in %s is damaged or incomplete: %s; trying an older step",
                            step, self.directory, why)
                damaged.append((step, str(why)))
                continue
            self._check_config(step, body.get("config") or {})
            self._check_frozen(step)
            if self.owner:
                self._set_aside(damaged)
            slim = target if self.frozen is None else self.frozen.slim(target)
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, slim)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            except Exception as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise CheckpointError(f"checkpoint step {step} in {self.directory} passed its checksums but does not "
                                      f"restore into this model: {reason}") from error
            if damaged:
                log.warning("restoring step %d, the newest good checkpoint in %s%s", step, self.directory,
                            f" (damaged steps moved to {Path(self.directory) / DAMAGED})" if self.owner else "")
            return restored.state if self.frozen is None else self.frozen.merge(restored.state, target)
        if damaged:
            listed = "; ".join(f"step {s}: {why}" for s, why in damaged)
            raise CheckpointError(f"no usable checkpoint in {self.directory} ({listed}); move the folder away to "
                                  f"start from scratch")
        return None

    def _check_config(self, step: int, saved: Mapping[str, Any]) -> None:
        if self.run_config is None or not saved or self.allow_config_change:
            return
        differences = config_differences(saved, self.run_config)
        if differences:
            raise CheckpointError(f"resuming {self.directory} step {step} refused: the config differs from the "
                                  f"checkpoint's in {', '.join(differences)}; use the checkpoint's values, another "
                                  f"checkpoint.dir, or set checkpoint.allow_config_change=true to resume anyway")

    def _check_frozen(self, step: int) -> None:
        why = frozen_lib.mismatch(train_meta(self._step_dir(step)).get(FROZEN_META_KEY), self.frozen)
        if why is not None:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be resumed: {why}")

    def _set_aside(self, damaged: list[tuple[int, str]]) -> None:
        """Move damaged steps to `<dir>/damaged/` (kept for inspection; a fresh save of the same step can follow)."""
        if damaged and jax.process_index() == 0:
            aside = Path(self.directory) / DAMAGED
            aside.mkdir(exist_ok=True)
            for step, _ in damaged:
                target, n = aside / str(step), 1
                while target.exists():
                    target, n = aside / f"{step}.{n}", n + 1
                os.replace(self._step_dir(step), target)
        if damaged:
            _sync_hosts("sra_jax_checkpoint_set_aside")
            self.manager.reload()

    def wait(self) -> None:
        """Block until background saves are durable and verified."""
        self.manager.wait_until_finished()
        self._verify_pending()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sync_hosts(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
