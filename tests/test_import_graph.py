"""Layers that only point down: no import cycle among the `perception`, `fusion` and `deploy` modules, counting
imports inside functions; the encoders in `fusion` import nothing from the model above them, and `perception.data`
nothing above the data layer.

Imports sit at the top of a file: an import inside a function never names a project module, and one of a
third-party package (heavy, or optional) carries a comment saying why it waits (`lazy_import_problems`)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("perception", "fusion", "deploy")
# Files whose imports are lazy on purpose: the CLI imports each command's modules when it runs (start-up time).
LAZY_BY_DESIGN = ("perception/cli.py",)
# All that `perception.data` may import besides itself: the names, class lists, rig, config, errors, caches and
# processes below it (never evaluation, checkpoints, the model or the trainer above it).
BELOW_DATA = {"perception.structures", "perception.classes", "perception.rig", "perception.config", "perception.errors", "perception.cache",
              "perception.distributed", "perception.progress"}


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
        if name.startswith("perception.data"):
            assert not {d for d in deps if not d.startswith("perception.data")} - BELOW_DATA, name


def _function_level_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement inside a function (nested ones once), in line order."""
    found: dict[tuple[int, int], ast.Import | ast.ImportFrom] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found[(node.lineno, node.col_offset)] = node
    return [found[k] for k in sorted(found)]


def _comment_lines(source: str) -> tuple[set[int], set[int]]:
    """(lines holding a comment, lines holding nothing but a comment), 1-based."""
    with_comment, only_comment = set(), set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            with_comment.add(tok.start[0])
            if not tok.line[:tok.start[1]].strip():
                only_comment.add(tok.start[0])
    return with_comment, only_comment


def lazy_import_problems(source: str, where: str) -> list[str]:
    """``where:line: ...`` for each import inside a function of `source` that (a) names a project module (it
    belongs at the top of the file; if that makes a cycle, the layers need restructuring), or (b) has no comment
    on its own line(s) or on the line directly above saying why it waits (start-up time, optional dependency)."""
    with_comment, only_comment = _comment_lines(source)
    problems = []
    for node in _function_level_imports(ast.parse(source, where)):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        project = [n for n in names if n.split(".")[0] in PACKAGES]
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            project.append("." * node.level + (node.module or ""))
        commented = any(n in with_comment for n in range(node.lineno, node.end_lineno + 1))
        if project:
            problems.append(f"{where}:{node.lineno}: imports the project module {project[0]} inside a function "
                            "(move it to the top of the file)")
        elif not commented and node.lineno - 1 not in only_comment:
            problems.append(f"{where}:{node.lineno}: imports {names[0]} inside a function without a comment saying "
                            "why (heavy: start-up time, or an optional dependency); else import it at the top")
    return problems


def test_lazy_import_check_flags_project_and_unexplained_imports():
    source = """import os


def f():
    import json
    import numpy  # heavy: start-up time
    # optional dependency
    import open3d
    from perception.errors import DataError  # a comment does not excuse a project import
    from . import sibling  # nor a relative one

    def g():
        from fusion import lidar
"""
    problems = lazy_import_problems(source, "x.py")
    assert [p.split(": ")[0] for p in problems] == ["x.py:5", "x.py:9", "x.py:10", "x.py:13"], problems
    assert "json" in problems[0] and "perception.errors" in problems[1] and "fusion" in problems[3]


def test_function_level_imports_are_third_party_and_say_why():
    problems = []
    for path in sorted(_modules().values()):
        rel = path.relative_to(ROOT).as_posix()
        if rel in LAZY_BY_DESIGN:
            continue
        problems += lazy_import_problems(path.read_text(), rel)
    assert not problems, "\n".join(problems)
