"""The package's layering: no import cycle among `bmi` modules, function-level imports included.

Every module is parsed with `ast` (nothing is imported), each `import` or
`from ... import` naming a `bmi` module becomes an edge, wherever it sits
in the file, and a cycle fails the test with its path.  A function-level
import hides a cycle from the interpreter but not from the reader: the two
modules still cannot be understood or moved apart.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bmi"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_nodes(tree: ast.AST, *, top_level_only: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, in functions too unless top_level_only; never those under
    `if TYPE_CHECKING:` (annotations only: they run nowhere)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for orelse in child.orelse:
                    visit_one(orelse)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif not (top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            visit(node)

    visit(tree)
    return found


def imported(name: str, path: Path, known: set[str], *, top_level_only: bool = False) -> set[str]:
    """The bmi modules `name` imports: `from pkg import sub` names pkg.sub when that is a module, else pkg."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in import_nodes(ast.parse(path.read_text(), str(path)), top_level_only=top_level_only):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in known:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    out.discard(name)
    return out


def graph(*, top_level_only: bool = False) -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported(name, path, known, top_level_only=top_level_only) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One path per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [path_through(sorted(c)[0], set(c), edges) for c in components]


def path_through(start: str, members: set[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest cycle from `start` back to itself inside one component (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(came_from[chain[-1]])
                    return chain[::-1] + [start]
                if w not in came_from:
                    came_from[w] = v
                    following.append(w)
        frontier = following
    return [start]


def test_the_graph_sees_function_level_imports():
    """The checker itself: an import inside a function is an edge (export_tpm2_tools's helper)."""
    assert "bmi.integrity.signature" in graph()["bmi.types"]
    assert "bmi.integrity.signature" not in graph(top_level_only=True)["bmi.types"]


def test_annotation_only_imports_are_no_edges():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n")
    assert [ast.unparse(n) for n in import_nodes(tree)] == ["from typing import TYPE_CHECKING", "import b"]


def test_cycles_are_found_with_their_path():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_bmi_modules():
    found = cycles(graph())
    if found:
        pytest.fail("import cycles among bmi modules (each printed as a path):\n"
                    + "\n".join("  " + " -> ".join(c) for c in found))


@pytest.mark.parametrize("module, above", [
    ("bmi.types", ("bmi.integrity", "bmi.api", "bmi.channel", "bmi.server", "bmi.drivers", "bmi.cli")),
    ("bmi.system", ("bmi.server", "bmi.cli")),
])
def test_no_upward_import(module, above):
    """The ground floor imports nothing above it when imported; a client imports nothing of the daemon.

    (bmi.types's IntegrityReport.export_tpm2_tools imports its helper when called: that edge is in
    the cycle check, not here.)"""
    upward = sorted(m for m in graph(top_level_only=True)[module] if m.startswith(above))
    assert not upward, f"{module} imports {upward}"
    if module == "bmi.system":
        assert not [m for m in graph()[module] if m.startswith(above)]


def driver_packages() -> set[str]:
    return {f"bmi.drivers.{p.name}" for p in (PACKAGE / "drivers").iterdir() if (p / "__init__.py").exists()}


def foreign_driver_imports(edges: dict[str, set[str]], drivers: set[str]) -> list[str]:
    """`module -> import` for each module of one driver package that imports another's."""
    found = []
    for module, targets in edges.items():
        own = next((d for d in drivers if module == d or module.startswith(d + ".")), None)
        if own is None:
            continue
        found += [f"{module} -> {t}" for t in sorted(targets)
                  if any(t == d or t.startswith(d + ".") for d in drivers - {own})]
    return found


def test_the_cross_driver_check_sees_an_import_of_another_driver():
    edges = {"bmi.drivers.xen.image": {"bmi.drivers.linux.formats", "bmi.drivers.cpio"},
             "bmi.drivers.linux.bundle": {"bmi.drivers.cpio"}}
    drivers = {"bmi.drivers.xen", "bmi.drivers.linux"}
    assert foreign_driver_imports(edges, drivers) == ["bmi.drivers.xen.image -> bmi.drivers.linux.formats"]


def test_no_driver_imports_another_driver():
    """A driver uses shared modules (bmi/drivers/*.py, bmi/integrity, ...), never another driver's package
    (docs/drivers.md): each can then be removed, or added, alone."""
    drivers = driver_packages()
    assert {"bmi.drivers.linux", "bmi.drivers.xen"} <= drivers
    found = foreign_driver_imports(graph(), drivers)
    assert not found, "a driver imports another driver's package:\n" + "\n".join("  " + f for f in found)
