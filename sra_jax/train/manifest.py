"""Per-file checksums of a checkpoint step folder: `manifest.json` lists every file with its size and sha256.

A step counts as a good checkpoint only when its manifest is present and every listed file is there with the listed
size and checksum. The manifest also carries the run's config, so a resume can refuse a config that does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
_VERSION = 1


class DamagedCheckpoint(Exception):
    """A step folder that cannot be trusted; the message says why in one line."""


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.relative_to(step_dir).parts[0] not in
                  (MANIFEST, MANIFEST + ".tmp"))


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write(step_dir: str | os.PathLike, *, step: int, config: Mapping[str, Any] | None) -> None:
    """Checksum every file under `step_dir` and write the manifest atomically (temporary file, fsync, rename)."""
    step_dir = Path(step_dir)
    files = {p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(step_dir)}
    if not files:
        raise DamagedCheckpoint(f"{step_dir} holds no files")
    body = {"version": _VERSION, "step": int(step), "files": files, "config": dict(config or {})}
    tmp = step_dir / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)
    read(step_dir)  # the manifest reads back whole


def read(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed manifest of `step_dir`; DamagedCheckpoint if it is missing or unreadable."""
    path = Path(step_dir) / MANIFEST
    if not path.is_file():
        raise DamagedCheckpoint(f"no {MANIFEST} (the save did not finish, or the step predates manifests)")
    try:
        body = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCheckpoint(f"{MANIFEST} is unreadable ({error})") from None
    if not isinstance(body, dict) or body.get("version") != _VERSION or not isinstance(body.get("files"), dict):
        raise DamagedCheckpoint(f"{MANIFEST} is not a version-{_VERSION} manifest")
    return body


def verify(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of `step_dir` after checking every listed file's size and sha256; DamagedCheckpoint naming the
    first file that is missing, has another size or another checksum."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise DamagedCheckpoint(f"{step_dir} is not a folder")
    body = read(step_dir)
    for name, expected in sorted(body["files"].items()):
        path = step_dir / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        size = path.stat().st_size
        if size != expected.get("size"):
            raise DamagedCheckpoint(f"{name} has {size} bytes, the manifest says {expected.get('size')}")
        if _sha256(path) != expected.get("sha256"):
            raise DamagedCheckpoint(f"{name} does not match its sha256 checksum (bit rot or an overwrite)")
    return body
