"""A training pipeline run as the commands a user types. Each stage is a folder:

    DIR/config.yaml    the stage's TrainConfig (`sra-jax train --config DIR/config.yaml` runs it)
    DIR/checkpoints    its training checkpoints (checkpoint.dir; a stage cut short resumes from the newest)
    DIR/logs           log.dir: metrics.jsonl and the resolved config the loop ran
    DIR/hf             `sra-jax export --checkpoint DIR/checkpoints --out DIR/hf`: a Hugging Face Llama folder
                       (+ sra_router.safetensors and sra_config.json when the model has routers)
    DIR/export.json    the stage's config, the export's step and the sha256 of each of its files, written once the
                       export is complete

A later stage starts from an earlier one's export through `init: {from: DIR/hf, trainable: ...}` (its `model:`
section then comes from the export, so config.yaml leaves it out). `Stage.run` loads config.yaml with
`TrainConfig.load` and trains it with `sra_jax.train.loop.run`, the two calls behind `sra-jax train`, then exports with
`sra_jax.convert.export.export_hf`, the call behind `sra-jax export`; a stage whose export verifies against
export.json (same config, same files) is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import yaml

from sra_jax.train.config import TrainConfig
from sra_jax.train.loop import StopFlag, run

_logger = logging.getLogger(__name__)

CONFIG_FILE, CHECKPOINTS, LOGS, EXPORT, MANIFEST = "config.yaml", "checkpoints", "logs", "hf", "export.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage in `directory` (see the module docstring for its files)."""

    directory: Path

    def __post_init__(self):
        object.__setattr__(self, "directory", Path(self.directory))

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.directory / CHECKPOINTS

    @property
    def logs(self) -> Path:
        return self.directory / LOGS

    @property
    def export(self) -> Path:
        return self.directory / EXPORT

    @property
    def manifest(self) -> Path:
        return self.directory / MANIFEST

    def commands(self) -> list[str]:
        """The shell commands that run this stage."""
        return [f"sra-jax train --config {self.config_path}",
                f"sra-jax export --checkpoint {self.checkpoints} --out {self.export}"]

    def verified(self, config: TrainConfig) -> bool:
        """True when the export exists, was made by this stage from `config` (as config.yaml holds it, at step
        `config.steps`; the log section aside), and every file matches export.json's sha256."""
        if not self.manifest.is_file() or not self.export.is_dir():
            return False
        try:
            manifest = json.loads(self.manifest.read_text())
        except json.JSONDecodeError:
            return False
        files = manifest.get("files") or {}
        made_from = {k: v for k, v in (manifest.get("config") or {}).items() if k != "log"}
        wanted = {k: v for k, v in self._values(config).items() if k != "log"}  # logging changes no weight
        if manifest.get("step") != config.steps or made_from != wanted or not files:
            return False
        return all((self.export / name).is_file() and _sha256(self.export / name) == digest
                   for name, digest in files.items())

    def config_for(self, config: TrainConfig) -> TrainConfig:
        """`config` with its checkpoints and logs in this stage's folder."""
        return dataclasses.replace(
            config, checkpoint=dataclasses.replace(config.checkpoint, dir=str(self.checkpoints)),
            log=dataclasses.replace(config.log, dir=str(self.logs)))

    def _values(self, config: TrainConfig) -> dict:
        """config.yaml's mapping for `config`: checkpoints and logs here; no `model:` when init.from is set (the model
        section comes from the checkpoint, as a user writes it)."""
        values = self.config_for(config).to_dict()
        if config.init.from_ is not None:
            del values["model"]
        return values

    def write_config(self, config: TrainConfig) -> TrainConfig:
        """Write config.yaml for `config` and return what `TrainConfig.load` reads back from it, which must equal
        `config` with this stage's folders."""
        config = self.config_for(config)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(self._values(config), sort_keys=False))
        os.replace(tmp, self.config_path)
        loaded = TrainConfig.load(self.config_path)
        if loaded != config:
            differ = sorted(k for k, v in loaded.to_dict().items() if v != config.to_dict()[k])
            raise ValueError(f"{self.config_path} reads back differently from the config it was written from "
                             f"(sections {differ}); with init.from the model section comes from "
                             f"{config.init.from_}")
        return loaded

    def run(self, config: TrainConfig, *, stop: StopFlag | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None, description: str = "train") -> Path | None:
        """Train `config` from config.yaml and export it; the export's path, or None when `stop` was raised first
        (the checkpoint of the last step is written: run again to resume). Skips straight to the export when it
        verifies."""
        if self.verified(config):
            _logger.info("%s: %s verifies, skipped", description, self.export)
            return self.export
        loaded = self.write_config(config)
        _logger.info("%s: %s", description, " && ".join(self.commands()))
        result = run(loaded, stop=stop, on_step=on_step, description=description)
        if result.reason == "preempted":
            return None
        if result.reason != "finished":
            raise RuntimeError(f"{description}: training stopped ({result.reason}); see {self.directory}")
        del result  # the export reads the checkpoint, not the live state
        from sra_jax.convert.export import export_hf

        self.manifest.unlink(missing_ok=True)
        export_hf(self.checkpoints, self.export, step=config.steps, overwrite=True)
        files = {p.name: _sha256(p) for p in sorted(self.export.iterdir()) if p.is_file()}
        tmp = self.manifest.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"config": self._values(config), "checkpoint": str(self.checkpoints),
                                   "step": config.steps, "files": files}, indent=1) + "\n")
        os.replace(tmp, self.manifest)
        return self.export


__all__ = ["Stage"]
