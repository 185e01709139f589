"""Destinations resolve inside the allowed roots, or are refused with the rule."""

import os

import pytest
from twisted.python.filepath import FilePath

from xenmig.destinations import resolveDestination
from xenmig.errors import PathNotAllowed


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "root"
    (root / "vm").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return [FilePath(str(root))]


def test_inside(roots):
    """An absolute path in a root resolves to itself."""
    path = os.path.join(roots[0].path, "vm", "disk.img")
    assert resolveDestination(path, roots).path == path


def test_relative(roots):
    """A relative path is taken inside the first root."""
    assert resolveDestination("vm/tpm", roots).path == roots[0].path + "/vm/tpm"


@pytest.mark.parametrize(
    "path, message",
    [
        ("../../etc/x", "contains '..'"),
        ("vm/../../x", "contains '..'"),
        ("/etc/passwd", "outside the allowed roots"),
        ("", "not a usable path"),
        ("vm/a\0b", "not a usable path"),
        ("nodir/file", "does not exist"),
        ("vm/", "names a directory"),
    ],
)
def test_refused(roots, path, message):
    """Escapes, foreign absolute paths and malformed paths are refused by rule."""
    with pytest.raises(PathNotAllowed, match=message):
        resolveDestination(path, roots)


def test_symlinkedDirectory(roots, tmp_path):
    """A directory symlink leading outside the roots is refused."""
    os.symlink(tmp_path / "outside", os.path.join(roots[0].path, "escape"))
    with pytest.raises(PathNotAllowed, match="outside the allowed roots"):
        resolveDestination("escape/x", roots)


def test_symlinkedFile(roots, tmp_path):
    """A destination that is itself a symlink is refused."""
    os.symlink(tmp_path / "outside" / "x", os.path.join(roots[0].path, "vm", "link"))
    with pytest.raises(PathNotAllowed, match="symbolic link"):
        resolveDestination("vm/link", roots)


def test_prefixSibling(roots, tmp_path):
    """A sibling directory sharing the root's name as a prefix is outside."""
    (tmp_path / "rootx").mkdir()
    with pytest.raises(PathNotAllowed, match="outside"):
        resolveDestination(str(tmp_path / "rootx" / "f"), roots)


def test_noRoots():
    """With no roots, nothing may be installed."""
    with pytest.raises(PathNotAllowed, match="no destination roots"):
        resolveDestination("/tmp/x", [])
