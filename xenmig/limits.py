"""Bounds on what connections may hold, the gate that counts them, what is announced."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenmig.errors import Busy, PhaseTimeout

log = Logger()

#: The most bytes one AMP box may take on a control connection (keys, values
#: and their length prefixes): a little over one 64 KiB value, with room for
#: the other arguments of the largest command.
MAX_BOX_BYTES = 192 * 1024
#: The largest device (by its description's size) whose stream a target
#: offers to take on the control connection (StreamRecords), and the most
#: bytes of a stream one StreamRecords carries (an AMP value holds 65,535).
INLINE_OFFER = 256 * 1024
INLINE_CHUNK = 60 * 1024
#: Commands of one control connection being answered at once: a migration of
#: the documented 64 devices (--max-devices) holds at most one OpenStream or
#: DeviceReady per device, with as many again for its handlers' requests,
#: its status and its abort.  One more is answered BUSY.
MAX_COMMANDS_IN_FLIGHT = 128
#: The longest error message sent back: AMP values are capped at 65,535 bytes,
#: and a message may quote what the peer sent.
MAX_MESSAGE = 2000
#: Seconds between two log lines about refused connections.
REFUSAL_LOG_INTERVAL = 10.0

#: The seconds a BUSY answer suggests waiting, by what the target is short of:
#: a session lasts seconds to minutes; a command or a connection much less.
RETRY_SESSIONS = 2.0
#: Seconds a Prepare beyond --max-sessions waits in line for a place (first
#: come, first served) before it is answered BUSY; and how many wait at most.
ADMISSION_WAIT = 5.0
ADMISSION_LINE = 256
RETRY_COMMANDS = 0.5
RETRY_CONNECTIONS = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    """
    How many connections the daemon's port holds at most.  Every connection
    first waits in the pool of those not yet served (its TLS handshake); then
    it is served, or, beyond L{connections}, answered BUSY (L{ConnectionGate}).
    """

    #: Connections served at once, control and streams: the default
    #: --max-sessions (16) migrations of the default --max-devices (64)
    #: devices, each a stream, with their control connections and room for
    #: status queries (16 x 65 = 1,040).
    connections: int = 1100
    #: Connections not yet served: TLS handshakes in progress (unauthenticated),
    #: and those being answered BUSY.
    handshakes: int = 512
    #: Of those, from one address: the default --max-sessions (16) migrations of
    #: one source host, opening 4 connections at once each; and no fewer than 8
    #: addresses can fill the pool.
    handshakesPerAddress: int = 64
    #: Seconds a control connection with no unfinished migration and no
    #: command in progress may stay silent (None: no bound).
    idle: float | None = 300.0

    def announced(self, sessions: int) -> AnnouncedLimits:
        """
        What a target tells its sources of these limits (at Prepare), with its
        --max-sessions.
        """
        return AnnouncedLimits(
            handshakes=self.handshakes,
            handshakesPerAddress=self.handshakesPerAddress,
            commandsInFlight=MAX_COMMANDS_IN_FLIGHT,
            connections=self.connections,
            sessions=sessions,
        )


@dataclass(frozen=True)
class AnnouncedLimits:
    """
    The limits a target announces in its answer to Prepare (``limits``), so
    that a source paces its streams and commands within them.  A target that
    does not announce them (an older daemon) is taken to have the defaults
    here: an older daemon's own.
    """

    handshakes: int = 64
    handshakesPerAddress: int = 8
    commandsInFlight: int = 32
    connections: int = 512
    #: Its --max-sessions: the migrations one source host may run at once.
    sessions: int = 16

    def toWire(self) -> dict[str, int]:
        """The ``limits`` object of the Prepare answer."""
        return {key: getattr(self, name) for key, name in _ANNOUNCED.items()}

    @classmethod
    def fromWire(cls, value: Any) -> AnnouncedLimits:
        """
        Read a ``limits`` object (None when absent): keys it does not know are
        ignored, and a missing or unusable value keeps its default.
        """
        if not isinstance(value, dict):
            return cls()
        known = {}
        for key, name in _ANNOUNCED.items():
            number = value.get(key)
            if isinstance(number, int) and not isinstance(number, bool) and number > 0:
                known[name] = number
        return cls(**known)


_ANNOUNCED = {
    "handshakes": "handshakes",
    "handshakes_per_address": "handshakesPerAddress",
    "commands_in_flight": "commandsInFlight",
    "connections": "connections",
    "sessions": "sessions",
}


def incoherence(limits: ConnectionLimits, sessions: int, devices: int) -> list[str]:
    """
    What in these settings does not fit together (``sessions`` and
    ``devices``: --max-sessions, --max-devices), one line each.
    """
    found = []
    needed = sessions * (devices + 1)
    if limits.connections < needed:
        found.append(
            f"--max-connections {limits.connections} is less than --max-sessions "
            f"{sessions} migrations of --max-devices {devices} devices need at once "
            f"(a stream per device and a control connection each: {needed}); the "
            f"connections beyond it are answered BUSY"
        )
    if limits.handshakesPerAddress > limits.handshakes:
        found.append(
            f"--per-address-handshakes {limits.handshakesPerAddress} is more than "
            f"--max-handshakes {limits.handshakes}: one address may fill the pool"
        )
    return found


def openFilesWanted(limits: ConnectionLimits, sessions: int, devices: int) -> int:
    """
    The descriptors the daemon may hold at its limits: a socket per
    connection (served or in the pool), a staging file per device, and its
    own (journal, local socket, logs, threads).
    """
    return limits.connections + limits.handshakes + sessions * devices + 64


class ConnectionGate:
    """
    Counts the daemon's connections and decides what becomes of each.

    A new connection enters the pool of connections not yet served, unless
    the pool is full (``--max-handshakes``) or holds ``--per-address-handshakes``
    of its address: then it is closed at once, before TLS costs anything more
    (the peer sees a reset: a refusal could only be answered through the very
    handshake that is being limited).  Once its handshake has completed it is
    L{serve}d, if fewer than ``--max-connections`` are; otherwise it stays in
    the pool while its commands are answered BUSY, until it closes.  Refusals
    and BUSY answers are logged at most once per L{REFUSAL_LOG_INTERVAL}
    seconds each, with a count.
    """

    def __init__(self, limits: ConnectionLimits, clock: IReactorTime) -> None:
        self.limits = limits
        self.clock = clock
        #: Every connection held: served, or in the pool.
        self.open = 0
        #: Connections served (control and streams).
        self.served = 0
        #: The pool (handshakes in progress, BUSY answers), by address.
        self.handshaking: Counter[str] = Counter()
        self.refused = 0
        self.answeredBusy = 0
        self._refusals = _OccasionalLog(
            clock, "refused {count} connection(s), the last from {address}: {why}"
        )
        self._busy = _OccasionalLog(
            clock,
            "answered {count} connection(s) BUSY, the last from {address}: {why}",
        )

    @property
    def pendingHandshakes(self) -> int:
        return sum(self.handshaking.values())

    def admit(self, address: str) -> bool:
        """
        Take a new connection from ``address`` into the pool; False (and
        nothing counted) if it must be refused.
        """
        why = self._refusal(address)
        if why is not None:
            self.refused += 1
            self._refusals.note(address, why)
            return False
        self.open += 1
        self.handshaking[address] += 1
        return True

    def serve(self, address: str) -> bool:
        """
        The handshake of a connection from ``address`` completed: True if it
        is now served; False if it stays in the pool, to be answered BUSY.
        """
        if self.served >= self.limits.connections:
            self.answeredBusy += 1
            self._busy.note(address, self.busy().what)
            return False
        self._leavePool(address)
        self.served += 1
        return True

    def busy(self) -> Busy:
        """The answer of a connection beyond ``--max-connections``."""
        return Busy.at(
            "--max-connections",
            f"the target serves {self.served} connections, its limit "
            f"(--max-connections {self.limits.connections})",
            RETRY_CONNECTIONS,
        )

    def closed(self, address: str, served: bool) -> None:
        """An admitted connection closed (``served``: it had been served)."""
        self.open -= 1
        if served:
            self.served -= 1
        else:
            self._leavePool(address)

    def _leavePool(self, address: str) -> None:
        self.handshaking[address] -= 1
        if self.handshaking[address] <= 0:
            del self.handshaking[address]

    def _refusal(self, address: str) -> str | None:
        limits = self.limits
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


class _OccasionalLog:
    """A warning logged at most once per L{REFUSAL_LOG_INTERVAL}, with a count."""

    def __init__(self, clock: IReactorTime, format: str) -> None:
        self.clock = clock
        self.format = format
        self._unlogged = 0
        self._lastLog: float | None = None

    def note(self, address: str, why: str) -> None:
        now = self.clock.seconds()
        self._unlogged += 1
        if self._lastLog is not None and now - self._lastLog < REFUSAL_LOG_INTERVAL:
            return
        log.warn(self.format, count=self._unlogged, address=address, why=why)
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
