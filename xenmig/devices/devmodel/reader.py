"""The ``devmodel`` kind's stream reader: QEMU's migration stream into DATA records."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from xenmig.digest import ContentHasher
from xenmig.interfaces import IRecordWriter
from xenmig.model import ContentDigest

#: The most bytes of QEMU's stream one read takes (one DATA record): Twisted's
#: 64 KiB meant a read, a record and a thread hop per 64 KiB.
READ_SIZE = 1024 * 1024
#: The send buffer asked for QEMU's end of the socket (Linux doubles it: 1 MiB),
#: the most its writes put ahead of the reader (they count as sent in QEMU's
#: estimate of its rate); Linux's default holds some 220 KiB.
SOCKET_BUFFER = 512 * 1024


class StateReader(Protocol):
    """
    Reads the migration stream QEMU writes into one end of a socketpair and
    writes it on as DATA records, hashing it on the way.  While the writer holds
    back (its Deferred is pending) the socket is not read, so QEMU blocks: memory
    stays bounded whatever the size of the state.
    """

    transport: Any

    def __init__(self, writer: IRecordWriter) -> None:
        self.writer = writer
        self.hasher = ContentHasher()
        self.offset = 0
        self.failure: Failure | None = None
        self.ended = False
        self._pending = 0
        self._paused = False
        self._waiters: list[Deferred[None]] = []

    @classmethod
    def open(
        cls, reactor: Any, writer: IRecordWriter
    ) -> tuple[StateReader, socket.socket]:
        """A reader and the socket end to pass to QEMU (the caller closes it)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader = cls(writer)
        try:
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            reactor.adoptStreamConnection(
                mine.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: reader)
            )
        except BaseException:
            theirs.close()
            raise
        finally:
            mine.close()  # the reactor holds its own duplicate
        return reader, theirs

    def connectionMade(self) -> None:
        self.transport.bufferSize = READ_SIZE

    def dataReceived(self, data: bytes) -> None:
        if self.failure is not None:
            return
        self.hasher.update(self.offset, data)
        offset, self.offset = self.offset, self.offset + len(data)
        self._pending += 1
        self.writer.writeData(offset, data).addBoth(self._written)
        if self._pending and not self._paused and not self.ended:
            self._paused = True
            self.transport.pauseProducing()

    def _written(self, result: object) -> None:
        self._pending -= 1
        if isinstance(result, Failure):
            if self.failure is None:
                self.failure = result
                if not self.ended:
                    # Closing our end makes QEMU's write fail: its migration ends.
                    self.transport.abortConnection()
        elif self._pending == 0 and self._paused and not self.ended:
            self._paused = False
            self.transport.resumeProducing()
        self._settle()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = True
        if self.failure is None and not reason.check(ConnectionDone):
            self.failure = reason
        self._settle()

    def _settle(self) -> None:
        if self.ended and self._pending == 0:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if self.failure is not None:
                    waiter.errback(self.failure)
                else:
                    waiter.callback(None)

    def waiting(self) -> int:
        """Bytes QEMU wrote that this reader has not read yet (0 if unknown)."""
        try:
            fd = self.transport.fileno()
            answer = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
        except (AttributeError, OSError, ValueError):
            return 0  # no socket (any more)
        (count,) = struct.unpack("i", answer)
        return int(count)

    def whenDone(self) -> Deferred[None]:
        """Fires once QEMU closed its end and the writer took every byte."""
        d: Deferred[None] = Deferred(self._waiters.remove)
        self._waiters.append(d)
        self._settle()
        return d

    def abort(self) -> None:
        """Stop reading (QEMU's next write fails)."""
        if not self.ended and self.transport is not None:
            self.transport.abortConnection()

    def digest(self) -> ContentDigest:
        return self.hasher.result()
