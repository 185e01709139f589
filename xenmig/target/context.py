"""What the framework gives a target device: threads, staging, destinations."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from twisted.python.filepath import FilePath
from zope.interface import implementer

from xenmig.destinations import resolveDestination
from xenmig.interfaces import ITargetContext


class ContextHost(Protocol):
    """What a device's context uses of the target: its reactor, threads, staging."""

    @property
    def reactor(self) -> Any: ...
    @property
    def stagingRoot(self) -> FilePath: ...
    @property
    def config(self) -> Any: ...

    def runInThread(self, function: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run blocking ``function`` in the I/O thread pool; a Deferred."""


@implementer(ITargetContext)
class TargetContext:
    """What a target device gets from the framework."""

    def __init__(
        self,
        target: ContextHost,
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
        self.installAs = target.config.installAs

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
