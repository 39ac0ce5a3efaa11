"""Logging goes through the `sra_jax` logger hierarchy: importing installs no handler, an embedding application
routes or silences it with the standard API, and the CLI's handler follows --quiet."""

import logging
import subprocess
import sys

import pytest

from sra_jax import log
from sra_jax.train.config import TrainConfig


@pytest.fixture
def clean_logger():
    """The `sra_jax` logger as an application that never ran the CLI sees it (restored afterwards)."""
    logger = logging.getLogger(log.LOGGER_NAME)
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = [h for h in logger.handlers if not getattr(h, "_sra_jax_cli", False)]
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_importing_the_library_installs_no_handler():
    code = ("import logging, sra_jax, sra_jax.cli, sra_jax.train.loop, sra_jax.train.evaluate, sra_jax.generate; "
            "names = [n for n in logging.root.manager.loggerDict if n == 'sra_jax' or n.startswith('sra_jax.')]; "
            "assert 'sra_jax.train.loop' in names, names; "
            "assert not [n for n in names if getattr(logging.getLogger(n), 'handlers', [])], names; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_an_application_receives_and_silences_training_logs(clean_logger, caplog, capsys, tmp_path):
    from sra_jax.train.loop import run

    config = TrainConfig.load("synthetic_sra", ["steps=1", "batch_size=4", "checkpoint.dir=null",
                                                f"log.dir={tmp_path}", "log.progress=false"])
    with caplog.at_level(logging.INFO, logger="sra_jax"):
        run(config)
    assert any(r.name == "sra_jax.train.loop" and r.message.startswith("data: synthetic") for r in caplog.records)
    # Silenced by the application: not even a warning reaches its handlers or the last-resort stderr handler.
    caplog.clear()
    clean_logger.setLevel(logging.CRITICAL)
    logging.getLogger("sra_jax.train.loop").warning("step 0: non-finite loss")
    assert not caplog.records and "non-finite" not in capsys.readouterr().err


def test_cli_handler_follows_quiet(clean_logger, capsys):
    child = logging.getLogger("sra_jax.train.loop")
    for quiet in (False, True):
        log.setup(quiet=quiet)
        assert len([h for h in clean_logger.handlers if getattr(h, "_sra_jax_cli", False)]) == 1
        child.info("resumed from somewhere")
        child.warning("signal 15: exiting")
        err = capsys.readouterr().err
        assert ("resumed from somewhere" in err) != quiet and "signal 15: exiting" in err


def test_version_flag(capsys):
    from sra_jax import __version__, cli

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sra-jax {__version__}"
