"""Each notebook's jupytext source runs end to end in its TINY setting (SRA_JAX_NOTEBOOK_TINY=1) in a real kernel,
and the committed `.ipynb` beside it holds the outputs of a full (not TINY) run of that same source."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("*.py") if not p.stem.startswith("_"))  # _*.py: helper modules


def _outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def _text(notebook) -> str:
    return "".join(output.get("text", "") for output in _outputs(notebook))


def test_the_ablation_notebooks_exist():
    assert {"sparsity_ablation", "static_vs_dynamic", "window_and_globals", "temperature_and_selection",
            "router_inspection", "cost_vs_length"} <= set(NAMES)


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """One folder for the TINY stages of every notebook: the first trains the tiny dense base, the others reuse it."""
    return tmp_path_factory.mktemp("notebook-stages")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_tiny_mode(name, monkeypatch, tiny_workdir):
    monkeypatch.setenv("SRA_JAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("SRA_JAX_NOTEBOOK_WORKDIR", str(tiny_workdir))
    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    images = [output for output in _outputs(notebook) if "image/png" in output.get("data", {})]
    assert images, f"{name} drew no PNG plot"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_a_full_run_of_its_source(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    assert path.exists(), f"{path.name} is missing: run python experiments/execute_notebooks.py {name}"
    committed = nbformat.read(path, as_version=4)
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    code = [[c.source for c in nb.cells if c.cell_type == "code"] for nb in (committed, source)]
    assert code[0] == code[1], f"{path.name} was executed from an older {name}.py: re-execute it"
    assert all(c.get("execution_count") for c in committed.cells if c.cell_type == "code" and c.source.strip()), \
        f"{path.name} has unexecuted cells"
    assert not [o for o in _outputs(committed) if o.get("output_type") == "error"], f"{path.name} holds an error"
    assert any("image/png" in o.get("data", {}) for o in _outputs(committed)), f"{path.name} has no PNG plot"
    assert "TINY=True" not in _text(committed), f"{path.name} holds the outputs of a TINY smoke run"
