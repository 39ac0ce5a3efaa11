"""Optional dependencies: `require(module, extra)` imports a module that only an extra installs, or raises an
ImportError that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, *, needed_by: str) -> ModuleType:
    """Import `module`; if it is missing, say that `needed_by` needs `pip install 'sra-jax[<extra>]'`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or module.split(".")[0] != error.name.split(".")[0]:
            raise  # the module exists but one of its own imports is broken: show that error as it is
        raise ImportError(f"{needed_by} needs {module.split('.')[0]!r}, part of the {extra!r} extra: "
                          f"pip install 'sra-jax[{extra}]'") from error
