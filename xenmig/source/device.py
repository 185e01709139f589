"""A device in a source migration: what the framework offers it, and keeps of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from xenmig.errors import MigrationAborted
from xenmig.interfaces import IConvergencePolicy, ISourceContext, ISourceDevice
from xenmig.model import ContentDigest, DeviceDescription, DeviceSpec
from xenmig.source.inlinestream import InlineStream
from xenmig.source.resumable import ResumableStream
from xenmig.source.streamsender import StreamSender
from xenmig.source.threadedstream import ThreadedStreamSender

#: What a device's stream is written through.
Sender = StreamSender | ThreadedStreamSender | ResumableStream | InlineStream


class PeerCalls(Protocol):
    """What a device's context uses of its migration: its names and the peer."""

    migrationId: str
    domain: str

    def callPeer(
        self, device: str, method: str, payload: dict[str, Any]
    ) -> Deferred[dict]:
        """A handler-scoped request to the peer target device of ``device``."""


@implementer(ISourceContext)
class SourceContext:
    """What a source device gets from the framework."""

    def __init__(self, migration: PeerCalls | None, reactor: Any, name: str) -> None:
        self.reactor = reactor
        self.migration = migration
        self.name = name

    @property
    def migrationId(self) -> str:
        return self.migration.migrationId if self.migration else ""

    @property
    def domain(self) -> str:
        return self.migration.domain if self.migration else ""

    def runInThread(self, function: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), function, *args, **kw
        )

    def callPeer(self, method: str, payload: dict[str, Any]) -> Deferred[dict]:
        if self.migration is None:
            raise MigrationAborted("the device has not been accepted by a target")
        return self.migration.callPeer(self.name, method, payload)


@dataclass
class DeviceRun:
    """One device of a source migration: its handler, stream and figures."""

    spec: DeviceSpec
    device: ISourceDevice
    description: DeviceDescription | None = None
    sender: Sender | None = None
    rounds: list[int] | None = None
    #: Its own copy of the pre-copy convergence policy.
    policy: IConvergencePolicy | None = None
    #: The handler's own figures of each pre-copy round (L{RoundResult.figures}).
    roundFigures: list[dict[str, Any]] | None = None
    digest: ContentDigest | None = None
    started: float | None = None
    finished: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def bytesSent(self) -> int:
        return self.sender.bytesWritten if self.sender else 0

    @property
    def resent(self) -> tuple[int, int]:
        """Its stream's bytes sent again after breaks, and the breaks survived."""
        sender = self.sender
        if isinstance(sender, ResumableStream):
            return sender.resent, sender.reconnections
        return 0, 0

    async def sendFinal(self) -> ContentDigest:
        """The final round on its open stream: the ROUND marker, the state, END."""
        assert self.sender is not None
        await self.sender.writeRound(len(self.rounds or []), True)
        digest = await self.device.sendFinal(self.sender)
        await self.sender.finish(digest)
        return digest
