"""What every stream sender shares: framing, byte counts, and losing the stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig.errors import StreamError, StreamLost
from xenmig.interfaces import IRecordWriter
from xenmig.records import (
    encodeData,
    encodeMetadata,
    encodeRound,
    encodeZero,
)


class RecordWriting:
    """
    The record-writing methods of L{IRecordWriter} over one ``_write(parts)``
    (a framed record), counting the content's bytes: shared by the stream
    senders (L{RecordFraming}) and L{xenmig.source.resumable.ResumableStream}.
    """

    bytesWritten: int
    dataBytes: int

    def _write(self, parts: list[bytes]) -> Deferred[None]:
        raise NotImplementedError()

    def writeData(self, offset: int, data: bytes) -> Deferred[None]:
        self.bytesWritten += len(data)
        self.dataBytes += len(data)
        return self._write(encodeData(offset, data))

    def writeZero(self, offset: int, length: int) -> Deferred[None]:
        self.bytesWritten += length
        return self._write(encodeZero(offset, length))

    def writeMetadata(self, metadata: dict[str, Any]) -> Deferred[None]:
        return self._write(encodeMetadata(metadata))

    def writeRound(self, round: int, final: bool) -> Deferred[None]:
        """Mark the start of a round (a framework record)."""
        return self._write(encodeRound(round, final))


@implementer(IRecordWriter)
class RecordFraming(RecordWriting):
    """
    The L{IRecordWriter} methods and the framework's records over one
    ``_send(parts)``, which each kind of stream sender provides: framing, the
    byte counters, and refusing writes once the stream is lost or closed.

    A sender whose connection breaks calls L{_lose}: every write from then on
    fails with L{StreamLost}, and so does every writer still waiting for room
    (the sender's ``_failWaiting``).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.bytesWritten = 0
        self.dataBytes = 0
        #: Bytes of every record framed so far (KEEPALIVE records excepted).
        self.framedBytes = 0
        self._lost: Failure | None = None
        self._done = False
        #: Told once when the stream breaks (a resumable stream opens it again).
        self.onLost: Callable[[Failure], Any] | None = None

    def _send(self, parts: list[bytes]) -> Deferred[None]:
        """Send one framed record; a Deferred firing when more may be written."""
        raise NotImplementedError()

    def _failWaiting(self, failure: Failure) -> None:
        """Fail the writers waiting for room to write (the stream is lost)."""
        raise NotImplementedError()

    def _lose(self, why: str) -> Failure:
        """
        The stream broke (``why``: the connection's error): refuse every write
        from now on and fail the waiting writers; the failure they get.
        """
        self._lost = Failure(
            StreamLost(
                f"the stream of device {self.device} was lost after "
                f"{self.bytesWritten} bytes: {why}"
            )
        )
        self._failWaiting(self._lost)
        if self.onLost is not None:
            self.onLost(self._lost)
        return self._lost

    def _write(self, parts: list[bytes]) -> Deferred[None]:
        if self._lost is not None:
            return fail(self._lost)
        if self._done:
            return fail(Failure(StreamError(f"device {self.device}: stream closed")))
        self.framedBytes += sum(len(part) for part in parts)
        return self._send(parts)

    def writeRecord(self, parts: list[bytes]) -> Deferred[None]:
        """Write one record already framed (a resumable stream's replay)."""
        return self._write(parts)
