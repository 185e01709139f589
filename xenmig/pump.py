"""Queued work handed to the thread pool in bounded batches, with backpressure;
and the token bucket that paces streams to a bandwidth."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from xenmig.model import MIN_BANDWIDTH

Item = TypeVar("Item")


class Backpressure:
    """
    How much is queued, against a high and a low water mark, and the writers
    waiting for room.

    A writer that finds more than ``highWater`` queued gets a Deferred that fires
    once the queue is down to ``lowWater``.  The count may be changed from any
    thread (a consumer thread takes from the queue); waiters are made, fired and
    failed in the reactor thread only.
    """

    def __init__(self, highWater: int, lowWater: int) -> None:
        self.highWater = highWater
        self.lowWater = lowWater
        self._lock = threading.Lock()
        self._queued = 0  # guarded by _lock
        self._waiters: list[Deferred[None]] = []  # guarded by _lock

    @property
    def queued(self) -> int:
        """What is queued now (in the weight the owner counts: bytes, usually)."""
        return self._queued

    def add(self, weight: int) -> None:
        """``weight`` more was queued."""
        with self._lock:
            self._queued += weight

    def remove(self, weight: int) -> bool:
        """
        ``weight`` left the queue (any thread); whether writers now wait that
        may go on: then call L{release} in the reactor thread.
        """
        with self._lock:
            self._queued -= weight
            return self._queued <= self.lowWater and bool(self._waiters)

    def wait(self) -> Deferred[None] | None:
        """A Deferred for a writer to wait on while the queue is too full, else None."""
        with self._lock:
            if self._queued <= self.highWater:
                return None
            waiter: Deferred[None] = Deferred()
            self._waiters.append(waiter)
            return waiter

    def release(self) -> None:
        """Let the waiting writers go on, if the queue is down to the low mark."""
        with self._lock:
            if self._queued > self.lowWater:
                return
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def fail(self, failure: Failure) -> None:
        """Fail every waiting writer with ``failure`` (nothing more will drain)."""
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)


class BatchPump(Generic[Item]):
    """
    Items queued in the reactor thread and handed, in order, to ``process`` in
    the thread pool: in batches of up to ``maxBatch`` (by ``weigh``), one batch
    at a time, so the queue keeps filling while a batch is processed.

    L{put} returns a Deferred (backpressure) while more than ``highWater`` waits,
    so memory stays bounded.  The items are handed over as they are, not copied.
    When a batch fails the pump stops: what is queued is dropped, the waiting
    writers fail, and ``onFailure`` is called.
    """

    def __init__(
        self,
        runInThread: Callable[..., Deferred[Any]],
        process: Callable[[list[Item]], object],
        weigh: Callable[[Item], int],
        highWater: int,
        lowWater: int,
        maxBatch: int,
        onFailure: Callable[[Failure], object] | None = None,
    ) -> None:
        self._runInThread = runInThread
        self._process = process
        self._weigh = weigh
        self.maxBatch = maxBatch
        self._onFailure = onFailure
        self._room = Backpressure(highWater, lowWater)
        self._queue: deque[Item] = deque()
        self._inflight: Deferred[None] | None = None
        self._failure: Failure | None = None
        self._idleWaiters: list[Deferred[None]] = []

    @property
    def failure(self) -> Failure | None:
        """Why the pump stopped: a batch's failure, or the reason given to L{stop}."""
        return self._failure

    def put(self, item: Item) -> Deferred[None] | None:
        """
        Queue ``item``; a Deferred if the caller should wait before the next.

        @raise Exception: the pump's L{failure}, once it has stopped.
        """
        if self._failure is not None:
            self._failure.raiseException()
        self._queue.append(item)
        self._room.add(self._weigh(item))
        self._pump()
        return self._room.wait()

    def stop(self, reason: Failure) -> None:
        """
        Start no more batches: drop what is queued and fail the waiting writers
        (with the first reason the pump stopped for).  A batch under way runs on;
        L{whenIdle} waits for it.
        """
        if self._failure is None:
            self._failure = reason
        self._drop()
        self._settle()

    def whenIdle(self) -> Deferred[None]:
        """
        A Deferred that fires once no batch is in the thread pool and none is
        to come (everything processed, or the pump stopped); it never fails:
        see L{failure}.
        """
        if self._idle:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idleWaiters.append(waiter)
        return waiter

    @property
    def _idle(self) -> bool:
        return self._inflight is None and (not self._queue or self._failure is not None)

    def _pump(self) -> None:
        if self._inflight is not None or not self._queue or self._failure is not None:
            return
        batch: list[Item] = []
        weight = 0
        while self._queue and weight < self.maxBatch:
            item = self._queue.popleft()
            batch.append(item)
            weight += self._weigh(item)
        self._inflight = self._runInThread(self._process, batch)
        self._inflight.addCallbacks(self._processed, self._failed, (weight,))

    def _processed(self, _: object, weight: int) -> None:
        self._inflight = None
        if self._room.remove(weight):
            self._room.release()
        self._pump()
        self._settle()

    def _failed(self, failure: Failure) -> None:
        self._inflight = None
        self._failure = failure
        self._drop()
        self._settle()
        if self._onFailure is not None:
            self._onFailure(failure)

    def _drop(self) -> None:
        """Forget what is queued; the writers waiting for room fail."""
        self._room.remove(sum(self._weigh(item) for item in self._queue))
        self._queue.clear()
        assert self._failure is not None
        self._room.fail(self._failure)

    def _settle(self) -> None:
        if self._idle:
            waiters, self._idleWaiters = self._idleWaiters, []
            for waiter in waiters:
                waiter.callback(None)


class TokenBucket:
    """
    A bandwidth in bytes per second that several streams share: a token bucket
    that lends.

    Tokens accrue at ``rate`` per second, up to ``burst``.  A stream takes what
    it sends (or has just read) with L{take}: the count is always granted, even
    into debt, and the answer is how many seconds the stream waits before it
    sends (or reads) again: until the debt is paid.  A take made while others
    wait queues behind their debt, and each stream waits out its own take before
    the next, so the streams that have something to send take turns (a turn is
    one record or one read, at most about a mebibyte); a stream with nothing to
    send takes nothing and its share goes to the others.

    Any thread may take; nothing here sleeps or needs a timer: the caller waits
    (L{paced} in the reactor; a sender thread on an event).
    """

    def __init__(
        self,
        rate: int,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate < MIN_BANDWIDTH:
            raise ValueError(f"a bandwidth is at least {MIN_BANDWIDTH} bytes/s")
        self.rate = rate
        #: What may go at once after an idle spell: 50 ms of the rate.
        self.burst = burst if burst is not None else max(64 * 1024, rate // 20)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(self.burst)  # guarded by _lock; negative: debt
        self._stamp = clock()  # guarded by _lock

    def take(self, count: int) -> float:
        """Take ``count`` bytes' tokens; the seconds to wait before the next take."""
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._stamp)
            self._stamp = now
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._tokens -= count
            return -self._tokens / self.rate if self._tokens < 0 else 0.0


def paced(
    bucket: TokenBucket, count: int, clock: IReactorTime
) -> Deferred[None] | None:
    """
    Take ``count`` from ``bucket`` in the reactor: None if the caller may go on,
    else a Deferred that fires once the debt is paid (a timer: cancelling the
    Deferred cancels it).
    """
    delay = bucket.take(count)
    if delay <= 0:
        return None
    call: list[IDelayedCall] = []

    def cancel(_: Deferred[None]) -> None:
        if call and call[0].active():
            call[0].cancel()

    waiter: Deferred[None] = Deferred(cancel)
    call.append(clock.callLater(delay, waiter.callback, None))
    return waiter
