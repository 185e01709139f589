"""The source end of a state stream: records written with producer backpressure."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig.interfaces import IRecordWriter
from xenmig.model import ContentDigest
from xenmig.records import encodeEnd, encodeKeepalive, encodeStreamHeader
from xenmig.source.framing import RecordFraming


@implementer(IRecordWriter, IPushProducer)
class StreamSender(RecordFraming, Protocol):
    """
    Writes one device's records to its stream connection.

    It registers itself as a streaming producer of the transport: when the
    transport's buffer fills, writes return Deferreds that fire only once the
    transport drains, so the device stops reading its source meanwhile.  When
    the device writes nothing for ``keepalive`` seconds (the toolstack pausing
    the VM, a slow component), it sends a KEEPALIVE record so that the target's
    idle time-out measures the network, not the device.
    """

    transport: Any  # ITCPTransport & IProducer once connected

    def __init__(
        self, device: str, clock: IReactorTime | None = None, keepalive: float = 10.0
    ) -> None:
        super().__init__(device)
        self.clock = clock
        self.keepaliveInterval = keepalive
        self._timer: LoopingCall | None = None
        self._wrote = False
        self.opened: Deferred[StreamSender] = Deferred()
        self._paused = False
        self._waiters: list[Deferred[None]] = []
        self._disconnected = False

    # -- protocol and producer ------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.transport.write(encodeStreamHeader())
        if self.clock is not None and self.keepaliveInterval > 0:
            self._timer = LoopingCall(self._tick)
            self._timer.clock = self.clock
            self._timer.start(self.keepaliveInterval, now=False)
        self.opened.callback(self)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not self._paused:
                waiter.callback(None)
            else:
                self._waiters.append(waiter)

    def stopProducing(self) -> None:
        self._paused = True

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self._disconnected = True
        self._stopTimer()
        if self._done and not self._waiters:
            return
        self._lose(reason.getErrorMessage())

    def _failWaiting(self, failure: Failure) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)

    # -- IRecordWriter ----------------------------------------------------------------

    def _send(self, parts: list[bytes]) -> Deferred[None]:
        self.transport.writeSequence(parts)
        self._wrote = True
        if not self._paused:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _tick(self) -> None:
        if not self._wrote:
            self.keepalive()
        self._wrote = False

    def _stopTimer(self) -> None:
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = None

    def keepalive(self) -> None:
        """Reset the target's idle timer: a KEEPALIVE record, unless paused."""
        if self._lost is None and not self._done and not self._paused:
            self.transport.writeSequence(encodeKeepalive())

    def finish(self, digest: ContentDigest) -> Deferred[None]:
        """
        Write the END record and close the stream once the transport has flushed
        it.  Whether it arrived intact, the target says in its DeviceReady answer.
        """
        if self._lost is not None:
            return fail(self._lost)
        self.transport.writeSequence(
            encodeEnd(digest.size, digest.algorithm, digest.digest)
        )
        self._done = True
        self._stopTimer()
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        return succeed(None)

    def abort(self) -> None:
        """Drop the stream at once (the migration is being aborted)."""
        self._done = True
        self._stopTimer()
        # A TLS transport whose connection is gone fails in abortConnection.
        if self.transport is not None and not self._disconnected:
            self.transport.abortConnection()
