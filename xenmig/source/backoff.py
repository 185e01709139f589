"""Retrying a step while the target is busy: jittered exponential back-off."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet import error as neterror
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from xenmig.errors import Busy

log = Logger()

T = TypeVar("T")

#: What a connection that fails before its TLS handshake completed may have
#: met: a target at its handshake limits closes it at once (a reset), and one
#: that is restarting refuses it.
CONNECTING_FAILURES: tuple[type[BaseException], ...] = (
    ConnectionError,  # the standard library's refused, reset, aborted, broken pipe
    neterror.ConnectionRefusedError,
    neterror.ConnectionClosed,
)


class NotConnected(Exception):
    """
    A connection refused or reset before its TLS handshake completed: the
    target may be at its handshake limits (or not listening).  Nothing was
    asked of it, so the step may be tried again.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error) or repr(error))
        self.error = error

    @property
    def refused(self) -> bool:
        """Whether the connection was refused (nothing listening), not reset."""
        return isinstance(
            self.error, (ConnectionRefusedError, neterror.ConnectionRefusedError)
        )


class Backoff:
    """
    The waits between attempts: ``initial`` seconds, doubling up to
    ``maximum``, each drawn between half and one and a half times that (so
    that sources refused together do not come back together), and never
    shorter than the target's own hint.
    """

    def __init__(
        self,
        initial: float = 0.25,
        maximum: float = 10.0,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.draw = draw
        self.attempts = 0

    def next(self, hint: float | None = None) -> float:
        """The wait before the next attempt (``hint``: the target's, if any)."""
        base = min(self.maximum, self.initial * 2**self.attempts)
        self.attempts += 1
        delay = base * (0.5 + self.draw())
        if hint is not None and delay < hint:
            delay = hint * (1.0 + 0.25 * self.draw())
        return delay


async def whileBusy(
    clock: IReactorTime,
    step: Callable[[], Awaitable[T]],
    busyFor: float,
    refusedFor: float,
    notice: Callable[[str], Any],
    what: str = "",
    retryRefused: bool = True,
    backoff: Backoff | None = None,
) -> T:
    """
    Run ``step`` until it does not fail for load: it is tried again, after a
    L{Backoff} wait, while it fails with L{Busy} (for up to ``busyFor``
    seconds from the first attempt) or L{NotConnected} (for up to
    ``refusedFor`` seconds from the first of an unbroken run of them; a
    refused connection only if ``retryRefused``).  Each wait is told to
    ``notice`` in one line; cancelling stops the wait.

    @raise Busy: C{"target busy: ..."} naming the limit, once ``busyFor`` is
        spent.
    @raise Exception: the connection's own error once ``refusedFor`` is
        spent; anything else ``step`` raises, at once.
    """
    backoff = backoff or Backoff()
    start = clock.seconds()
    refusedSince: float | None = None
    attempts = 0
    suffix = f" {what}" if what else ""
    while True:
        attempts += 1
        try:
            return await step()
        except Busy as e:
            refusedSince = None
            deadline = start + busyFor
            delay = backoff.next(e.retryAfter)
            if clock.seconds() + delay > deadline:
                elapsed = clock.seconds() - start
                raise Busy(
                    f"target busy: {e.what}; gave up after {attempts} attempt(s) in "
                    f"{elapsed:.0f} s"
                ) from e
            line = f"the target is busy ({e.limit or 'busy'}): retrying{suffix} in "
        except NotConnected as e:
            if e.refused and not retryRefused:
                raise e.error from None
            now = clock.seconds()
            refusedSince = now if refusedSince is None else refusedSince
            deadline = min(start + busyFor, refusedSince + refusedFor)
            delay = backoff.next()
            if now + delay > deadline:
                raise e.error from None
            line = (
                "the target refused the connection (not listening, or restarting)"
                if e.refused
                else "the target reset the connection while connecting (busy? "
                "--max-handshakes, --per-address-handshakes)"
            ) + f": retrying{suffix} in "
        line += f"{delay:.1f} s"
        log.info("{line}", line=line)
        notice(line)
        await deferLater(clock, delay, lambda: None)
