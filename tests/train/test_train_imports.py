"""The train modules' imports form no cycle, function-level imports included (read from the source, nothing is
imported): the loss terms, the update and GRPO sit below the train step."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sra_jax"


def _import_graph() -> dict[str, set[str]]:
    """module -> the sra_jax modules it imports anywhere in its body (`from a import b` counts a.b when b is one)."""
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sra_jax"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("sra_jax")}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for dep in graph[stack.pop()] - seen:
            seen.add(dep)
            stack.append(dep)
    return seen


@pytest.mark.parametrize("module", ["step", "lm_rl", "objectives", "update", "rollout", "loop"])
def test_a_train_module_never_imports_itself_back(module):
    graph = _import_graph()
    name = f"sra_jax.train.{module}"
    assert name not in _reachable(graph, name), sorted(d for d in graph[name] if name in _reachable(graph, d))


def test_the_loss_terms_and_grpo_do_not_import_the_train_step():
    graph = _import_graph()
    for module in ("lm_rl", "objectives", "update"):
        assert "sra_jax.train.step" not in _reachable(graph, f"sra_jax.train.{module}"), module
