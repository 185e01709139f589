"""StagingArea: where received state waits until commit, and its removal."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.filepath import FilePath

from xenmig.fs import removeTree
from xenmig.target.context import TargetContext


class StagingArea:
    """
    ``STATE_DIR/staging``: a private directory per migration and device, plus
    the files devices stage next to their destinations (which their contexts
    record).  Removal runs in the I/O threads; only start-up blocks.
    """

    def __init__(
        self, root: FilePath, runInThread: Callable[..., Deferred[Any]]
    ) -> None:
        self.root = root
        self.runInThread = runInThread
        self._contexts: dict[str, list[TargetContext]] = {}
        self._made: set[str] = set()  # migrations with a directory made

    def create(self) -> None:
        """Blocking, at start-up: make the staging root, owner-only."""
        self.root.makedirs(ignoreExistingDirectory=True)
        os.chmod(self.root.path, 0o700)

    def empty(self) -> None:
        """Blocking, at start-up: remove whatever a previous run staged here."""
        for child in self.root.children():
            removeTree(child.path)

    def opened(self, migrationId: str, contexts: list[TargetContext]) -> None:
        """The device contexts of ``migrationId``, whose staging this tracks."""
        self._contexts[migrationId] = contexts

    def makeDeviceDir(self, context: TargetContext) -> Deferred[None]:
        """Make the private staging directory of one device (it must not exist)."""
        self._made.add(context.migrationId)
        return self.runInThread(
            _makePrivateDir, self.root.path, context.stagingDir.path
        )

    def paths(self, migrationId: str) -> list[str]:
        """Every staging path of ``migrationId`` so far (for the journal)."""
        contexts = self._contexts.get(migrationId, [])
        return [self.root.child(migrationId).path] + _external(contexts)

    def remove(self, migrationId: str) -> Deferred[None]:
        """
        Remove all staging of ``migrationId``, and forget its contexts; at
        once if it made none (its devices stage nothing).
        """
        external = _external(self._contexts.pop(migrationId, []))
        if migrationId not in self._made and not external:
            return succeed(None)
        self._made.discard(migrationId)
        return self.runInThread(
            _removeAll, [self.root.child(migrationId).path, *external]
        )


def _makePrivateDir(root: str, path: str) -> None:
    if not os.path.isdir(root):
        os.makedirs(root, mode=0o700, exist_ok=True)
    os.makedirs(path, mode=0o700, exist_ok=False)


def _external(contexts: list[TargetContext]) -> list[str]:
    return [path for context in contexts for path in context.externalStaging]


def _removeAll(paths: list[str]) -> None:
    for path in paths:
        removeTree(path)
