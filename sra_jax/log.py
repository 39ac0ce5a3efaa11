"""Logging: every module logs to a child of the `sra_jax` logger (`logging.getLogger(__name__)`).

Importing sra_jax installs no handler: an application that embeds the library routes, filters or silences these
messages with the standard `logging` API (e.g. `logging.getLogger("sra_jax").setLevel(logging.WARNING)`). The
`sra-jax` command calls `setup()`, which adds one handler on stderr (INFO; WARNING under `--quiet`): a rich handler
on a terminal, whole plain lines when stderr is redirected (so log files stay greppable). Progress bars are not log
records: they draw on `console()`, the same stderr console as the rich handler, so log lines print above a live bar
instead of through it.
"""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

LOGGER_NAME = "sra_jax"

_console: Console | None = None


class _StderrHandler(logging.StreamHandler):
    """A stream handler on whatever `sys.stderr` is when a record is emitted (as the rich console does), so a
    handler installed once keeps working after the stream is swapped (pytest's capture, a redirecting caller)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def console() -> Console:
    """The shared stderr console of the CLI's log handler and the training progress bars."""
    global _console
    if _console is None:
        _console = Console(stderr=True, soft_wrap=True)  # soft wrap: log lines stay whole for grep
    return _console


def setup(quiet: bool = False) -> logging.Handler:
    """Install the CLI's handler on the `sra_jax` logger (replacing one that `setup` installed before).

    Level INFO, or WARNING when `quiet`. The logger stops propagating to the root logger, so a root handler that a
    dependency configured does not print every line twice. Returns the handler. Only entry points call this.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if getattr(handler, "_sra_jax_cli", False):
            logger.removeHandler(handler)
    handler: logging.Handler
    if console().is_terminal:
        handler = RichHandler(console=console(), show_path=False, markup=False, log_time_format="[%X]")
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    handler._sra_jax_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    return handler
