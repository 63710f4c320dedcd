"""The import walls of the library, read statically from the source (nothing is imported).

Every ``import x``, ``from x import y`` and relative import of every module in ``megatron_focusft/`` counts,
wherever it stands: at the top, inside a function (a lazy import dodges a cycle at run time but is still
one) or under ``if TYPE_CHECKING:``.  Two rules:

- no import cycle among the library's modules;
- layering: a unit (a top-level module or subpackage of ``megatron_focusft``) imports only units of a lower
  layer in :data:`LAYERS`, or of its own layer where that layer's units may import each other.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "megatron_focusft"

# The layer map, lowest first.  A unit may import units of the layers above it in this table; "siblings"
# says whether the units of one layer may import each other.  The applications are independent: training
# does not import the benchmark or the analysis, and nothing imports training.  tools/ and tests/ are not in
# the library and sit above all of it: the library never imports them.
LAYERS: tuple[tuple[str, bool, tuple[str, ...]], ...] = (
    # layer           siblings  units
    ("package root",  False, ("__init__",)),
    ("data",          False, ("data",)),
    ("model pieces",  True,  ("masks", "config", "runtime", "models", "attention", "fast_weights", "memory_plan",
                              "flops", "convert", "flags", "pipeline", "run_record")),
    ("bilevel step",  False, ("bilevel",)),
    ("schedule",      False, ("schedule",)),
    ("applications",  False, ("training", "benchmark", "analysis")),
)  # fmt: skip

# Imports that go against the table but are allowed, as (importing unit, imported unit), each with its reason.
ALLOWED: dict[tuple[str, str], str] = {}

OUTSIDE = ("tools", "tests")  # programs and tests over the library: never imported by it


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name (the nearest module of the imported name) or a name in OUTSIDE
    line: int
    implicit: bool = False  # the target is a package whose __init__ runs first, before the named submodule

    def where(self, root: Path) -> str:
        how = " (its package __init__ runs first)" if self.implicit else ""
        return f"{module_path(root, self.importer)}:{self.line} imports {self.target}{how}"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` under ``root`` (``pkg/__init__.py`` is ``pkg``)."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def module_path(root: Path, name: str) -> str:
    path = root / Path(*name.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(root))


def _imported_names(tree: ast.AST, module: str, is_package: bool):
    """(dotted name, line) of everything the module imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:  # ``from pkg import sub`` imports the submodule pkg.sub
                yield (f"{base}.{alias.name}" if alias.name != "*" else base), node.lineno


def _contains(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


def import_graph(root: Path, package: str) -> dict[str, list[Import]]:
    """Every module of ``package`` -> its imports of the package's modules and of :data:`OUTSIDE`.

    ``import a.b.c`` from outside ``a.b`` runs ``a/b/__init__.py`` first: that is an (implicit) import of
    ``a.b`` too, which a cycle can go through."""
    modules = module_names(root, package)
    graph: dict[str, list[Import]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: dict[str, Import] = {}
        for target, line in _imported_names(tree, name, path.name == "__init__.py"):
            top = target.split(".")[0]
            if top in OUTSIDE:
                edges.setdefault(top, Import(name, top, line))
                continue
            if top != package:
                continue
            while target not in modules:  # an attribute of a module (``from pkg.mod import function``)
                target = target.rpartition(".")[0]
            if target != name:
                edges.setdefault(target, Import(name, target, line))
            parent = target.rpartition(".")[0]
            while parent and not _contains(parent, name):
                edges.setdefault(parent, Import(name, parent, line, implicit=True))
                parent = parent.rpartition(".")[0]
        graph[name] = sorted(edges.values(), key=lambda e: (e.line, e.target))
    return graph


def find_cycles(graph: dict[str, list[Import]]) -> list[list[Import]]:
    """One cycle (as its imports, in order) per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for e in graph.get(v, ()):
            w = e.target
            if w not in graph:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: dict[str, list[Import]], group: set[str]) -> list[Import]:
    """The shortest cycle through the group's first module (breadth-first, inside the group)."""
    start = min(group)
    came: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in graph[v]:
                if e.target == start:
                    path = [e]
                    while path[0].importer != start:
                        path.insert(0, came[path[0].importer])
                    return path
                if e.target in group and e.target not in came:
                    came[e.target] = e
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"no cycle in {group}")  # a strongly connected group always has one


def unit_of(module: str, package: str = PACKAGE) -> str:
    parts = module.split(".")
    if parts[0] != package:
        return parts[0]
    return parts[1] if len(parts) > 1 else "__init__"


def layering_violations(graph: dict[str, list[Import]], package: str = PACKAGE) -> list[Import]:
    layer = {unit: (i, siblings) for i, (_, siblings, units) in enumerate(LAYERS) for unit in units}
    bad = []
    for edges in graph.values():
        for e in edges:
            src, dst = unit_of(e.importer, package), unit_of(e.target, package)
            if e.implicit or src == dst or (src, dst) in ALLOWED:  # implicit: reported by its explicit import
                continue
            if dst in OUTSIDE:
                bad.append(e)
                continue
            (i, siblings), (j, _) = layer[src], layer[dst]
            if j > i or (j == i and not siblings):
                bad.append(e)
    return bad


def _format(imports: list[Import], root: Path) -> str:
    return "\n".join("    " + e.where(root) for e in imports)


# --------------------------------------------------------------------------------------------- the library
@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT, PACKAGE)


def test_every_unit_is_in_the_layer_map(graph):
    mapped = {unit for _, _, units in LAYERS for unit in units}
    missing = sorted({unit_of(m) for m in graph} - mapped)
    assert not missing, f"place {missing} in LAYERS (tests/test_imports.py)"
    assert not {u for pair in ALLOWED for u in pair} - mapped


def test_no_import_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n\n".join(_format(c, ROOT) for c in cycles)


def test_no_upward_import(graph):
    bad = layering_violations(graph)
    table = "\n".join(f"    {i}. {name}: {', '.join(units)}" for i, (name, _, units) in enumerate(LAYERS))
    assert not bad, f"imports against the layers (lowest first)\n{table}\nfound:\n" + _format(bad, ROOT)


def test_the_walls_the_issue_names(graph):
    """The same rules in the issue's words (issue 12), so that a change of the table cannot drop them."""
    edges = [e for es in graph.values() for e in es if not e.implicit]
    crossing = [e for e in edges if unit_of(e.importer) != unit_of(e.target)]
    data_out = [e for e in crossing if unit_of(e.importer) == "data"]
    training_in = [e for e in crossing if unit_of(e.target) == "training"]
    bilevel_users = ("schedule", "training", "benchmark", "analysis")  # schedule: the step across pipeline stages
    bilevel_in = [e for e in crossing if unit_of(e.target) == "bilevel" and unit_of(e.importer) not in bilevel_users]
    outside = [e for e in edges if e.target in OUTSIDE]
    for name, found in (
        ("data imports another part of the library", data_out),
        ("the library imports training", training_in),
        ("bilevel is imported outside the schedule, training, the benchmark and the analysis", bilevel_in),
        ("the library imports tools/ or tests/", outside),
    ):
        assert not found, f"{name}:\n" + _format(found, ROOT)


# --------------------------------------------------------------------------------------- the walker itself
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_walker_reads_every_kind_of_import(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "import pkg.b\nfrom pkg.sub import c\nfrom . import d\nfrom .sub.c import f\n",
            "pkg/b.py": "def later():\n    from .d import x\n",
            "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tools import train\n",
            "pkg/sub/__init__.py": "from .c import f\n",
            "pkg/sub/c.py": "from .. import b\nimport os\n\ndef f():\n    pass\n",
        },
    )
    g = {m: {(e.target, e.implicit) for e in es} for m, es in import_graph(tmp_path, "pkg").items()}
    assert g["pkg.a"] == {("pkg.b", False), ("pkg.sub.c", False), ("pkg.sub", True), ("pkg.d", False)}
    assert g["pkg.b"] == {("pkg.d", False)}  # inside a function
    assert g["pkg.d"] == {("tools", False)}  # under TYPE_CHECKING
    assert g["pkg.sub"] == {("pkg.sub.c", False)}  # relative to the package itself
    assert g["pkg.sub.c"] == {("pkg.b", False)}  # its own package's __init__ is not an import of it
    assert g["pkg"] == set()


def test_a_cycle_is_found_and_reported(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import x\n",
            "pkg/b.py": "\n\ndef f():\n    from pkg.sub.c import y\n",  # a lazy import is still one
            "pkg/sub/__init__.py": "from pkg.a import z\n",
            "pkg/sub/c.py": "",
            "pkg/e.py": "import pkg.a\n",  # into the cycle, not on it
        },
    )
    cycles = find_cycles(import_graph(tmp_path, "pkg"))
    assert len(cycles) == 1
    cycle = [(e.importer, e.target) for e in cycles[0]]
    assert cycle == [("pkg.a", "pkg.b"), ("pkg.b", "pkg.sub"), ("pkg.sub", "pkg.a")]
    assert "pkg/b.py:4 imports pkg.sub (its package __init__ runs first)" in _format(cycles[0], tmp_path)
