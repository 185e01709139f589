"""Bounds on what connections may hold: counts, pending handshakes, AMP boxes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenmig.errors import PhaseTimeout

log = Logger()

#: The most bytes one AMP box may take on a control connection (keys, values
#: and their length prefixes): a little over one 64 KiB value, with room for
#: the other arguments of the largest command.
MAX_BOX_BYTES = 192 * 1024
#: Commands of one control connection being answered at once.
MAX_COMMANDS_IN_FLIGHT = 32
#: The longest error message sent back: AMP values are capped at 65,535 bytes,
#: and a message may quote what the peer sent.
MAX_MESSAGE = 2000
#: Seconds between two log lines about refused connections.
REFUSAL_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the daemon's port holds at most."""

    #: Every open connection: control, streams, and handshakes in progress.
    connections: int = 512
    #: Connections whose TLS handshake has not completed (unauthenticated).
    handshakes: int = 64
    #: Of those, from one address (so one host cannot take them all).
    handshakesPerAddress: int = 8
    #: Seconds a control connection with no unfinished migration and no
    #: command in progress may stay silent (None: no bound).
    idle: float | None = 300.0


class ConnectionGate:
    """
    Counts the daemon's connections and says which to refuse.  A refused
    connection is closed at once, before TLS costs anything more; refusals
    are logged at most once per L{REFUSAL_LOG_INTERVAL} seconds, with a count.
    """

    def __init__(self, limits: ConnectionLimits, clock: IReactorTime) -> None:
        self.limits = limits
        self.clock = clock
        self.open = 0
        self.handshaking: Counter[str] = Counter()
        self.refused = 0
        self._unlogged = 0
        self._lastLog: float | None = None

    @property
    def pendingHandshakes(self) -> int:
        return sum(self.handshaking.values())

    def admit(self, address: str, handshake: bool = True) -> bool:
        """
        Count a new connection from ``address``; False (and nothing counted)
        if it must be refused.
        """
        why = self._refusal(address, handshake)
        if why is not None:
            self.refused += 1
            self._logRefusal(address, why)
            return False
        self.open += 1
        if handshake:
            self.handshaking[address] += 1
        return True

    def authenticated(self, address: str) -> None:
        """The handshake of a connection from ``address`` completed."""
        self._handshakeOver(address)

    def closed(self, address: str, handshaking: bool) -> None:
        """An admitted connection closed."""
        self.open -= 1
        if handshaking:
            self._handshakeOver(address)

    def _handshakeOver(self, address: str) -> None:
        self.handshaking[address] -= 1
        if self.handshaking[address] <= 0:
            del self.handshaking[address]

    def _refusal(self, address: str, handshake: bool) -> str | None:
        limits = self.limits
        if self.open >= limits.connections:
            return f"{self.open} connections are open (--max-connections)"
        if not handshake:
            return None
        if self.pendingHandshakes >= limits.handshakes:
            return (
                f"{self.pendingHandshakes} TLS handshakes are in progress "
                f"(--max-handshakes)"
            )
        if self.handshaking[address] >= limits.handshakesPerAddress:
            return (
                f"{self.handshaking[address]} TLS handshakes from this address are "
                f"in progress (--per-address-handshakes)"
            )
        return None

    def _logRefusal(self, address: str, why: str) -> None:
        now = self.clock.seconds()
        self._unlogged += 1
        if self._lastLog is not None and now - self._lastLog < REFUSAL_LOG_INTERVAL:
            return
        log.warn(
            "refused {count} connection(s), the last from {address}: {why}",
            count=self._unlogged,
            address=address,
            why=why,
        )
        self._lastLog, self._unlogged = now, 0


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message``, cut to ``limit`` characters (marked) if it is longer."""
    if len(message) <= limit:
        return message
    return message[: limit - 20] + f" ... ({len(message)} chars)"


def withDeadline(
    d: Deferred[Any], seconds: float, clock: IReactorTime, message: str
) -> Deferred[Any]:
    """
    Bound ``d`` (cancelling it) to ``seconds`` on ``clock``; on expiry it fails
    with L{PhaseTimeout} carrying ``message``, which names what did not finish.
    """

    def expired(failure: Failure) -> Failure:
        if failure.check(CancelledError, TimeoutError):  # addTimeout's own error
            return Failure(PhaseTimeout(message))
        return failure

    return d.addTimeout(seconds, clock).addErrback(expired)
