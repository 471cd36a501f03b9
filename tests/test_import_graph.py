"""Layers that only point down: no import cycle among the `perception`, `fusion` and `deploy` modules, counting
imports inside functions, and the encoders in `fusion` import nothing from the model above them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("perception", "fusion", "deploy")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (top level or inside functions).

    `from a.b import c` counts as an import of `a.b.c` when that is a module, else of `a.b`; importing a module
    also runs its packages' `__init__`, so those count too."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                parts = t.split(".")
                for k in range(1, len(parts) + 1):  # the module and the packages it runs through
                    prefix = ".".join(parts[:k])
                    if prefix in mods and prefix != name and not name.startswith(prefix + "."):
                        graph[name].add(prefix)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_counting_function_level_imports():
    graph = import_graph()
    assert "perception.training" in graph and graph["perception.training"], "the scan found no imports"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layers_point_down():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("fusion"):
            assert not {d for d in deps if d.startswith("perception.model")}, name
        if name == "perception.evaluation" or name.startswith("perception.data") or name.startswith("perception.model"):
            assert not {d for d in deps if d.startswith("deploy") or d == "perception.training"}, name
