"""Execute the jupytext sources in notebooks/ and write each `.ipynb` beside its `.py`, outputs included.
(`notebooks/_*.py` are helper modules the notebooks import, not notebooks.)

    python experiments/execute_notebooks.py [name ...]    # full setting; SRA_JAX_NOTEBOOK_TINY=1 for the tiny one
"""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, timeout: int = 3600) -> Path:
    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    path = NOTEBOOKS / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return path


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or sorted(p.stem for p in NOTEBOOKS.glob("*.py") if not p.stem.startswith("_"))
    for name in names:
        print(f"wrote {execute(name)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
