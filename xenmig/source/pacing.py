"""
How a source paces itself within the limits its target announced at Prepare,
and runs a migration's steps together.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.python.failure import Failure

from xenmig.limits import AnnouncedLimits

T = TypeVar("T")

#: Commands a source leaves free on a control connection, beyond those it
#: paces, for its commit, its abort and a status query.
COMMAND_RESERVE = 4


def handshakeSlots(limits: AnnouncedLimits) -> int:
    """
    Connections a migration opens (TLS handshakes) at once to that target: its
    share of the target's per-address handshakes when its host runs as many
    migrations there as the target's sessions allow.
    """
    return max(1, limits.handshakesPerAddress // limits.sessions)


def commandSlots(limits: AnnouncedLimits) -> int:
    """Commands (OpenStream, DeviceReady, DeviceRequest) a migration runs at once."""
    return max(1, limits.commandsInFlight - COMMAND_RESERVE)


class Slots:
    """
    At most L{size} holders at once; the others wait in their order of
    asking.  Cancelling a wait takes it out of the line; L{resize} applies
    at once (a smaller size lets the holders finish).
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.held = 0
        self._waiting: deque[Deferred[None]] = deque()

    def acquire(self) -> Deferred[None]:
        """A Deferred that fires once the caller holds a slot."""
        if self.held < self.size and not self._waiting:
            self.held += 1
            return succeed(None)
        waiter: Deferred[None] = Deferred(canceller=self._waiting.remove)
        self._waiting.append(waiter)
        return waiter

    def release(self) -> None:
        """Give a slot back."""
        self.held -= 1
        self._wake()

    def resize(self, size: int) -> None:
        self.size = max(1, size)
        self._wake()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def run(self, f: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        """``f(*args, **kw)`` awaited while holding a slot."""
        await self.acquire()
        try:
            return await f(*args, **kw)
        finally:
            self.release()

    def _wake(self) -> None:
        while self._waiting and self.held < self.size:
            self.held += 1
            self._waiting.popleft().callback(None)


async def gatherOrCancel(deferreds: list[Deferred[Any]]) -> list[Any]:
    """
    Wait for steps in parallel; the first failure cancels the rest and is
    raised as itself: unwrapped from Twisted's FirstError, also when a step
    failed with one of its own (a handler gathering steps of its own).
    """
    if not deferreds:
        return []
    try:
        return await gatherResults(deferreds, consumeErrors=True)
    except BaseException as e:
        for d in deferreds:
            d.cancel()
        inner: Failure | None = getattr(e, "subFailure", None)
        while inner is not None and isinstance(inner.value, FirstError):
            inner = inner.value.subFailure
        if inner is not None:
            inner.raiseException()
        raise
