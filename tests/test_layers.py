"""
The package's layers, checked over its import graph: lower rooms never import
higher ones, and no two modules import each other, even for types only.

The rooms, lowest first (doc/architecture.md draws them)::

    contract   xenmig/*.py: the wire, the interfaces, values and primitives
    clients    xenmig/clients/: clients of external programs
    devices    xenmig/devices/: the device kinds
    source     xenmig/source/, target  xenmig/target/ (neither imports the other)
    toolstack  xenmig/toolstack/
    cli, demo  xenmig/cli/, xenmig/demo/

``xenmig/tap.py`` is the daemon's composition root: it assembles the target's
service and may import any room below the command line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xenmig"

#: Each room and its rank: a module imports only rooms of its rank or lower.
RANKS = {
    "contract": 0,
    "clients": 1,
    "devices": 2,
    "source": 3,
    "target": 3,
    "toolstack": 4,
    "cli": 5,
    "demo": 5,
}
#: Rooms of one rank that stay independent of each other.
APART = [("source", "target")]
#: The composition root, and the rooms it may not import.
ROOT = "xenmig.tap"
ROOT_MAY_NOT = {"cli", "demo"}
#: The most lines a module may have, and the most modules at the top level.
MOST_LINES = 500
MOST_TOP_MODULES = 22


def moduleName(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def modules() -> dict[str, Path]:
    return {moduleName(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    """The room a module lives in: its first package under xenmig, or contract."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANKS):
        return parts[1]
    return "contract"


def imports(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """Every xenmig module ``module`` imports, anywhere in it, with the line."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:
                    yield full, node.lineno
                elif base in known:
                    yield base, node.lineno


def graph() -> dict[str, dict[str, int]]:
    found = modules()
    known = set(found)
    return {
        module: {
            target: line
            for target, line in imports(module, path, known)
            if target != module and not module.startswith(target + ".")
        }
        for module, path in found.items()
    }


def test_lowerRoomsNeverImportHigherOnes() -> None:
    """A module imports only its own room and rooms ranked below it."""
    wrong = []
    for module, targets in graph().items():
        if module in (ROOT, "xenmig"):
            continue
        mine = room(module)
        for target, line in targets.items():
            theirs = room(target)
            if RANKS[theirs] > RANKS[mine]:
                wrong.append(f"{module}:{line} ({mine}) imports {target} ({theirs})")
            elif {mine, theirs} in [set(pair) for pair in APART] and mine != theirs:
                wrong.append(f"{module}:{line} ({mine}) imports {target} ({theirs})")
    assert wrong == []


def test_compositionRootStaysBelowTheCommandLine() -> None:
    """twistd's assembly imports no command-line or demo code."""
    targets = graph()[ROOT]
    assert [t for t in targets if room(t) in ROOT_MAY_NOT] == []


def test_noImportCycles() -> None:
    """No module imports itself through others (type-only imports count too)."""
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in edges.get(module, {}):
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target) :] + [target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("module", sorted(modules()))
def test_moduleShape(module: str) -> None:
    """Each module opens with a docstring and stays under the size of one idea."""
    path = modules()[module]
    source = path.read_text()
    lines = source.count("\n")
    assert lines <= MOST_LINES, f"{path} has {lines} lines, over {MOST_LINES}"
    if source.strip():
        assert ast.get_docstring(ast.parse(source)), f"{path} has no docstring"


def test_topLevelIsSmall() -> None:
    """The top of the package holds the contract, not everything."""
    top = [p for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= MOST_TOP_MODULES, sorted(p.name for p in top)


def test_theCheckSeesAViolation(tmp_path: Path) -> None:
    """The import scan finds a higher room imported by a lower one."""
    fake = PACKAGE / "clients" / "qmp.py"
    found = dict(imports("xenmig.clients.qmp", fake, set(modules())))
    assert all(room(t) in ("contract", "clients") for t in found)
    bad = tmp_path / "bad.py"
    bad.write_text('"""x"""\nfrom xenmig.target.session import Phase\n')
    assert dict(imports("xenmig.clients.bad", bad, set(modules()))) == {
        "xenmig.target.session": 2
    }
