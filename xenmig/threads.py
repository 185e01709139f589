"""Thread-pool calls tracked until they return, so that closing can wait for them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList

T = TypeVar("T")


class ThreadCalls:
    """
    The calls an owner has started in the thread pool and that have not yet
    returned.  An owner whose calls use a resource (an open file) waits with
    L{idle} before it closes it: a cancelled call's thread still runs.
    """

    def __init__(self, runInThread: Callable[..., Deferred[Any]]) -> None:
        self._runInThread = runInThread
        self._running: set[Deferred[Any]] = set()

    @property
    def running(self) -> int:
        """How many calls have not returned."""
        return len(self._running)

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Call ``function(*args)`` in the thread pool; a Deferred that fires with
        its result.  Cancelling it stops the wait, not the thread: the call stays
        tracked until it returns.
        """
        work = self._runInThread(function, *args)
        self._running.add(work)
        result: Deferred[T] = Deferred()

        def returned(outcome: Any) -> Any:
            self._running.discard(work)
            return outcome

        work.addBoth(returned).chainDeferred(result)
        return result

    async def idle(self) -> None:
        """
        Wait until every call has returned, those started meanwhile too; their
        results and failures go to their own callers, not here.
        """
        while self._running:
            await DeferredList(list(self._running), consumeErrors=True)
