"""pallas_kernels' own import graph, read from the source (every import statement, function-level ones included,
and the package `__init__` each submodule import runs): no cycles, no `sra_jax`, no private names across modules."""

from __future__ import annotations

import ast
import pathlib

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "pallas_kernels"


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules importing it executes (the target, its submodules named in a from-import,
    and every package `__init__` on the way), without the importer's own parent packages."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for module, names in _imports(path):
            for full in [module] + [f"{module}.{n}" for n in names]:
                if full not in mods:
                    continue
                pieces = full.split(".")
                for i in range(1, len(pieces) + 1):
                    dep = ".".join(pieces[:i])
                    if dep != name and not name.startswith(dep + "."):
                        targets.add(dep)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_through_a_package_init():
    assert find_cycle({"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.a"}}) == ["p.a", "p.b", "p.a"]
    assert find_cycle({"p": {"p.a"}, "p.a": {"p.b"}, "p.b": set()}) is None


def test_pallas_kernels_has_no_import_cycle():
    graph = import_graph()
    assert "pallas_kernels.block_sparse.api" in graph and "pallas_kernels.block_sparse.mosaic_bwd" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_pallas_kernels_never_imports_sra_jax_nor_private_names():
    mods = _modules()
    for name, path in mods.items():
        module_aliases = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                module_aliases |= {a.asname or a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("sra_jax"), f"{name} imports {node.module}"
                if node.module.startswith("pallas_kernels"):
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, f"{name}: from {node.module} import {private}"
                    module_aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in mods}
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases
                and node.attr.startswith("_")
            ):
                raise AssertionError(f"{name} reaches into {node.value.id}.{node.attr}")
