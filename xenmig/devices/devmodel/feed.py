"""The ``devmodel`` kind's feed: the stream into the incoming QEMU as it arrives."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig.clients.qmp import QEMUMigrationFailed
from xenmig.digest import ContentHasher
from xenmig.errors import DeviceError, StreamError
from xenmig.model import ContentDigest

#: Bytes the reactor may hold for QEMU before the stream's receiver waits, and
#: the most one write to QEMU's socket hands over: Twisted's 64 KiB and 128 KiB
#: meant a pause and a resume of the stream for nearly every record.
WRITE_BUFFER = 2 * 1024 * 1024
#: The kernel's buffer of the socket QEMU reads (larger: fewer wake-ups of QEMU).
SOCKET_BUFFER = 1024 * 1024


@implementer(IPushProducer)
class IncomingFeed(Protocol):
    """
    Writes the device's DATA records, in order, into one end of a socketpair
    whose other end the incoming QEMU reads (``migrate-incoming fd:``), and
    hashes them on the way.  ``write`` returns a Deferred that fires once the
    reactor's buffer drained below its mark: the stream's receiver waits on
    it, so memory stays bounded when QEMU loads slower than the data arrives.
    """

    transport: Any

    def __init__(self, name: str) -> None:
        self.name = name
        self.hasher = ContentHasher()
        self.offset = 0
        self.lost: Failure | None = None
        self._paused = False
        self._waiting: Deferred[None] | None = None

    @classmethod
    def open(cls, reactor: Any, name: str) -> tuple[IncomingFeed, socket.socket]:
        """A feed and the socket end to pass to QEMU (the caller closes it)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        feed = cls(name)
        try:
            reactor.adoptStreamConnection(
                mine.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: feed)
            )
        finally:
            mine.close()  # the reactor holds its own duplicate
        return feed, theirs

    def connectionMade(self) -> None:
        self.transport.bufferSize = WRITE_BUFFER
        self.transport.SEND_LIMIT = WRITE_BUFFER
        self.transport.registerProducer(self, True)

    # IPushProducer: the transport says when its buffer is too full.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        pass

    def write(self, offset: int, data: bytes) -> Deferred[None]:
        """Hand ``data`` (at ``offset``, which must follow on) to QEMU."""
        if self.lost is not None:
            return fail(self._lostError())
        if offset != self.offset:
            return fail(
                StreamError(
                    f"devmodel device {self.name}: data at offset {offset}, "
                    f"expected {self.offset} (QEMU's stream runs in order)"
                )
            )
        self.hasher.update(offset, data)
        self.offset += len(data)
        self.transport.write(bytes(data))  # records may carry memoryviews
        if not self._paused:
            return succeed(None)
        self._waiting = Deferred()
        return self._waiting

    def close(self) -> None:
        """No more data: QEMU reads to the end of what was written."""
        if self.lost is None:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Cut QEMU's stream off (its load fails)."""
        if self.lost is None and self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(self._lostError())

    def _lostError(self) -> DeviceError:
        return QEMUMigrationFailed(
            "the target QEMU stopped reading the state (it exited, or closed the "
            "stream; QEMU prints its reason on its standard error)"
        )

    def digest(self) -> ContentDigest:
        return self.hasher.result()
