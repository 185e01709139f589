"""The ``devmodel`` kind's feed: the stream into the incoming QEMU as it arrives."""

from __future__ import annotations

import queue
import socket
import threading
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from xenmig.clients.qmp import QEMUMigrationFailed
from xenmig.digest import ContentHasher
from xenmig.errors import DeviceError, StreamError
from xenmig.model import ContentDigest
from xenmig.pump import Backpressure

#: Bytes that may wait for the feed's thread before the stream's receiver
#: waits (and the mark down to which it drains before the receiver goes on).
HIGH_WATER = 4 * 1024 * 1024
LOW_WATER = 2 * 1024 * 1024
#: The kernel's buffer of the socket QEMU reads (larger: fewer wake-ups of QEMU).
SOCKET_BUFFER = 1024 * 1024
_CLOSE = object()


class IncomingFeed:
    """
    Writes the device's DATA records, in order, into one end of a socketpair
    whose other end the incoming QEMU reads (``migrate-incoming fd:``), and
    hashes them on the way.  A thread of its own sends them, blocking on the
    socket while QEMU loads, so that neither the copy into the kernel nor
    QEMU's pace holds up the reactor, which meanwhile decrypts and parses the
    next records.  ``write`` returns a Deferred that fires once what waits for
    the thread drained below its mark: the stream's receiver waits on it, so
    memory stays bounded when QEMU loads slower than the data arrives.
    """

    def __init__(self, reactor: Any, name: str, sock: socket.socket) -> None:
        self.reactor = reactor
        self.name = name
        self.hasher = ContentHasher()
        self.offset = 0
        self.lost: Failure | None = None
        self._socket = sock
        self._queue: queue.Queue[Any] = queue.Queue()
        self._room = Backpressure(HIGH_WATER, LOW_WATER)
        self._closing = False
        self._aborted = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"xenmig-feed-{name}", daemon=True
        )
        self._thread.start()

    @classmethod
    def open(cls, reactor: Any, name: str) -> tuple[IncomingFeed, socket.socket]:
        """A feed and the socket end to pass to QEMU (the caller closes it)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            return cls(reactor, name, mine), theirs
        except BaseException:
            mine.close()
            theirs.close()
            raise

    # -- the feed's thread ------------------------------------------------------------

    def _run(self) -> None:
        sock = self._socket
        try:
            while True:
                item = self._queue.get()
                if item is _CLOSE or self._aborted.is_set():
                    break
                sock.sendall(item)
                if self._room.remove(len(item)):
                    self.reactor.callFromThread(self._room.release)
        except OSError as e:
            if not self._aborted.is_set():
                self.reactor.callFromThread(self._lose, Failure(e))
        finally:
            sock.close()  # QEMU reads to the end of what was sent, then EOF

    # -- the reactor thread -----------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> Deferred[None]:
        """Hand ``data`` (at ``offset``, which must follow on) to QEMU."""
        if self.lost is not None:
            return fail(self._lostError())
        if self._closing:
            return fail(StreamError(f"devmodel device {self.name}: data after the end"))
        if offset != self.offset:
            return fail(
                StreamError(
                    f"devmodel device {self.name}: data at offset {offset}, "
                    f"expected {self.offset} (QEMU's stream runs in order)"
                )
            )
        self.hasher.update(offset, data)
        self.offset += len(data)
        # A record's data stays as it is once received (the stream's
        # receivers keep records queued for threads): no copy here.
        self._room.add(len(data))
        self._queue.put(data)
        return self._room.wait() or succeed(None)

    def close(self) -> None:
        """No more data: QEMU reads to the end of what was written."""
        if self.lost is None and not self._closing:
            self._closing = True
            self._queue.put(_CLOSE)

    def abort(self) -> None:
        """Cut QEMU's stream off (its load fails)."""
        if self._aborted.is_set():
            return
        self._aborted.set()
        self._queue.put(_CLOSE)
        try:
            # A send blocked on QEMU fails at once; QEMU sees its stream end.
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already
        self._lose(Failure(self._lostError()))

    def _lose(self, reason: Failure) -> None:
        if self.lost is None:
            self.lost = reason
            self._room.fail(Failure(self._lostError()))

    def _lostError(self) -> DeviceError:
        return QEMUMigrationFailed(
            "the target QEMU stopped reading the state (it exited, or closed the "
            "stream; QEMU prints its reason on its standard error)"
        )

    def digest(self) -> ContentDigest:
        return self.hasher.result()
