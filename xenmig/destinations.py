"""Where received state may be installed: destinations within allowed roots."""

from __future__ import annotations

import errno
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


def openResolvedDirectory(path: str) -> int:
    """
    Blocking: open the directory ``path`` — absolute, and resolved when it was
    checked (as L{resolveDestination} returns it) — walking it from ``/`` one
    component at a time without following any symbolic link.

    Use the descriptor (``dir_fd=``) to install: a component replaced by a
    symbolic link since the check (to lead outside the roots) is refused here,
    and a directory moved away after this call takes nothing of ours along.

    @raise PathNotAllowed: if a component is now a symbolic link, is missing,
        or is not a directory.
    """
    if not os.path.isabs(path) or ".." in path.split("/"):
        raise PathNotAllowed(f"destination directory {path!r} is not resolved")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open("/", flags)
    walked = ""
    try:
        for part in [p for p in path.split("/") if p and p != "."]:
            walked += "/" + part
            try:
                child = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                raise PathNotAllowed(_changed(path, walked, e))
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _changed(path: str, walked: str, error: OSError) -> str:
    if error.errno in (errno.ELOOP, errno.ENOTDIR):
        what = "is no longer a directory (a symbolic link or a file)"
    elif error.errno == errno.ENOENT:
        what = "no longer exists"
    else:
        what = f"cannot be opened ({error.strerror})"
    return (
        f"destination directory {path} changed since it was checked: {walked} "
        f"{what}; nothing was installed"
    )
