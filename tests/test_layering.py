"""Lower rooms never import higher ones: the clients room and the TLS modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xenmig"

#: What the clients of external programs (xenmig/clients/) may not import.
ABOVE_CLIENTS = ("source", "target", "cli", "demo", "toolstack", "devices")
#: What the top-level modules written here may not import.
ABOVE_TOP = ("source", "target", "cli", "demo")


def importedModules(path: Path) -> set[str]:
    """Every module C{path} imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def higherImports(path: Path, rooms: tuple[str, ...]) -> list[str]:
    """The imports of C{path} that reach into one of C{rooms} of xenmig."""
    forbidden = tuple(f"xenmig.{room}" for room in rooms)
    return sorted(
        name
        for name in importedModules(path)
        if any(name == room or name.startswith(room + ".") for room in forbidden)
    )


@pytest.mark.parametrize(
    "module", sorted(p.name for p in (PACKAGE / "clients").glob("*.py"))
)
def test_clientsImportNoHigherRoom(module: str) -> None:
    """A module of xenmig/clients/ imports nothing from the rooms above it."""
    assert higherImports(PACKAGE / "clients" / module, ABOVE_CLIENTS) == []


@pytest.mark.parametrize("module", ["tls.py", "certificates.py"])
def test_tlsModulesImportNoHigherRoom(module: str) -> None:
    """The TLS modules at the top import nothing from source/, target/, cli/, demo/."""
    assert higherImports(PACKAGE / module, ABOVE_TOP) == []


def test_higherImportsSeesFunctionLocalImports(tmp_path: Path) -> None:
    """higherImports finds an import made inside a function, in either spelling."""
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n"
        "    from xenmig.cli import pki\n"
        "    import xenmig.demo.run\n"
        "from xenmig import source\n"
    )
    assert higherImports(module, ABOVE_CLIENTS) == [
        "xenmig.cli",
        "xenmig.cli.pki",
        "xenmig.demo.run",
        "xenmig.source",
    ]
