"""Control connections a client keeps between migrations, for the next Prepare."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: How many migrations one kept connection serves before it is closed (the
#: daemon remembers on each connection the migrations it prepared; the
#: connection counts them in its ``served``).
USES = 100


class IdleConnections:
    """
    The control connections of a client's committed migrations, kept open for
    its next Prepare to the same daemon: that one then costs no TCP or TLS
    handshake (measured here: about 3 ms of a vTPM migration's 16, and the
    CPU of a handshake on each side).

    Each is kept at most ``seconds`` (0: none is kept), well under the
    daemon's ``--control-idle-timeout`` (300 s by default), so that the daemon
    never closes one as it is taken; one lost meanwhile is dropped, and one
    that served L{USES} migrations is closed.  Only a migration that
    committed gives its connection back: an aborted one's may be in any
    state.
    """

    def __init__(
        self,
        clock: IReactorTime,
        seconds: float,
        hangUp: Callable[[Any], None] | None = None,
        uses: int = USES,
    ) -> None:
        self.clock = clock
        self.seconds = seconds
        self.uses = uses
        self._hangUp = hangUp or _loseConnection
        self._kept: list[tuple[Any, IDelayedCall]] = []

    def keep(self, protocol: Any) -> None:
        """A committed migration's connection: keep it, or hang it up."""
        if protocol is None:
            return
        protocol.served = getattr(protocol, "served", 0) + 1
        if (
            self.seconds <= 0
            or getattr(protocol, "lost", True)
            or protocol.served >= self.uses
        ):
            self._hangUp(protocol)
            return
        if hasattr(protocol, "onLost"):
            protocol.onLost = None  # its migration's reconnecting is over
        expiry = self.clock.callLater(self.seconds, self._expire, protocol)
        self._kept.append((protocol, expiry))

    def take(self) -> Any | None:
        """The most recently kept connection still open, or None."""
        while self._kept:
            protocol, expiry = self._kept.pop()
            if expiry.active():
                expiry.cancel()
            if not getattr(protocol, "lost", True):
                return protocol
        return None

    def close(self) -> None:
        """Hang up every kept connection."""
        while self._kept:
            protocol, expiry = self._kept.pop()
            if expiry.active():
                expiry.cancel()
            self._hangUp(protocol)

    def __len__(self) -> int:
        return len(self._kept)

    def _expire(self, protocol: Any) -> None:
        self._kept = [(p, e) for p, e in self._kept if p is not protocol]
        self._hangUp(protocol)


def _loseConnection(protocol: Any) -> None:
    transport = getattr(protocol, "transport", None)
    if transport is not None:
        transport.loseConnection()
