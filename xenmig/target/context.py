"""What the framework gives a target device: threads, staging, destinations."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.python.filepath import FilePath
from zope.interface import implementer

from xenmig.destinations import resolveDestination
from xenmig.interfaces import ITargetContext

if TYPE_CHECKING:
    from xenmig.target.core import MigrationTarget


@implementer(ITargetContext)
class TargetContext:
    """What a target device gets from the framework."""

    def __init__(
        self,
        target: MigrationTarget,
        migrationId: str,
        domain: str,
        peer: str,
        name: str,
        roots: tuple[FilePath, ...] | None = None,
    ) -> None:
        self.reactor = target.reactor
        self.migrationId = migrationId
        self.domain = domain
        self.peer = peer
        self.stagingDir = target.stagingRoot.child(migrationId).child(name)
        self.externalStaging: list[str] = []
        self._target = target
        self._name = name
        self.roots = roots or target.config.roots

    def runInThread(self, function: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return self._target.runInThread(function, *args, **kw)

    def resolveDestination(self, path: str) -> FilePath:
        return resolveDestination(path, self.roots)

    def stagingPathFor(self, destination: FilePath, suffix: str = "") -> FilePath:
        name = f"{self._name}{suffix}.part"
        try:
            sameDevice = (
                os.stat(self.stagingDir.path).st_dev
                == os.stat(destination.dirname()).st_dev
            )
        except OSError:
            sameDevice = False
        if sameDevice:
            return self.stagingDir.child(name)
        path = destination.sibling(
            f".{destination.basename()}.xenmig-{self.migrationId}{suffix}.part"
        )
        self.externalStaging.append(path.path)
        return path
