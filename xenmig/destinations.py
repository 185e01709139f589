"""Where received state may be installed: destinations within allowed roots."""

from __future__ import annotations

import os
from collections.abc import Sequence

from twisted.python.filepath import FilePath

from xenmig.errors import PathNotAllowed

MAX_PATH = 4096


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolveDestination(path: str, roots: Sequence[FilePath]) -> FilePath:
    """
    Resolve ``path`` (absolute, or relative to the first root) to a destination
    inside one of ``roots``.

    The parent directory must exist; symbolic links in it are resolved before the
    check, so a link cannot lead outside.  The destination itself must not be a
    symbolic link, and ``..`` is refused outright.

    @raise PathNotAllowed: naming the path and the rule it breaks.
    """
    if not roots:
        raise PathNotAllowed("this host allows no destination roots")
    if not isinstance(path, str) or not path or len(path) > MAX_PATH or "\0" in path:
        raise PathNotAllowed(f"destination {path!r} is not a usable path")
    if ".." in path.split("/"):
        raise PathNotAllowed(f"destination {path!r} contains '..'")
    absolute = path if path.startswith("/") else os.path.join(roots[0].path, path)
    parent, name = os.path.split(os.path.normpath(absolute))
    if not name or path.endswith("/"):
        raise PathNotAllowed(f"destination {path!r} names a directory, not a file")
    realParent = os.path.realpath(parent)
    allowed = [os.path.realpath(root.path) for root in roots]
    if not any(_within(realParent, root) for root in allowed):
        raise PathNotAllowed(
            f"destination {path!r} is outside the allowed roots "
            f"({', '.join(allowed)}); use --allow-root on the target to allow it"
        )
    if not os.path.isdir(realParent):
        raise PathNotAllowed(f"destination directory {parent!r} does not exist")
    destination = os.path.join(realParent, name)
    if os.path.islink(destination):
        raise PathNotAllowed(f"destination {path!r} is a symbolic link")
    return FilePath(destination)
