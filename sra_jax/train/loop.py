"""The training loop: resume, step, log, checkpoint, and stop cleanly on SIGTERM / SIGINT or repeated bad steps.

Exit codes: 0 finished or preempted (a checkpoint of the last step was written), 1 stopped after
`max_bad_steps` consecutive non-finite steps (checkpoints hold only finite states, so the last one is intact).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sra_jax import log
from sra_jax.train import sharding
from sra_jax.train.checkpoint import Checkpointer, host_int
from sra_jax.train.config import TrainConfig
from sra_jax.train.data import make_stream
from sra_jax.train.frozen import frozen_weights
from sra_jax.train.optimizer import learning_rate_schedule
from sra_jax.train.metrics import MetricsLogger, count_params, peak_flops_per_device, train_flops
from sra_jax.train.step import Trainer, TrainState, create_trainer

_logger = logging.getLogger(__name__)

EXIT_OK, EXIT_BAD_STEPS = 0, 1


@dataclasses.dataclass(frozen=True)
class PendingStep:
    """A dispatched step whose metrics the host has not read yet."""

    step: int  # 0-based index of the batch it consumed
    positions: np.ndarray
    segment_ids: np.ndarray | None  # packed rows (data.pack); None: one sequence per row
    metrics: dict[str, jax.Array]
    dispatched: float  # perf_counter() at dispatch


@dataclasses.dataclass
class RunResult:
    trainer: Trainer
    state: TrainState
    exit_code: int
    history: list[dict[str, Any]]  # one record per step run in this process ("step" counts from 1)
    reason: str  # "finished", "preempted", "bad_steps"
    # Wall-clock seconds outside the steps: "setup" (mesh, initial or init.from weights, optimizer state, data),
    # "restore" (reading the newest checkpoint), "checkpoint" (saves and their verification, the final one included).
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


class StopFlag:
    """Set by SIGTERM / SIGINT (preemption); the loop checkpoints and exits 0 at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal = signum


class Recorder:
    """The host side of finished steps: reads a step's metrics (the only host sync), adds step time, throughput,
    MFU and the learning rate, keeps the rows (`history`), writes them to `log.dir` (metrics.jsonl with a "time"
    field, TensorBoard, config.yaml) every `log.every` steps and at the last step, advances the progress bar and
    counts consecutive skipped (non-finite) steps."""

    def __init__(self, config: TrainConfig, *, num_params: int, progress: Progress | None, task: Any,
                 on_step: Callable[[int, dict[str, float]], None] | None = None):
        self.config = config
        self.history: list[dict[str, Any]] = []  # one row per step recorded ("step" counts from 1)
        self.bad_steps = 0  # consecutive skipped steps
        self._logger = MetricsLogger(config.log.dir, tensorboard=config.log.tensorboard, config_yaml=config.to_yaml())
        self._num_params = num_params
        self._peak = peak_flops_per_device()
        self._schedule = learning_rate_schedule(config.optim, config.steps)
        self._progress, self._task, self._on_step = progress, task, on_step
        self._last_ready = time.perf_counter()

    @property
    def must_stop(self) -> bool:
        """`max_bad_steps` consecutive steps were skipped."""
        return self.bad_steps >= self.config.max_bad_steps

    def record(self, done: PendingStep) -> dict[str, float]:
        """Read and log the metrics of the finished step `done`; returns its row (without "step")."""
        model_cfg = self.config.model
        host = jax.device_get({k: v.addressable_data(0) for k, v in done.metrics.items()})
        metrics = {k: float(np.asarray(v)) for k, v in host.items()}
        ready = time.perf_counter()
        # Steps run back to back, so the time between two finished steps is the step time (the first one counts
        # from its dispatch).
        elapsed = ready - max(self._last_ready, done.dispatched)
        self._last_ready = ready
        flops = train_flops(self._num_params, model_cfg.vocab_size * model_cfg.hidden_size, done.positions,
                            num_layers=model_cfg.num_hidden_layers, num_heads=model_cfg.num_attention_heads,
                            head_dim=model_cfg.head_dim, mask_density=metrics["mask_density"],
                            segment_ids=done.segment_ids) * jax.process_count()
        # tokens_per_s and mfu count real tokens only; padded_tokens_per_s counts every slot (real + padding).
        metrics.update(step_time=elapsed, tokens_per_s=metrics["tokens"] / elapsed,
                       lr=float(self._schedule(done.step)))
        if "padded_tokens" in metrics:
            metrics["padded_tokens_per_s"] = metrics["padded_tokens"] / elapsed
        if self._peak is not None:
            metrics["mfu"] = flops / elapsed / (self._peak * jax.device_count())
        self.history.append({"step": done.step + 1, **metrics})
        if metrics["skipped"]:
            self.bad_steps += 1
            _logger.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped", done.step,
                            metrics["loss"], metrics["grad_norm"])
        else:
            self.bad_steps = 0
        if (done.step + 1) % self.config.log.every == 0 or done.step + 1 == self.config.steps:
            self._logger.log(done.step + 1, metrics)
        if self._task is not None:
            self._progress.update(self._task, completed=done.step + 1, status=(
                f"loss {metrics['loss']:.3f} acc {metrics['accuracy']:.2f} sel {metrics['selected_fraction']:.2f} "
                f"{metrics['tokens_per_s']:.0f} tok/s"))
        if self._on_step is not None:
            self._on_step(done.step + 1, metrics)
        return metrics

    def close(self) -> None:
        self._logger.close()


def run(
    config: TrainConfig,
    *,
    console: Console | None = None,
    progress: Progress | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop: StopFlag | None = None,
    description: str = "train",
) -> RunResult:
    """Train `config.steps` steps (resuming from `checkpoint.dir` when it holds a checkpoint)."""
    console = console or log.console()  # the progress bar draws on the log handler's console
    seconds = {"setup": 0.0, "restore": 0.0, "checkpoint": 0.0}
    began = time.perf_counter()
    mesh = sharding.make_mesh(config.mesh.resolve(jax.device_count()))
    trainer, state = create_trainer(config, mesh)
    stream = make_stream(config)
    _logger.info("%s", stream.describe())
    checkpointer = (Checkpointer(config.checkpoint.dir, config.checkpoint, run_config=config.to_dict(), owner=True,
                                 frozen=frozen_weights(config)) if config.checkpoint.dir else None)
    seconds["setup"] = time.perf_counter() - began
    if checkpointer is not None:
        began = time.perf_counter()
        restored = checkpointer.restore_latest(state)
        seconds["restore"] = time.perf_counter() - began
        if restored is not None:
            state = restored
            _logger.info("resumed from %s at step %d", checkpointer.directory, host_int(state.step))
    stop = StopFlag() if stop is None else stop  # not `or`: an unset flag is falsy
    reason, exit_code = "finished", EXIT_OK
    start = host_int(state.step)
    own_progress = progress is None and config.log.progress
    if own_progress:
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[status]}"), console=console, transient=False)
    task = progress.add_task(description, total=config.steps, completed=start, status="") if progress else None
    recorder = Recorder(config, num_params=count_params(state.params), progress=progress, task=task, on_step=on_step)
    pending: PendingStep | None = None

    def record(done: PendingStep) -> bool:
        """Record a finished step; False once the run must stop (too many consecutive bad steps)."""
        recorder.record(done)
        if recorder.must_stop:
            _logger.error("%d consecutive non-finite steps: stopping; the last checkpoint is the last good state",
                          recorder.bad_steps)
        return not recorder.must_stop

    # The host never waits for the step it just dispatched: it builds and uploads batch n + 1 and dispatches step
    # n + 1 while step n runs, then reads step n's metrics (one step behind). It reads a step's metrics at once
    # (a sync) only when that step must be checkpointed, is the last one, is preempted, or follows a bad step, so a
    # checkpoint is never ahead of the logged metrics and the bad-step count stops the run at the right step.
    with stop.installed(), (progress if own_progress else contextlib.nullcontext()):
        for step in range(start, config.steps):
            arrays = stream.batch(step)
            batch = trainer.put_batch(arrays)
            dispatched = time.perf_counter()
            state, device_metrics = trainer.step_fn(state, batch)
            current = PendingStep(step, arrays["positions"], arrays.get("segment_ids"), device_metrics, dispatched)
            if pending is not None and not record(pending):
                recorder.record(current)  # already run: keep its metrics too
                pending = None
                reason, exit_code = "bad_steps", EXIT_BAD_STEPS
                break
            pending = current
            last = step + 1 == config.steps
            # Read the flag once per step: a signal landing between two reads would log this step, skip its save
            # and still exit as "preempted". One that lands after this read is handled at the next step.
            stopping = bool(stop)
            save_now = checkpointer is not None and (stopping or last or checkpointer.due(step + 1))
            if not (save_now or recorder.bad_steps or stopping or last):
                continue
            pending = None
            if not record(current):
                reason, exit_code = "bad_steps", EXIT_BAD_STEPS
                break
            if save_now:
                began = time.perf_counter()
                checkpointer.save(state, step=step + 1, force=stopping or last)
                seconds["checkpoint"] += time.perf_counter() - began
            if stopping:
                _logger.warning("signal %s: checkpoint at step %d saved; exiting", stop.signal, step + 1)
                reason = "preempted"
                break
    if checkpointer is not None:
        began = time.perf_counter()
        checkpointer.close()
        seconds["checkpoint"] += time.perf_counter() - began
    recorder.close()
    return RunResult(trainer=trainer, state=state, exit_code=exit_code, history=recorder.history, reason=reason,
                     seconds=seconds)


def summarize(history: list[dict[str, Any]]) -> dict[str, float]:
    """Means of the last 10 logged steps (for a closing line)."""
    tail = history[-10:]
    keys = set().union(*tail) - {"step"} if tail else set()
    return {k: float(np.mean([h[k] for h in tail if k in h])) for k in sorted(keys)}
