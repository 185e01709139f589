"""A small device's stream sent on the control connection (StreamRecords)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig.errors import StreamError
from xenmig.interfaces import IRecordWriter
from xenmig.limits import INLINE_CHUNK
from xenmig.model import ContentDigest
from xenmig.records import encodeEnd, encodeStreamHeader
from xenmig.source.framing import RecordFraming

#: Sends the bytes of the stream at an offset (one StreamRecords); a Deferred
#: of the answer: how many bytes of the stream the target has taken
#: (``taken``), and, once END is, maybe the device's verified digest.
Send = Callable[[int, bytes], Deferred[dict[str, Any]]]


@implementer(IRecordWriter)
class InlineStream(RecordFraming):
    """
    An L{IRecordWriter} whose records go to the target in StreamRecords
    commands on the migration's control connection, not on a connection of
    their own (see L{xenmig.target.inline}): for a device whose whole state
    is small, a stream connection's handshake costs more than its bytes.

    Records are gathered, with the stream header first, and sent once
    ``chunk`` bytes wait, and at the END record: one command at a time,
    each answered once the target handed its records to the device (the
    writer waits meanwhile: that is the back-pressure).  ``send`` does the
    asking; in a resumable session it asks again on a new connection, and
    the target takes nothing twice.
    """

    def __init__(self, device: str, send: Send, chunk: int = INLINE_CHUNK) -> None:
        super().__init__(device)
        self._send_ = send
        self.chunk = chunk
        self._pending: list[bytes] = [encodeStreamHeader()]
        self._pendingBytes = len(self._pending[0])
        #: Bytes of the stream the target has taken.
        self.bytesSent = 0
        #: The target's answer with the device's verified digest (size,
        #: algorithm, digest: DeviceReady's), if its last piece's brought it.
        self.verified: dict[str, Any] | None = None
        self._lock = DeferredLock()
        self._aborted = False

    @property
    def unsent(self) -> int:
        """Bytes written but not yet taken by the target."""
        return self._pendingBytes

    def progress(self) -> tuple[int, int]:
        """What moves while this stream makes progress (a stall watch's view)."""
        return (self.framedBytes, self.bytesSent)

    def _send(self, parts: list[bytes]) -> Deferred[None]:
        self._pending.extend(parts)
        self._pendingBytes += sum(len(part) for part in parts)
        if self._pendingBytes < self.chunk:
            return succeed(None)
        return Deferred.fromCoroutine(self._flush(whole=False))

    def _failWaiting(self, failure: Failure) -> None:
        pass  # each writer waits on its own flush, which fails by itself

    async def _flush(self, whole: bool) -> None:
        """Send what waits: whole chunks, and with ``whole`` the rest too."""
        await self._lock.acquire()
        try:
            while self._pendingBytes >= self.chunk or (whole and self._pendingBytes):
                if self._aborted:
                    raise StreamError(f"the stream of {self.device} was aborted")
                data = b"".join(self._pending)
                piece, rest = data[: self.chunk], data[self.chunk :]
                self._pending = [rest] if rest else []
                self._pendingBytes = len(rest)
                try:
                    answer = await self._send_(self.bytesSent, piece)
                    taken = int(answer["taken"])
                except BaseException:
                    self._pending.insert(0, piece)
                    self._pendingBytes += len(piece)
                    if self._lost is None and not self._aborted:
                        self._lose(Failure().getErrorMessage())
                    raise
                if taken != self.bytesSent + len(piece):
                    raise StreamError(
                        f"the target took {taken} bytes of the stream of "
                        f"{self.device}, not {self.bytesSent + len(piece)}"
                    )
                self.bytesSent = taken
                if answer.get("digest") is not None:
                    self.verified = answer
        finally:
            self._lock.release()

    def finish(self, digest: ContentDigest) -> Deferred[None]:
        """The END record, and everything still waiting, sent and taken."""
        written = self._write(encodeEnd(digest.size, digest.algorithm, digest.digest))
        self._done = True
        return written.addCallback(
            lambda _: Deferred.fromCoroutine(self._flush(whole=True))
        )

    def abort(self) -> None:
        """Send nothing more (the migration aborts)."""
        self._done = True
        self._aborted = True
