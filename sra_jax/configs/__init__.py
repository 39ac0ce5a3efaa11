"""Training configs shipped with the package, addressable by name: `sra-jax train --config synthetic_sra`.

`resolve(name_or_path)` returns the path of an existing YAML file as given, else the packaged config of that name
(with or without `.yaml`); `names()` lists the packaged configs.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """The packaged config names, sorted (each is `<name>.yaml` in this package)."""
    return sorted(p.stem for p in _HERE.glob("*.yaml"))


def resolve(name_or_path: str | Path) -> Path:
    """An existing file path as given, else the packaged config `name_or_path` (`.yaml` optional)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and name in names():
        return _HERE / f"{name}.yaml"
    raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a file nor a packaged config name "
                            f"(packaged: {', '.join(names())})")
