"""Each notebook's jupytext source runs end to end in its TINY setting (SRA_JAX_NOTEBOOK_TINY=1) in a real kernel."""

from __future__ import annotations

import os
from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.mark.parametrize("name", sorted(p.stem for p in NOTEBOOKS.glob("*.py")))
def test_notebook_runs_in_tiny_mode(name, monkeypatch):
    monkeypatch.setenv("SRA_JAX_NOTEBOOK_TINY", "1")
    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert images, f"{name} drew no PNG plot"
