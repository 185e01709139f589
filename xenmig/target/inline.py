"""
Small states on the control connection: a device's stream carried in
StreamRecords commands instead of a stream connection of its own.

A vTPM's state is a few KiB; a stream connection costs a TLS handshake and a
thread on each side, more than moving the state.  So a target offers, at
Prepare, to take the streams of devices of up to L{xenmig.limits.INLINE_OFFER}
bytes on the control connection.  The source sends the bytes a stream
connection would carry after StartStream (the stream header, then the
records), in chunks; each command names the chunk's offset in the stream and
is answered once its records are handed to the device, so the answer is the
stream's back-pressure, and a chunk asked again (its answer was lost with the
connection, in a resumable session) takes nothing twice.  Parsing,
verification and the session's bookkeeping are those of a stream connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, DeferredLock
from twisted.internet.task import deferLater

from xenmig.errors import StreamError, XenmigError
from xenmig.model import ContentDigest
from xenmig.pump import TokenBucket
from xenmig.records import EndRecord, RecordParser
from xenmig.target.session import TargetSession

#: How long the answer to the piece holding END waits for the device's
#: verification (seconds): a vTPM's takes milliseconds, and its digest in the
#: answer spares the source its DeviceReady round trip.
VERIFY_WAIT = 1.0


class InlineStream:
    """
    The stream of one device that arrives in StreamRecords commands: parsed
    as a stream connection's bytes are, and handed to the session in order.
    """

    def __init__(
        self,
        session: TargetSession,
        device: str,
        charge: Callable[[int], None] | None = None,
        bandwidth: TokenBucket | None = None,
    ) -> None:
        self.session = session
        self.device = device
        self.charge = charge
        self.bandwidth = bandwidth
        self.parser = RecordParser()
        #: Bytes of the stream taken so far.
        self.taken = 0
        self.ended = False
        self._lock = DeferredLock()

    async def feed(self, offset: int, data: bytes) -> int:
        """
        Take the bytes of the stream at ``offset`` (those already taken are
        skipped); how many bytes of the stream are taken, once its records
        were handed to the device.

        @raise StreamError: a gap before ``offset``, or bytes after END.
        @raise XenmigError: what the session or the device refused (the
            session then aborts, as when a stream connection's record fails).
        """
        await self._lock.acquire()
        try:
            return await self._feed(offset, data)
        finally:
            self._lock.release()

    async def _feed(self, offset: int, data: bytes) -> int:
        if offset > self.taken:
            raise StreamError(
                f"device {self.device}: a chunk of its state at byte {offset} "
                f"came after only {self.taken} bytes"
            )
        fresh = data[self.taken - offset :]
        if not fresh:
            return self.taken  # asked again: its answer was lost
        if self.ended:
            raise StreamError(f"device {self.device}: data after the END record")
        session = self.session
        if self.taken == 0:
            session.streamStarted(self.device)
        if self.bandwidth is not None:
            delay = self.bandwidth.take(len(fresh))
            if delay > 0:
                await deferLater(session.clock, delay, lambda: None)
        try:
            if self.charge is not None:
                self.charge(len(fresh))
            records = self.parser.feed(fresh)
            self.taken += len(fresh)
            for record in records:
                if isinstance(record, EndRecord):
                    if record is not records[-1] or self.parser.buffered:
                        raise StreamError(
                            f"device {self.device}: data after the END record"
                        )
                    self.ended = True
                    session.streamEnded(self.device, record)
                    break
                waiting = session.recordReceived(self.device, record)
                if waiting is not None:
                    await waiting
        except XenmigError as e:
            self.ended = True
            session.deviceFailed(self.device, e)
            if isinstance(e, StreamError) and f"device {self.device}" not in str(e):
                raise StreamError(f"device {self.device}: {e}") from e
            raise
        return self.taken


class InlineTarget:
    """StreamRecords, as the target core answers it (a part of it)."""

    bandwidth: TokenBucket | None

    def session(self, migrationId: str, peer: str | None = None) -> TargetSession:
        raise NotImplementedError()

    def authorize(self, peer: str, fingerprint: str = "") -> Any:
        raise NotImplementedError()

    def chargeStream(self, migrationId: str) -> Callable[[int], None]:
        raise NotImplementedError()

    async def streamRecords(
        self,
        peer: str,
        migrationId: str,
        device: str,
        offset: int,
        data: bytes,
        fingerprint: str = "",
    ) -> tuple[int, ContentDigest | None]:
        """
        See L{InlineStream.feed}: the bytes of the stream taken; and, once its
        END is taken, the device's verified digest (L{verifiedSoon}).
        """
        self.authorize(peer, fingerprint)
        session = self.session(migrationId, peer)
        session.checkActive()
        slot = session.device(device)
        if slot.inline is None:
            if slot.streaming or offset > 0:
                raise StreamError(
                    f"device {device}: its state comes on a stream connection"
                    if slot.streaming
                    else f"device {device}: its state began at byte {offset}"
                )
            slot.inline = InlineStream(
                session, device, self.chargeStream(migrationId), self.bandwidth
            )
        taken = await slot.inline.feed(offset, data)
        if not slot.inline.ended:
            return taken, None
        return taken, await verifiedSoon(session, device)


async def verifiedSoon(
    session: TargetSession, device: str, seconds: float = VERIFY_WAIT
) -> ContentDigest | None:
    """
    The digest ``device`` verified to, if it does within ``seconds`` (else
    None: the source asks DeviceReady, as after a stream connection).

    @raise XenmigError: the session aborted meanwhile (a digest mismatch...).
    """
    ready = session.awaitReady(device)
    timer = session.clock.callLater(seconds, ready.cancel)
    try:
        return await ready
    except CancelledError:
        return None
    finally:
        if timer.active():
            timer.cancel()
