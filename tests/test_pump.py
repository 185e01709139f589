"""The shared batch pump, its backpressure, and the tracked thread-pool calls."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from xenmig.errors import DeviceError
from xenmig.pump import Backpressure, BatchPump
from xenmig.threads import ThreadCalls


class ManualPool:
    """A thread pool stand-in: each call waits until the test runs it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((function, args, d))
        return d

    def runNext(self) -> None:
        """Run the oldest waiting call, as a pool thread would, and report it."""
        function, args, d = self.calls.pop(0)
        try:
            result = function(*args)
        except Exception:
            d.errback(Failure())
        else:
            d.callback(result)


def results(d: Deferred[Any] | None) -> list[Any]:
    outcomes: list[Any] = []
    if d is not None:
        d.addBoth(outcomes.append)
    return outcomes


def makePump(pool: ManualPool, processed: list[list[int]], **kw: Any) -> BatchPump[int]:
    settings: dict[str, Any] = {"highWater": 10, "lowWater": 4, "maxBatch": 3, **kw}
    return BatchPump(pool, processed.append, lambda item: item, **settings)


# -- Backpressure ----------------------------------------------------------------------


def test_backpressureWaitsAboveHighWaterUntilLowWater() -> None:
    """A writer waits once more than the high mark is queued, until the low mark."""
    room = Backpressure(highWater=10, lowWater=4)
    room.add(10)
    assert room.wait() is None
    room.add(1)
    waiting = results(room.wait())
    assert room.remove(5) is False  # 6 left: above the low mark
    room.release()
    assert waiting == []
    assert room.remove(2) is True
    room.release()
    assert waiting == [None] and room.queued == 4


def test_backpressureFailsWaiters() -> None:
    """Failing the room fails every waiting writer with the reason."""
    room = Backpressure(highWater=1, lowWater=0)
    room.add(5)
    waiting = results(room.wait())
    room.fail(Failure(DeviceError("gone")))
    [failure] = waiting
    assert failure.check(DeviceError) and failure.getErrorMessage() == "gone"


def test_backpressureRemoveFromAnotherThread() -> None:
    """The count drains from another thread; the reactor then releases the writer."""
    room = Backpressure(highWater=2, lowWater=0)
    room.add(3)
    waiting = results(room.wait())
    answers: list[bool] = []
    thread = threading.Thread(target=lambda: answers.append(room.remove(3)))
    thread.start()
    thread.join()
    assert answers == [True]
    room.release()
    assert waiting == [None]


# -- BatchPump -------------------------------------------------------------------------


def test_pumpProcessesInOrderInBoundedBatches() -> None:
    """Items reach the pool in order, one batch at a time, each up to maxBatch."""
    pool, processed = ManualPool(), list[list[int]]()
    pump = makePump(pool, processed)
    for item in [1, 1, 1, 1, 2]:
        assert pump.put(item) is None
    assert len(pool.calls) == 1  # one batch in flight, the rest queued
    while pool.calls:
        pool.runNext()
    assert processed == [[1], [1, 1, 1], [2]]
    idle = results(pump.whenIdle())
    assert idle == [None] and pump.failure is None


def test_pumpAsksWritersToWaitAndReleasesThem() -> None:
    """put returns a Deferred above the high mark; it fires once drained low."""
    pool, processed = ManualPool(), list[list[int]]()
    pump = makePump(pool, processed, maxBatch=100)
    assert pump.put(6) is None
    waiting = results(pump.put(6))  # 12 queued
    assert waiting == []
    pool.runNext()  # the first batch, [6]: 6 queued, above the low mark
    assert waiting == []
    pool.runNext()  # [6]
    assert waiting == [None] and processed == [[6], [6]]


def test_pumpStopsWhenABatchFails() -> None:
    """A failing batch stops the pump: queue dropped, writers and later puts fail."""
    failures: list[Failure] = []

    def process(batch: list[int]) -> None:
        raise DeviceError("disk full")

    pool = ManualPool()
    pump = BatchPump(pool, process, lambda i: i, 4, 1, 2, failures.append)
    pump.put(3)
    waiting = results(pump.put(3))
    pool.runNext()
    [failure] = failures
    assert pump.failure is failure
    assert waiting[0].value is failure.value
    assert pool.calls == []  # the queued item was dropped
    assert results(pump.whenIdle()) == [None]
    with pytest.raises(DeviceError, match="disk full"):
        pump.put(1)


def test_pumpStopWaitsForTheBatchUnderWay() -> None:
    """stop drops the queue and fails writers; whenIdle waits for the running batch."""
    pool, processed = ManualPool(), list[list[int]]()
    pump = makePump(pool, processed, maxBatch=1)
    pump.put(5)
    pump.put(5)
    waiting = results(pump.put(5))
    pump.stop(Failure(DeviceError("discarded")))
    assert waiting[0].getErrorMessage() == "discarded"
    idle = results(pump.whenIdle())
    assert idle == []
    pool.runNext()
    assert idle == [None] and processed == [[5]] and pool.calls == []
    assert pump.failure is not None and pump.failure.getErrorMessage() == "discarded"


# -- ThreadCalls -----------------------------------------------------------------------


def test_threadCallsTrackACancelledCallUntilItReturns() -> None:
    """A cancelled call is still waited for: its thread runs until it returns."""
    pool = ManualPool()
    calls = ThreadCalls(pool)
    d = calls.run(lambda x: x * 2, 21)
    d.cancel()
    assert results(d)[0].check(CancelledError)
    assert calls.running == 1
    idle = results(Deferred.fromCoroutine(calls.idle()))
    assert idle == []
    pool.runNext()
    assert idle == [None] and calls.running == 0


def test_threadCallsDeliverResultsToTheirCallers() -> None:
    """Each call's result or failure goes to its caller; idle never fails."""
    pool = ManualPool()
    calls = ThreadCalls(pool)
    good = results(calls.run(lambda: "done"))
    bad = results(calls.run(lambda: 1 / 0))
    idle = results(Deferred.fromCoroutine(calls.idle()))
    pool.runNext()
    pool.runNext()
    assert good == ["done"] and bad[0].check(ZeroDivisionError)
    assert idle == [None]
