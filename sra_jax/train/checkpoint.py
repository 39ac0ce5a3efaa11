"""orbax checkpoints of the whole `TrainState` (params, optimizer state, step, RNG): save every N, keep K, atomic.

The data position is the step (batches are a pure function of the step, see `sra_jax.train.data`), and it is also
written to a small JSON item beside the arrays so a human can read it. orbax writes each checkpoint into a temporary
directory and renames it when complete, so a killed run never leaves a half-written "latest" checkpoint; with
`async_save` the arrays are copied to host before `save` returns and written in the background.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sra_jax.train.config import CheckpointConfig


def host_int(x: jax.Array) -> int:
    """A replicated scalar as a Python int (works when the array spans other processes' devices too)."""
    return int(np.asarray(x.addressable_data(0)))


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for `TrainState` pytrees; usable as a context manager."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            save_interval_steps=config.every,
            enable_async_checkpointing=config.async_save,
            create=True,
        )
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def due(self, step: int) -> bool:
        """Whether the interval asks for a checkpoint at `step` (lets the loop avoid reading the device step)."""
        return bool(self.manager.should_save(step))

    def save(self, state: Any, *, step: int | None = None, force: bool = False,
             extra: dict[str, Any] | None = None) -> bool:
        """Save `state` at its step if the interval says so (or `force`); returns whether a save started.

        `step` is `state.step` when the caller knows it (reading it from the device waits for the step to finish).
        """
        step = host_int(state.step) if step is None else int(step)
        meta = {"step": step, "data_position": step, **(extra or {})}
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, target: Any) -> Any | None:
        """The latest checkpoint restored into the structure, dtypes and shardings of `target`; None if there is none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored.state

    def wait(self) -> None:
        """Block until background saves are durable."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
