"""The import graph of the library is a DAG (no module of aigc imports, at any depth, one that imports
it back), and the benchmarks are the project's own package, not the ``benchmarks`` Opacus installs."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT


def _module(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """aigc module -> the aigc modules it imports (module level or inside functions alike)."""
    modules = {_module(p): p for p in (ROOT / "aigc").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not a cycle
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def test_the_library_has_no_import_cycle():
    graph = import_graph()
    assert "aigc.machine" in graph["aigc.runtime"] and "aigc.runtime" not in graph["aigc.machine"]
    assert not cycles(graph), cycles(graph)


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_aigc_bench_imports_as_the_projects_own_package_from_anywhere():
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import aigc_bench.isa, aigc_bench; print(aigc_bench.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith(str(ROOT / "aigc_bench"))
