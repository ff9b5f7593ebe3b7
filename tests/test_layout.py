"""The layout stays readable: no import cycle, no module over 500 lines, no function over 80 (src/dpokit and
benchmarks/). Read with ``ast``, nothing is imported.

An import counts wherever it is written, inside a function too (a lazy import still ties the two modules
together); only imports under ``if TYPE_CHECKING:`` do not, as they never run. A module importing its own
package (``from dpokit.serve import MAX_QUEUE`` in ``dpokit.serve.app``) is not an edge: a package's
``__init__`` that hands out its modules' names imports them back, and that is its interface, not a loop.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = {"src": ROOT / "src", "benchmarks": ROOT / "benchmarks"}
"""Each tree's modules are named from its folder: ``dpokit.serve.app`` under src/, ``gpu_check`` in benchmarks/."""
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module = field(repr=False)

    @property
    def lines(self) -> int:
        return len(self.path.read_text(encoding="utf-8").splitlines())


def modules(folder: Path) -> dict[str, Module]:
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        found[name] = Module(name, path, is_package, ast.parse(path.read_text(encoding="utf-8")))
    return found


def type_checking_nodes(tree: ast.Module) -> set[int]:
    """Ids of every node under an ``if TYPE_CHECKING:`` (or ``if typing.TYPE_CHECKING:``)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    return skipped


def imported(module: Module, node: ast.Import | ast.ImportFrom, known: dict[str, Module]) -> set[str]:
    """The known modules an import statement loads: ``from pkg import name`` is the module ``pkg.name`` when
    there is one, else ``pkg``; a name not among ``known`` is walked up to its nearest known package."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: from the module's package, one level up per dot after the first
            base = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        candidates = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
                      for alias in node.names]
    targets = set()
    for name in candidates:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            targets.add(name)
    return targets


def import_graph(known: dict[str, Module]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in known}
    for module in known.values():
        skipped = type_checking_nodes(module.tree)
        own_package = module.name.rpartition(".")[0]
        for node in ast.walk(module.tree):
            if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            graph[module.name] |= {target for target in imported(module, node, known)
                                   if target not in (module.name, own_package)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def long_functions(module: Module) -> list[tuple[str, int]]:
    """(name, lines) of every function and method over the limit, nested ones included; decorators are not
    counted."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(module.tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


@pytest.fixture(scope="module", params=sorted(TREES))
def tree(request) -> tuple[str, dict[str, Module]]:
    return request.param, modules(TREES[request.param])


def test_no_import_cycle(tree):
    where, known = tree
    found = cycles(import_graph(known))
    assert not found, f"{where}: import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_over_500_lines(tree):
    where, known = tree
    found = [f"{m.name} ({m.lines} lines)" for m in known.values() if m.lines > MAX_MODULE_LINES]
    assert not found, f"{where}: modules over {MAX_MODULE_LINES} lines: " + ", ".join(found)


def test_no_function_over_80_lines(tree):
    where, known = tree
    found = [f"{m.name}.{name} ({lines} lines)" for m in known.values() for name, lines in long_functions(m)]
    assert not found, f"{where}: functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(found)


def test_the_checks_see_what_they_are_meant_to(tmp_path):
    """A cycle through a lazy import is found, one through a TYPE_CHECKING import is not, a module's import of
    its own package is not an edge, relative imports resolve, and a long function is measured."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("def __getattr__(name):\n    from pkg import a\n    return a\n")
    (pkg / "a.py").write_text("from pkg import VALUE\n\ndef f():\n    from . import b\n")
    (pkg / "b.py").write_text("from pkg.a import f\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import g\n")
    (pkg / "d.py").write_text("from .c import TYPE_CHECKING\n\ndef g():\n" + "    x = 1\n" * 80)
    known = modules(tmp_path)
    assert cycles(import_graph(known)) == [["pkg.a", "pkg.b"]]
    assert long_functions(known["pkg.d"]) == [("g", 81)]
