"""What a commit puts at its destinations, as journalled, and how it is reversed."""

from __future__ import annotations

import enum
import errno
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.logger import Logger
from twisted.python.filepath import FilePath

from xenmig.destinations import resolveDestination
from xenmig.errors import PathNotAllowed
from xenmig.fs import fsyncDirectory

log = Logger()

#: What is at a path: its device and inode numbers (a rename keeps them).
Identity = tuple[int, int]


class InstallState(enum.Enum):
    """How far one device's install went, as the journal says before each step."""

    #: Journalled with COMMITTING, before anything is installed: not begun.
    PLANNED = "PLANNED"
    #: Its handler's C{commit} was called: its state may be at the destination.
    INSTALLING = "INSTALLING"
    #: Its handler's C{commit} returned: its state is at the destination.
    INSTALLED = "INSTALLED"
    #: Reversed: nothing this install put at the destination remains there.
    REVERSED = "REVERSED"


@dataclass(frozen=True)
class Install:
    """
    One device's install as the journal records it: where it puts its state
    (None: on no path; a component holds it), what was at that path before
    it began, what it put there, and how far it went.
    """

    device: str
    destination: str | None = None
    before: Identity | None = None
    after: Identity | None = None
    state: InstallState = InstallState.PLANNED

    def moved(self, state: InstallState, after: Identity | None = None) -> Install:
        return replace(self, state=state, after=after or self.after)

    @property
    def begun(self) -> bool:
        """Whether its install may have put something at the destination."""
        return self.state in (InstallState.INSTALLING, InstallState.INSTALLED)

    def toJSON(self) -> dict[str, Any]:
        data: dict[str, Any] = {"device": self.device, "state": self.state.value}
        if self.destination is not None:
            data["destination"] = self.destination
            data["before"] = list(self.before) if self.before else None
            data["after"] = list(self.after) if self.after else None
        return data

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> Install:
        """@raise KeyError, TypeError, ValueError: if ``data`` is not an install."""
        return cls(
            device=str(data["device"]),
            destination=data.get("destination"),
            before=_identity(data.get("before")),
            after=_identity(data.get("after")),
            state=InstallState(data["state"]),
        )


def _identity(value: Any) -> Identity | None:
    if value is None:
        return None
    dev, ino = value
    return int(dev), int(ino)


def identityOf(path: str) -> Identity | None:
    """Blocking: what is at ``path`` now (not following a symbolic link), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def plan(destinations: Sequence[tuple[str, str | None]]) -> list[Install]:
    """
    Blocking: the installs about to begin, ``(device, destination)`` each,
    with what is at each destination now.
    """
    return [
        Install(device, path, identityOf(path) if path else None)
        for device, path in destinations
    ]


def isOurs(install: Install, now: Identity | None) -> bool:
    """
    Whether what is at the destination (``now``) was put there by ``install``:
    once INSTALLED, exactly what it put there; while INSTALLING (a crash or a
    failure in the middle), anything other than what was there before.
    """
    if not install.begun or install.destination is None or now is None:
        return False
    if install.state is InstallState.INSTALLED and install.after is not None:
        return now == install.after
    return now != install.before


@dataclass(frozen=True)
class Reversal:
    """What reversing a commit's installs did."""

    installs: tuple[Install, ...]
    #: The destinations whose content this migration had put there, now removed.
    removed: tuple[str, ...] = ()
    #: What could not be removed, and why (the operator must look).
    problems: tuple[str, ...] = ()

    def summary(self) -> str:
        """The reversal in a few words, for a reason the operator reads."""
        parts = [f"removed {', '.join(self.removed)}"] if self.removed else []
        parts += [f"COULD NOT REMOVE {problem}" for problem in self.problems]
        return "; ".join(parts) or "nothing was installed at a destination"


def reverse(installs: Sequence[Install], roots: Sequence[FilePath]) -> Reversal:
    """
    Blocking: remove what each begun install put at its destination (only
    there, only inside ``roots``, only what L{isOurs} says is ours).  An
    install whose destination holds nothing of ours is REVERSED too; one that
    could not be removed keeps its state and is named in the problems.
    """
    reversed: list[Install] = []
    removed: list[str] = []
    problems: list[str] = []
    for install in installs:
        if not install.begun or install.destination is None:
            reversed.append(install)
            continue
        path = install.destination
        try:
            if isOurs(install, identityOf(path)):
                _removeWithin(path, roots)
                removed.append(path)
        except (OSError, PathNotAllowed) as e:
            problems.append(f"{path}: {getattr(e, 'strerror', None) or e}")
            reversed.append(install)
            continue
        reversed.append(install.moved(InstallState.REVERSED))
    return Reversal(tuple(reversed), tuple(removed), tuple(problems))


def _removeWithin(path: str, roots: Sequence[FilePath]) -> None:
    """Remove the file or directory ``path``, if it is a destination in ``roots``."""
    if not roots or resolveDestination(path, roots).path != path:
        raise PathNotAllowed(f"{path} is not a destination inside the allowed roots")
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
    try:
        fsyncDirectory(os.path.dirname(path))
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
    log.info("removed {path}: its migration did not commit", path=path)
