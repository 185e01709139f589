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
from xenmig.pump import TokenBucket, paced
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
    idle time-out measures the network, not the device.  With a ``bandwidth``
    (a L{TokenBucket} its migration's streams share), each write's Deferred
    also waits until the bucket allows the next (needs a ``clock``).
    """

    transport: Any  # ITCPTransport & IProducer once connected
    #: Bytes written but not yet handed over (the transport's buffer is not told).
    unsent = 0

    def __init__(
        self,
        device: str,
        clock: IReactorTime | None = None,
        keepalive: float = 10.0,
        bandwidth: TokenBucket | None = None,
    ) -> None:
        super().__init__(device)
        self.bandwidth = bandwidth
        #: A write waiting out the bandwidth: its timer, and the writer's Deferred.
        self._throttle: tuple[Deferred[None], Deferred[None]] | None = None
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
        if self._done and not self._waiters and self._throttle is None:
            return
        self._lose(reason.getErrorMessage())

    def _failWaiting(self, failure: Failure) -> None:
        waiters, self._waiters = self._waiters, []
        if self._throttle is not None:
            (timer, writer), self._throttle = self._throttle, None
            timer.cancel()
            waiters.append(writer)
        for waiter in waiters:
            waiter.errback(failure)

    # -- IRecordWriter ----------------------------------------------------------------

    def _send(self, parts: list[bytes]) -> Deferred[None]:
        self.transport.writeSequence(parts)
        self._wrote = True
        if self.bandwidth is not None and self.clock is not None:
            throttle = paced(self.bandwidth, sum(map(len, parts)), self.clock)
            if throttle is not None:
                return self._throttled(throttle)
        return self._room()

    def _room(self) -> Deferred[None]:
        """Fires once the transport takes more (at once unless it is paused)."""
        if not self._paused:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    @property
    def pacing(self) -> bool:
        """Whether a write waits out the bandwidth limit (not a stall)."""
        return self._throttle is not None

    def _throttled(self, throttle: Deferred[None]) -> Deferred[None]:
        """A write's Deferred that waits out the bandwidth, then the transport."""
        waiter: Deferred[None] = Deferred()
        self._throttle = (throttle, waiter)

        def paid(_: None) -> None:
            self._throttle = None
            self._room().chainDeferred(waiter)

        # Cancelled only by _failWaiting, which fails the writer itself.
        throttle.addCallbacks(paid, lambda _: None)
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
