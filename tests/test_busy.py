"""
Busy is an answer: the connection gate, the target's BUSY answers and announced
limits, and the source's back-off and pacing (in memory, on a task.Clock).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_validation import Raw, prepareBox, send
from twisted.internet import task
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    gatherResults,
    maybeDeferred,
)
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test import iosim
from zope.interface.verify import verifyObject

from xenmig import amp_commands as commands
from xenmig.errors import WIRE_ERRORS, Busy, DeviceRefused
from xenmig.interfaces import IMigrationTarget
from xenmig.limits import (
    MAX_COMMANDS_IN_FLIGHT,
    AnnouncedLimits,
    ConnectionGate,
    ConnectionLimits,
    incoherence,
)
from xenmig.protocol import ControlProtocol
from xenmig.source.backoff import Backoff, NotConnected, whileBusy
from xenmig.source.connection import TargetConnection
from xenmig.source.pacing import Slots, commandSlots, gatherOrCancel, handshakeSlots
from xenmig.target.config import MAX_DEVICES, MAX_SESSIONS, TargetConfig
from xenmig.target.core import MigrationTarget
from xenmig.testing import MemoryKind

# -- the error ------------------------------------------------------------------------


def test_busyNamesItsLimitAndHint() -> None:
    """A Busy reads its limit and retry hint back from its message (the wire's)."""
    busy = Busy.at(
        "--max-sessions", "the target host already runs 16 migration(s)", 2.0
    )
    assert str(busy) == (
        "--max-sessions: the target host already runs 16 migration(s); retry after 2 s"
    )
    assert busy.limit == "--max-sessions"
    assert busy.retryAfter == 2.0
    assert busy.what == "--max-sessions: the target host already runs 16 migration(s)"
    assert WIRE_ERRORS[Busy] == b"BUSY"
    assert not issubclass(Busy, DeviceRefused)
    bare = Busy("too much")
    assert bare.limit == "" and bare.retryAfter is None


# -- the gate --------------------------------------------------------------------------


def gate(**limits: Any) -> ConnectionGate:
    return ConnectionGate(ConnectionLimits(**limits), task.Clock())


def test_gateRefusesBeyondThePool() -> None:
    """A connection beyond the handshake pool, or its address's share, is refused."""
    g = gate(handshakes=3, handshakesPerAddress=2)
    assert g.admit("a") and g.admit("a")
    assert not g.admit("a")  # --per-address-handshakes
    assert g.admit("b")
    assert not g.admit("c")  # --max-handshakes
    assert (g.refused, g.open, g.pendingHandshakes) == (2, 3, 3)
    assert g.serve("a")  # its handshake done: out of the pool
    assert g.admit("c")
    assert (g.served, g.pendingHandshakes) == (1, 3)


def test_gateAnswersBusyBeyondMaxConnections() -> None:
    """Past --max-connections served, a connection stays in the pool, answered BUSY."""
    g = gate(connections=1)
    assert g.admit("a") and g.serve("a")
    assert g.admit("a") and not g.serve("a")
    busy = g.busy()
    assert busy.limit == "--max-connections"
    assert "serves 1 connections, its limit (--max-connections 1)" in str(busy)
    assert busy.retryAfter == 1.0
    assert (g.answeredBusy, g.pendingHandshakes, g.open) == (1, 1, 2)
    g.closed("a", served=False)
    g.closed("a", served=True)
    assert (g.open, g.served, g.pendingHandshakes) == (0, 0, 0)
    assert not g.handshaking


def test_defaultLimitsFitTogether() -> None:
    """The default limits serve --max-sessions migrations of --max-devices devices."""
    limits = ConnectionLimits()
    assert incoherence(limits, MAX_SESSIONS, MAX_DEVICES) == []
    assert MAX_COMMANDS_IN_FLIGHT >= 2 * MAX_DEVICES
    problems = incoherence(
        ConnectionLimits(connections=100, handshakes=4, handshakesPerAddress=8), 16, 64
    )
    assert "--max-connections 100 is less than" in problems[0]
    assert "--per-address-handshakes 8 is more than --max-handshakes 4" in problems[1]


# -- the target's answers --------------------------------------------------------------


class Host:
    """A target (memory kind, synchronous I/O) behind a connection gate."""

    def __init__(self, tmp_path: Path, **limits: Any) -> None:
        self.clock = task.Clock()
        self.kind = MemoryKind()
        self.target = MigrationTarget(
            self.clock,
            TargetConfig(FilePath(str(tmp_path / "state"))),
            {"memory": self.kind},
            lambda f, *a, **kw: maybeDeferred(f, *a, **kw),
        )
        self.limits = ConnectionLimits(**limits)
        self.gate = ConnectionGate(self.limits, self.clock)

    def connect(self) -> tuple[ControlProtocol, Raw, Any]:
        client, server, pump = iosim.connectedServerAndClient(
            ServerClass=lambda: ControlProtocol(
                self.target, tls=False, handshakeTimeout=30.0, gate=self.gate
            ),
            ClientClass=Raw,
            greet=True,
        )
        return server, client, pump


def test_targetProvidesItsInterface(tmp_path: Path) -> None:
    """MigrationTarget provides IMigrationTarget (its config included)."""
    assert verifyObject(IMigrationTarget, Host(tmp_path).target)


def test_prepareAnswerAnnouncesTheLimits(tmp_path: Path) -> None:
    """The answer to Prepare carries the daemon's limits; a source reads them."""
    host = Host(tmp_path, handshakesPerAddress=12)
    _, client, pump = host.connect()
    send(client, pump, prepareBox())
    [answer] = client.boxes()
    announced = commands.JSON().fromString(answer[b"limits"])
    assert announced == {
        "commands_in_flight": MAX_COMMANDS_IN_FLIGHT,
        "connections": 1100,
        "handshakes": 512,
        "handshakes_per_address": 12,
        "sessions": MAX_SESSIONS,
    }
    assert AnnouncedLimits.fromWire(announced) == host.limits.announced(MAX_SESSIONS)
    host.target.sessions["m1"].abort("test over")


def test_connectionBeyondMaxConnectionsIsAnsweredBusy(tmp_path: Path) -> None:
    """Beyond --max-connections a command is answered BUSY, then the connection ends."""
    host = Host(tmp_path, connections=1)
    first, _, firstPump = host.connect()
    _, client, pump = host.connect()
    query = {"_command": commands.QueryMigration.commandName, "migration_id": b"m1"}
    send(client, pump, query)
    [answer] = client.boxes()
    assert answer[b"_error_code"] == b"BUSY"
    description = answer[b"_error_description"].decode()
    assert description.startswith("--max-connections: the target serves 1 connections")
    assert description.endswith("; retry after 1 s")
    pump.flush()
    assert client.lost
    assert (host.gate.served, host.gate.pendingHandshakes) == (1, 0)
    first.transport.loseConnection()
    firstPump.flush()
    assert host.gate.open == 0
    assert not host.clock.getDelayedCalls()


def test_silentBusyConnectionIsClosed(tmp_path: Path) -> None:
    """A BUSY connection that asks nothing is closed after --handshake-timeout."""
    host = Host(tmp_path, connections=1)
    first, _, firstPump = host.connect()
    _, client, pump = host.connect()
    host.clock.advance(30)
    pump.flush()
    assert client.lost and host.gate.open == 1
    first.transport.loseConnection()
    firstPump.flush()
    assert host.gate.open == 0
    assert not host.clock.getDelayedCalls()


def test_commandsBeyondTheLimitAreBusyNotProtocol(tmp_path: Path) -> None:
    """A command beyond the connection's commands in flight is BUSY, with a hint."""
    host = Host(tmp_path)
    server, client, pump = host.connect()
    server._inFlight = MAX_COMMANDS_IN_FLIGHT
    query = {"_command": commands.QueryMigration.commandName, "migration_id": b"m1"}
    send(client, pump, query)
    [answer] = client.boxes()
    assert answer[b"_error_code"] == b"BUSY"
    assert answer[b"_error_description"].startswith(b"commands in flight: ")
    assert not client.lost
    server._inFlight = 0
    server.transport.loseConnection()


# -- the source: back-off --------------------------------------------------------------


def test_backoffDoublesWithJitterAndHonoursTheHint() -> None:
    """Waits double up to the maximum, jittered, never under the target's hint."""
    low = Backoff(initial=0.25, maximum=2.0, draw=lambda: 0.0)
    assert [low.next() for _ in range(6)] == [0.125, 0.25, 0.5, 1.0, 1.0, 1.0]
    high = Backoff(initial=0.25, maximum=2.0, draw=lambda: 1.0)
    assert [high.next() for _ in range(5)] == [0.375, 0.75, 1.5, 3.0, 3.0]
    hinted = Backoff(draw=lambda: 0.0)
    assert hinted.next(2.0) == 2.0


class Script:
    """A step that fails with each error in turn, then answers ``done``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.attempts = 0

    async def __call__(self) -> str:
        self.attempts += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def retried(
    clock: task.Clock, step: Script, lines: list[str], **kw: Any
) -> Deferred[Any]:
    kw.setdefault("busyFor", 60.0)
    kw.setdefault("refusedFor", 10.0)
    backoff = Backoff(draw=lambda: 0.5)
    return Deferred.fromCoroutine(
        whileBusy(clock, step, notice=lines.append, backoff=backoff, **kw)
    )


def sessionsBusy() -> Busy:
    return Busy.at("--max-sessions", "the target host already runs 1 migration(s)", 2.0)


def test_busyIsRetriedAndSaidSo() -> None:
    """A BUSY step is tried again after the hinted wait, and each wait is told."""
    clock, lines = task.Clock(), []
    step = Script(sessionsBusy(), NotConnected(ConnectionResetError(104, "reset")))
    d = retried(clock, step, lines, what="the stream of d1")
    assert lines == [
        "the target is busy (--max-sessions): retrying the stream of d1 in 2.2 s"
    ]
    clock.advance(2.25)
    assert lines[1].startswith("the target reset the connection while connecting")
    assert lines[1].endswith(": retrying the stream of d1 in 0.5 s")
    clock.advance(0.5)
    assert d.result == "done" and step.attempts == 3
    assert not clock.getDelayedCalls()


def test_busyGivesUpNamingTheLimit() -> None:
    """Past its busy time a step fails with 'target busy: ...' naming the limit."""
    clock, lines = task.Clock(), []
    step = Script(*[sessionsBusy() for _ in range(10)])
    d = retried(clock, step, lines, busyFor=5.0)
    clock.pump([0.25] * 40)
    failure = d.result
    assert isinstance(failure, Failure) and failure.check(Busy)
    assert str(failure.value).startswith(
        "target busy: --max-sessions: the target host already runs 1 migration(s); "
        "gave up after 3 attempt(s) in 4 s"
    )
    d.addErrback(lambda _: None)


def test_refusedConnectionsAreRetriedOnlyWhereAsked() -> None:
    """A refused connection is retried within its own bound, or not at all."""
    refused = ConnectionRefusedError(111, "refused")
    clock, lines = task.Clock(), []
    d = retried(clock, Script(NotConnected(refused)), lines, retryRefused=False)
    assert d.result.value is refused and lines == []
    d.addErrback(lambda _: None)
    step = Script(*[NotConnected(refused) for _ in range(20)])
    d = retried(clock, step, lines, refusedFor=1.0)
    clock.pump([0.25] * 20)
    assert d.result.value is refused and step.attempts == 3
    assert lines[0].startswith("the target refused the connection (not listening")
    d.addErrback(lambda _: None)


def test_otherErrorsAreNotRetried() -> None:
    """An error that is not about load fails the step at once."""
    clock, lines = task.Clock(), []
    d = retried(clock, Script(DeviceRefused("no"), sessionsBusy()), lines)
    assert d.result.check(DeviceRefused) and lines == []
    d.addErrback(lambda _: None)


def test_cancellingAWaitStopsIt() -> None:
    """Cancelling a step waiting to be retried stops its timer."""
    clock, lines = task.Clock(), []
    d = retried(clock, Script(sessionsBusy()), lines)
    d.cancel()
    assert d.result.check(CancelledError)
    d.addErrback(lambda _: None)
    assert not clock.getDelayedCalls()


def test_connectingFailuresAreNotConnected() -> None:
    """Twisted's lost connection and the standard library's reset both qualify."""
    from xenmig.source.backoff import CONNECTING_FAILURES

    assert isinstance(ConnectionLost(), CONNECTING_FAILURES)
    assert isinstance(ConnectionResetError(), CONNECTING_FAILURES)
    assert not NotConnected(ConnectionLost()).refused


# -- the source: pacing ----------------------------------------------------------------


def test_slotsBoundAndQueueInOrder() -> None:
    """At most ``size`` holders; the others wait in order; a cancelled wait leaves."""
    slots = Slots(2)
    assert slots.acquire().called and slots.acquire().called
    third, fourth, fifth = slots.acquire(), slots.acquire(), slots.acquire()
    assert not third.called and slots.waiting == 3
    fourth.cancel()
    fourth.addErrback(lambda _: None)
    slots.release()
    assert third.called and not fifth.called
    slots.resize(3)
    assert fifth.called and slots.held == 3


def test_pacingFollowsTheAnnouncedLimits() -> None:
    """A source paces within what the target announced, or an older daemon's limits."""
    older = AnnouncedLimits.fromWire(None)
    assert (handshakeSlots(older), commandSlots(older)) == (1, 28)
    today = ConnectionLimits().announced(MAX_SESSIONS)
    assert (handshakeSlots(today), commandSlots(today)) == (4, 124)
    odd = AnnouncedLimits.fromWire({"handshakes_per_address": "many", "x": 1})
    assert odd == AnnouncedLimits()
    client = TargetConnection(task.Clock(), "127.0.0.1", kinds={})
    assert client.handshakes.size == 1
    client.learn(today.toWire())
    assert client.limits == today and client.handshakes.size == 4


@pytest.mark.parametrize("size", [1, 3])
def test_slotsRunHoldsOneSlot(size: int) -> None:
    """Slots.run holds a slot while its function runs, and gives it back."""
    slots = Slots(size)
    gate: Deferred[None] = Deferred()

    async def work() -> str:
        await gate
        return "ok"

    running = Deferred.fromCoroutine(slots.run(work))
    assert slots.held == 1
    gate.callback(None)
    assert running.result == "ok" and slots.held == 0


def test_connectionsOpenWithinTheirShare() -> None:
    """A source opens no more connections at once than its share of handshakes."""
    clock = task.Clock()
    client = TargetConnection(clock, "127.0.0.1", kinds={})
    attempts: list[Deferred[Any]] = []

    class Endpoint:
        def connect(self, factory: Any) -> Deferred[Any]:
            attempts.append(Deferred())
            return attempts[-1]

    client.endpoint = Endpoint  # type: ignore[assignment,method-assign]
    client.learn({"handshakes_per_address": 8, "sessions": 4})
    connecting = [Deferred.fromCoroutine(client.connect()) for _ in range(3)]
    assert len(attempts) == 2  # its share: 8 handshakes per address, 4 sessions
    attempts[0].errback(ConnectionRefusedError(111, "refused"))
    assert connecting[0].result.check(ConnectionRefusedError)
    assert len(attempts) == 3
    for d in connecting:
        d.cancel()
        d.addErrback(lambda _: None)
    assert client.handshakes.held == 0
    assert not clock.getDelayedCalls()


# -- the daemon's start ----------------------------------------------------------------


def test_openFilesRaisedTowardsWhatTheLimitsHold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The soft limit of open files rises towards the wanted count, never past hard."""
    import resource

    from xenmig import tuning

    limits = {"now": (1024, 4096)}
    monkeypatch.setattr(resource, "getrlimit", lambda _: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda _, v: limits.update(now=v))
    assert tuning.raiseOpenFiles(2000) == 2000 and limits["now"] == (2000, 4096)
    assert tuning.raiseOpenFiles(9000) == 4096 and limits["now"] == (4096, 4096)
    assert tuning.raiseOpenFiles(100) == 4096  # never lowered


def test_factoryStartSaysWhatDoesNotFit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting the port's factory logs limits that do not fit, and a low file limit."""
    from twisted.logger import globalLogPublisher

    from xenmig import factories

    monkeypatch.setattr(factories, "raiseOpenFiles", lambda wanted: 1024)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        host = Host(tmp_path)
        factory = factories.ControlFactory(
            host.target, tls=False, limits=ConnectionLimits(connections=64)
        )
        factory.doStart()
        factory.doStop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [e.get("problem") or e.get("log_format", "") for e in events]
    assert any("--max-connections 64 is less than" in text for text in said)
    assert any("less than the {wanted}" in text for text in said)


def test_gatherRaisesTheStepsOwnFailureAndCancelsTheRest() -> None:
    """
    The first failure is raised as itself, also when a step failed while
    gathering steps of its own (nested FirstErrors); the others are cancelled.
    """
    own = gatherResults([fail(Busy("deep"))], consumeErrors=True)
    cancelled: list[Deferred[None]] = []
    other: Deferred[None] = Deferred(cancelled.append)
    errors: list[Failure] = []
    Deferred.fromCoroutine(gatherOrCancel([own, other])).addErrback(errors.append)
    assert errors and errors[0].check(Busy) and str(errors[0].value) == "deep"
    assert cancelled and other.called
