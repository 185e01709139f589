"""Admission: one migration per id and per domain, and limits that hold in flight."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    gatherResults,
    maybeDeferred,
)
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test import iosim
from zope.interface import implementer
from zope.interface.verify import verifyObject

sys.path.insert(0, os.path.dirname(__file__))

from daemons import PKI, Daemon, disconnect, eventually, settled  # noqa: E402

from xenmig import amp_commands as commands  # noqa: E402
from xenmig.digest import hashBytes
from xenmig.errors import (
    Busy,
    DuplicateMigration,
    JournalUnavailable,
    MigrationAborted,
    UnknownMigration,
)
from xenmig.interfaces import IDeviceKind, ITargetDevice
from xenmig.limits import ADMISSION_WAIT
from xenmig.model import DeviceDescription, DeviceSpec
from xenmig.protocol import ControlProtocol
from xenmig.records import encodeData, encodeEnd, encodeStreamHeader
from xenmig.streamreceiver import StreamReceiver
from xenmig.target.authz import PolicySource
from xenmig.target.config import TargetConfig
from xenmig.target.core import MigrationTarget
from xenmig.target.recordfiles import SPARES
from xenmig.target.session import Phase
from xenmig.testing import MemoryKind, MemoryTarget

PEER = "source.test"
STATE = b"the state of a device"


@implementer(ITargetDevice)
class HeldTarget(MemoryTarget):
    """A memory target whose ``accept`` answers only when the test says so."""

    def __init__(self, description: Any, context: Any = None) -> None:
        super().__init__(description, context)
        self.cancelled = False
        self.allowed = False
        self.accepting: Deferred[dict[str, Any]] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[dict[str, Any]]) -> None:
        self.cancelled = True

    def accept(self) -> Deferred[dict[str, Any]]:
        if self.refuse:
            return super().accept()
        return self.accepting

    def allow(self) -> None:
        """Let ``accept`` answer: the device is accepted."""
        self.allowed = True
        self.accepting.callback({"accepted-by": "held"})


@implementer(IDeviceKind)
class HeldKind(MemoryKind):
    """The memory kind with L{HeldTarget}s: Prepares stay in flight until allowed."""

    def target(self, description: DeviceDescription, context: Any) -> HeldTarget:
        device = HeldTarget(description, context)
        self.targets.append(device)
        return device

    def allowAll(self) -> None:
        for device in self.targets:
            if isinstance(device, HeldTarget) and not device.accepting.called:
                device.allow()


class Threads:
    """The I/O threads, run at once; or, while ``holding``, queued until released."""

    def __init__(self) -> None:
        self.holding = False
        self.queued: list[tuple[Deferred[Any], Callable[[], Any]]] = []
        self.names: list[str] = []  # of every function called, in order

    def __call__(self, function: Any, *args: Any, **kw: Any) -> Deferred[Any]:
        self.names.append(function.__name__)
        if not self.holding:
            return maybeDeferred(function, *args, **kw)
        d: Deferred[Any] = Deferred()
        self.queued.append((d, lambda: function(*args, **kw)))
        return d

    def release(self) -> None:
        """Stop holding, and run what was queued, in order."""
        self.holding = False
        while self.queued:
            d, call = self.queued.pop(0)
            maybeDeferred(call).chainDeferred(d)


class Host:
    """A target in memory: the held kind, a clock, and controllable threads."""

    def __init__(
        self, tmp_path: Path, maxSessions: int = 16, peers: str | None = None
    ) -> None:
        self.state = tmp_path / "state"
        self.clock = task.Clock()
        self.kind = HeldKind()
        self.threads = Threads()
        config = TargetConfig(FilePath(str(self.state)), maxSessions=maxSessions)
        policy = None
        if peers is not None:
            path = tmp_path / "peers.toml"
            path.write_text(peers)
            policy = PolicySource(str(path), config.roots)
            policy.load()
        self.target = MigrationTarget(
            self.clock, config, {"memory": self.kind}, self.threads, policy=policy
        )
        self.target.recover()

    def prepare(
        self, migrationId: str, domain: str, *names: str, **params: Any
    ) -> Deferred[Any]:
        """Prepare (devices ``names``, or one ``dev``) as ``source.test``."""
        devices = [
            {
                "kind": "memory",
                "name": name,
                "size": len(STATE),
                "precopy": False,
                "params": params,
            }
            for name in names or ("dev",)
        ]
        return maybeDeferred(self.target.prepare, PEER, migrationId, domain, 1, devices)

    def staged(self) -> list[str]:
        """The migrations with a staging directory."""
        root = self.state / "staging"
        return sorted(p.name for p in root.iterdir()) if root.exists() else []

    def transfer(self, migrationId: str) -> None:
        """Send device ``dev`` its state, through a real stream receiver."""
        token = self.target.openStream(PEER, migrationId, "dev")
        session, device = self.target.claimToken(PEER, token)
        charge = self.target.chargeStream(migrationId)
        receiver = StreamReceiver(session, device, 60.0, charge)
        receiver.makeConnection(StringTransport())
        digest = hashBytes(STATE)
        end = encodeEnd(len(STATE), digest.algorithm, digest.digest)
        receiver.dataReceived(
            encodeStreamHeader() + b"".join(encodeData(0, STATE) + end)
        )

    def commit(self, migrationId: str) -> Any:
        return resultOf(maybeDeferred(self.target.commit, PEER, migrationId))

    def settled(self) -> None:
        """Nothing pending: no timer, no queued I/O."""
        assert not self.clock.getDelayedCalls()
        assert not self.threads.queued


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def resultOf(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (raising its failure)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "it has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failureOf(d: Deferred[Any], *errors: type[BaseException]) -> Failure:
    """The failure of a Deferred that has failed, with one of ``errors``."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "it has not failed yet"
    assert isinstance(results[0], Failure), results[0]
    assert results[0].check(*errors), results[0]
    return results[0]


def pending(d: Deferred[Any]) -> bool:
    results: list[Any] = []
    d.addBoth(results.append)
    if results and isinstance(results[0], Failure):
        results[0].raiseException()
    return not results


def test_fakesProvideInterfaces() -> None:
    """The held kind and its targets provide the interfaces they stand in for."""
    kind = HeldKind()
    assert verifyObject(IDeviceKind, kind)
    description = DeviceDescription("memory", "dev", 1)
    assert verifyObject(ITargetDevice, kind.target(description, None))


def test_aStagelessDeviceGetsNoStagingDirectory(host: Host) -> None:
    """
    A device that provides IStagelessDevice is accepted without a staging
    directory, and a session of such devices ends without a thread call to
    remove one; a device beside it that stages gets its own, as before.
    """
    host.prepare("m1", "vm1", stageless=True)
    host.kind.allowAll()
    assert host.staged() == [] and "_makePrivateDir" not in host.threads.names
    host.transfer("m1")
    assert host.commit("m1") == ["memory:dev"]
    assert "_removeAll" not in host.threads.names

    devices = [
        {"kind": "memory", "name": name, "size": 1, "precopy": False, "params": p}
        for name, p in (("a", {"stageless": True}), ("b", {}))
    ]
    host.target.prepare(PEER, "m2", "vm2", 1, devices)
    host.kind.allowAll()
    assert [p.name for p in (host.state / "staging" / "m2").iterdir()] == ["b"]
    resultOf(maybeDeferred(host.target.abort, PEER, "m2", "done"))
    assert host.staged() == [] and host.threads.names.count("_removeAll") == 1
    host.settled()


# -- one migration per domain and per id -----------------------------------------------


def test_oneDomainAtATime(host: Host) -> None:
    """A second Prepare of a domain whose Prepare is in flight is refused at once."""
    first = host.prepare("m1", "vm1")
    second = host.prepare("m2", "vm1")
    failure = failureOf(second, DuplicateMigration)
    assert "domain vm1 is already being migrated here (migration m1)" in str(
        failure.value
    )
    assert len(host.kind.targets) == 1  # the second never reached a handler
    host.kind.allowAll()
    assert [o.accepted for o in resultOf(first)[1]] == [True]
    assert set(host.target.sessions) == {"m1"}
    resultOf(maybeDeferred(host.target.abort, PEER, "m1", "the VM stays"))
    host.prepare("m3", "vm1")  # the domain is free again
    host.kind.allowAll()
    assert host.target.sessions["m3"].phase is Phase.PREPARED


def test_duplicateIdInFlightLeavesTheFirstAlone(host: Host) -> None:
    """A Prepare of an id in flight is refused without touching the first's staging."""
    first = host.prepare("m1", "vm1")
    assert host.staged() == ["m1"]
    with capturedLogs() as events:
        second = host.prepare("m1", "vm2")
    failure = failureOf(second, DuplicateMigration)
    assert "migration m1 is already being prepared or run here" in str(failure.value)
    assert not [e for e in events if "log_failure" in e]  # no traceback
    assert host.staged() == ["m1"]
    assert len(host.kind.targets) == 1
    host.kind.allowAll()
    resultOf(first)
    host.transfer("m1")
    assert host.commit("m1") == ["memory:dev"]
    assert host.target.sessions["m1"].phase is Phase.COMMITTED
    host.settled()


# -- limits hold while Prepares are in flight ------------------------------------------


def test_hostLimitInFlight(tmp_path: Path) -> None:
    """
    With --max-sessions 2, two of six Prepares in flight together are
    admitted; the others wait in line, and are answered BUSY when no place
    frees within the admission wait.
    """
    host = Host(tmp_path, maxSessions=2)
    preparing = [host.prepare(f"m{i}", f"vm{i}") for i in range(6)]
    assert not any(d.called for d in preparing)
    host.clock.advance(ADMISSION_WAIT - 0.01)
    assert not any(d.called for d in preparing[2:])
    host.clock.advance(0.01)
    for d in preparing[2:]:
        failure = failureOf(d, Busy)
        assert "already runs 2 migration(s), its limit (--max-sessions 2)" in str(
            failure.value
        )
        assert failure.value.limit == "--max-sessions"
        assert failure.value.retryAfter == 2.0
    host.kind.allowAll()
    assert sorted(host.target.sessions) == ["m0", "m1"]
    resultOf(maybeDeferred(host.target.abort, PEER, "m0", "done"))
    host.prepare("m6", "vm6")  # one place is free again
    late = host.prepare("m7", "vm7")
    host.clock.advance(ADMISSION_WAIT)
    failureOf(late, Busy)


def test_lineIsFirstComeFirstServed(tmp_path: Path) -> None:
    """
    A place that frees goes to the Prepare that waited longest; a Prepare that
    comes while others wait joins the line behind them, even if a place is
    free at that moment.
    """
    host = Host(tmp_path, maxSessions=1)
    first = host.prepare("m0", "vm0")
    waiting = [host.prepare(f"m{i}", f"vm{i}") for i in (1, 2)]
    host.kind.allowAll()
    assert resultOf(first)
    resultOf(maybeDeferred(host.target.abort, PEER, "m0", "done"))
    late = host.prepare("m3", "vm3")  # behind m1 (woken, not yet in) and m2
    assert not late.called
    host.clock.advance(0)  # m1 takes the place it was woken for
    host.kind.allowAll()
    assert resultOf(waiting[0])
    assert not waiting[1].called and not late.called
    assert sorted(host.target.sessions) == ["m0", "m1"]
    resultOf(maybeDeferred(host.target.abort, PEER, "m1", "done"))
    host.clock.advance(0)
    host.kind.allowAll()
    assert resultOf(waiting[1])
    assert not late.called
    resultOf(maybeDeferred(host.target.abort, PEER, "m2", "done"))
    host.clock.advance(0)
    host.kind.allowAll()
    assert resultOf(late)


def test_requesterGoneLeavesTheLine(tmp_path: Path) -> None:
    """
    A Prepare whose control connection is lost while it waits in line leaves
    it (its place goes to the next); one woken for a place but gone before it
    took it opens no session, and its place goes to the next too.
    """
    host = Host(tmp_path, maxSessions=1)
    first = host.prepare("m0", "vm0")
    inLine = [host.prepare(f"m{i}", f"vm{i}") for i in (1, 2, 3)]
    host.target.controlConnectionLost(PEER, ["m2"])
    failure = failureOf(inLine[1], MigrationAborted)
    assert "control connection was lost" in str(failure.value)
    host.kind.allowAll()
    assert resultOf(first)
    resultOf(maybeDeferred(host.target.abort, PEER, "m0", "done"))
    # m1 is woken for the place; its requester goes before its turn comes.
    host.target.controlConnectionLost(PEER, ["m1"])
    host.clock.advance(0)
    failureOf(inLine[0], MigrationAborted)
    assert "m1" not in host.target.sessions
    host.clock.advance(0)  # m3, next in line, gets the place
    host.kind.allowAll()
    assert resultOf(inLine[2])
    assert sorted(host.target.sessions) == ["m0", "m3"]


PEERS = """
[[peer]]
identity = "source.test"
max-sessions = 1
"""


def test_peerLimitInFlight(tmp_path: Path) -> None:
    """A peer with max-sessions 1 gets one of three Prepares in flight together."""
    host = Host(tmp_path, peers=PEERS)
    preparing = [host.prepare(f"m{i}", f"vm{i}") for i in range(3)]
    assert pending(preparing[0])
    for d in preparing[1:]:
        failure = failureOf(d, Busy)
        assert "source.test already runs 1 migration(s) here" in str(failure.value)
        assert failure.value.limit == "max-sessions"
    host.kind.allowAll()
    assert list(host.target.sessions) == ["m0"]


# -- every path gives the reservation back ---------------------------------------------


def refusedByHandler(host: Host) -> None:
    offers = resultOf(host.prepare("m1", "vm1", "a", "b", refuse="no room"))[1]
    assert [o.accepted for o in offers] == [False, False]


def handlerFailed(host: Host) -> None:
    d = host.prepare("m1", "vm1", "a", "b")
    host.kind.targets[0].allow()
    host.kind.targets[1].accepting.errback(RuntimeError("a bug"))
    assert [o.accepted for o in resultOf(d)[1]] == [True, False]


def cancelled(host: Host) -> None:
    d = host.prepare("m1", "vm1", "a", "b")
    host.kind.targets[0].allow()
    d.cancel()
    failureOf(d, CancelledError)
    assert host.kind.targets[1].cancelled


def journalFailed(host: Host) -> None:
    sessions = host.state / "sessions"
    shutil.rmtree(sessions)  # its spare files too
    sessions.write_text("not a directory")
    d = host.prepare("m1", "vm1", "a", "b")
    host.kind.allowAll()
    failureOf(d, JournalUnavailable)
    sessions.unlink()


def cancelledWhileJournalling(host: Host) -> None:
    d = host.prepare("m1", "vm1")
    host.threads.holding = True
    host.kind.allowAll()
    d.cancel()  # the PREPARED record is being written: it lands, then aborts
    host.threads.release()
    assert "its Prepare was cancelled" in str(failureOf(d, MigrationAborted).value)
    assert host.target.query("m1")["phase"] == "ABORTED"


def stagingUnavailable(host: Host) -> None:
    staging = host.state / "staging"
    staging.rmdir()
    staging.write_text("not a directory")
    d = host.prepare("m1", "vm1")
    message = str(failureOf(d, JournalUnavailable).value)
    assert "could not make the staging directory of device dev" in message
    staging.unlink()
    staging.mkdir()


def aborted(host: Host) -> None:
    d = host.prepare("m1", "vm1")
    host.kind.allowAll()
    resultOf(d)
    resultOf(maybeDeferred(host.target.abort, PEER, "m1", "changed my mind"))


def committed(host: Host) -> None:
    d = host.prepare("m1", "vm1")
    host.kind.allowAll()
    resultOf(d)
    host.transfer("m1")
    host.commit("m1")


@pytest.mark.parametrize(
    "path",
    [
        refusedByHandler,
        handlerFailed,
        cancelled,
        cancelledWhileJournalling,
        journalFailed,
        stagingUnavailable,
        aborted,
        committed,
    ],
)
def test_releasedOnEveryPath(tmp_path: Path, path: Any) -> None:
    """However a Prepare or its session ends, its domain and place are free again."""
    host = Host(tmp_path, maxSessions=1)
    path(host)
    for device in host.kind.targets:
        if device.allowed and not device.committed:
            assert device.aborted, device.description.name
    assert host.staged() == []
    host.settled()
    again = host.prepare("m2", "vm1")
    assert pending(again)
    host.kind.allowAll()
    assert host.target.sessions["m2"].phase is Phase.PREPARED


def test_journalUnavailableKeepsNothing(host: Host) -> None:
    """A Prepare the journal cannot record is refused as such; nothing stays."""
    sessions = host.state / "sessions"
    shutil.rmtree(sessions)  # its spare files too
    sessions.write_text("not a directory")
    d = host.prepare("m1", "vm1", "a", "b")
    host.kind.allowAll()
    failure = failureOf(d, JournalUnavailable)
    assert "migration m1: the target could not record it" in str(failure.value)
    assert all(device.aborted for device in host.kind.targets)
    assert host.target.sessions == {}
    with pytest.raises(UnknownMigration):
        host.target.query("m1")
    assert host.staged() == []
    host.settled()


# -- a lost control connection ---------------------------------------------------------


def connect(host: Host) -> tuple[ControlProtocol, amp.AMP, Any]:
    client, server, pump = iosim.connectedServerAndClient(
        ServerClass=lambda: ControlProtocol(host.target, tls=False),
        ClientClass=amp.AMP,
        greet=True,
    )
    server.peer = PEER
    return server, client, pump


def sendPrepare(client: amp.AMP, pump: Any, migrationId: str, domain: str) -> Any:
    answers: list[Any] = []
    client.callRemote(
        commands.Prepare,
        migration_id=migrationId,
        domain=domain,
        protocol_version=commands.PROTOCOL_VERSION,
        devices=[
            {
                "kind": "memory",
                "name": "dev",
                "size": len(STATE),
                "precopy": False,
                "params": {},
            }
        ],
    ).addBoth(answers.append)
    pump.flush()
    return answers


def test_lostDuringPrepare(host: Host) -> None:
    """A control connection lost while its Prepare is in flight leaves no session."""
    server, client, pump = connect(host)
    sendPrepare(client, pump, "m1", "vm1")
    assert host.staged() == ["m1"]
    client.transport.loseConnection()
    pump.flush()
    host.kind.allowAll()
    assert "m1" not in host.target.sessions
    assert host.kind.targets[0].aborted
    assert host.staged() == []
    host.settled()
    assert pending(host.prepare("m2", "vm1"))  # the domain is free


def test_lostWhileJournalling(host: Host) -> None:
    """A connection lost while PREPARED is being journalled aborts the session."""
    server, client, pump = connect(host)
    sendPrepare(client, pump, "m1", "vm1")
    host.threads.holding = True
    host.kind.allowAll()
    assert host.threads.queued  # the PREPARED record is being written
    client.transport.loseConnection()
    pump.flush()
    host.threads.release()
    status = host.target.query("m1")
    assert status["phase"] == "ABORTED"
    assert "control connection was lost" in status["reason"]
    assert host.kind.targets[0].aborted
    assert host.staged() == []
    host.settled()


def test_lostDuplicateSparesTheFirst(host: Host) -> None:
    """Losing a connection whose duplicate Prepare was refused spares the first."""
    _, first, firstPump = connect(host)
    sendPrepare(first, firstPump, "m1", "vm1")
    _, second, secondPump = connect(host)
    [answer] = sendPrepare(second, secondPump, "m1", "vm1")
    assert answer.check(DuplicateMigration)
    second.transport.loseConnection()
    secondPump.flush()
    host.kind.allowAll()
    firstPump.flush()
    assert host.target.sessions["m1"].phase is Phase.PREPARED
    first.transport.loseConnection()  # ... and its own connection's loss aborts it
    firstPump.flush()
    assert host.target.sessions["m1"].phase is Phase.ABORTED
    host.settled()


def test_lostAfterDuplicateOnSameConnection(host: Host) -> None:
    """A duplicate refused on the same connection does not untie the first."""
    _, client, pump = connect(host)
    sendPrepare(client, pump, "m1", "vm1")
    [answer] = sendPrepare(client, pump, "m1", "vm1")
    assert answer.check(DuplicateMigration)
    client.transport.loseConnection()
    pump.flush()
    host.kind.allowAll()
    assert "m1" not in host.target.sessions
    assert host.staged() == []
    host.settled()


def test_abandonedPrepareAnswersAborted(host: Host) -> None:
    """The core answers an abandoned Prepare with MigrationAborted, naming why."""
    d = host.prepare("m1", "vm1")
    host.target.controlConnectionLost(PEER, {"m1"})
    host.kind.allowAll()
    failure = failureOf(d, MigrationAborted)
    assert "control connection was lost" in str(failure.value)


# -- a real daemon over real TLS -------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def fileDevice(destination: Path) -> dict[str, Any]:
    return {
        "kind": "file",
        "name": "blob",
        "size": 4096,
        "precopy": False,
        "params": {"target": str(destination)},
    }


async def outcomes(calls: list[Deferred[Any]]) -> list[Any]:
    """Each call's answer or Failure, once all are in."""
    boxed = await gatherResults([d.addBoth(lambda result: [result]) for d in calls])
    return [result for [result] in boxed]


async def live(daemon: Daemon) -> list[str]:
    """The migrations the daemon runs (as its local socket lists them)."""
    answer = await daemon.local(reactor, commands.ListMigrations, limit=200)
    return sorted(
        m["migration_id"]
        for m in answer["migrations"]
        if m["phase"] not in ("ABORTED", "COMMITTED")
    )


@pytest_twisted.ensureDeferred
async def test_concurrentPreparesOverTLS(daemons: Callable[..., Daemon]) -> None:
    """Prepares pipelined to a real daemon: one per domain, --max-sessions holds."""
    daemon = await daemons("--max-sessions", "2").launch(reactor)
    client = daemon.client(reactor)
    control = await client.connect()

    def ask(migrationId: str, domain: str) -> Deferred[Any]:
        return control.callRemote(
            commands.Prepare,
            migration_id=migrationId,
            domain=domain,
            protocol_version=commands.PROTOCOL_VERSION,
            devices=[fileDevice(daemon.dest / migrationId)],
        )

    same = await outcomes([ask(f"same{i}", "vm-same") for i in range(5)])
    accepted = [i for i, a in enumerate(same) if not isinstance(a, Failure)]
    assert len(accepted) == 1, same
    assert all(a.check(DuplicateMigration) for a in same if isinstance(a, Failure))
    assert await live(daemon) == [f"same{accepted[0]}"]
    await control.callRemote(
        commands.Abort, migration_id=f"same{accepted[0]}", reason="next"
    )

    many = await outcomes([ask(f"many{i}", f"vm{i}") for i in range(6)])
    admitted = [f"many{i}" for i, a in enumerate(many) if not isinstance(a, Failure)]
    assert len(admitted) == 2, many
    refused = [a for a in many if isinstance(a, Failure)]
    assert all(f.check(Busy) for f in refused), refused
    assert "--max-sessions 2" in str(refused[0].value)
    assert await live(daemon) == admitted

    await disconnect(reactor, control)  # its sessions abort with it

    async def nothingLive() -> bool:
        return await live(daemon) == [] and not daemon.leftovers()

    await eventually(reactor, nothingLive, what="the sessions aborted and cleaned")
    assert "Traceback" not in daemon.output()
    await settled(reactor)


@pytest.fixture
def smallStateDir(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs to be a daemon's state directory; as root (fails under CI)."""
    mountpoint = tmp_path / "daemon0" / "state"
    mountpoint.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if os.geteuid() != 0 or mounted.returncode != 0:
        reason = f"needs root and mount(8) for a small tmpfs: {mounted.stderr.strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run this test: {reason}")
        pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its filesystem is full."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest_twisted.ensureDeferred
async def test_fullStateDirectory(
    smallStateDir: Path, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    """
    A full state directory admits as many new sessions as the journal has
    spare files made ahead; a Prepare after those cannot be journalled and
    leaves no session behind.
    """
    daemon = await daemons().launch(reactor)
    assert daemon.stateDir == smallStateDir
    filler = fill(smallStateDir)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(4096))
    spec = DeviceSpec.parse(f"file:blob:path={source},target={daemon.dest}/vm1.bin")
    reserved = []
    for n in range(SPARES):
        other = DeviceSpec.parse(
            f"file:blob:path={source},target={daemon.dest}/reserved{n}.bin"
        )
        reserved.append(
            await daemon.client(reactor).prepare(f"vm-r{n}", [other], f"reserved{n}")
        )

    with pytest.raises(JournalUnavailable, match="could not record it") as caught:
        await daemon.client(reactor).prepare("vm1", [spec], "full1")
    assert "No space left on device" in str(caught.value)
    assert sorted(await live(daemon)) == sorted(f"reserved{n}" for n in range(SPARES))
    with pytest.raises(UnknownMigration):
        await daemon.status(reactor, "full1")
    assert "full1.journal" not in daemon.journals()
    for migration in reserved:
        await migration.abort("done")
    assert daemon.leftovers() == []
    assert list(daemon.dest.iterdir()) == []

    filler.unlink()  # room again: the domain and the id are free
    migration = await daemon.client(reactor).prepare("vm1", [spec], "full1")
    assert await live(daemon) == ["full1"]
    await migration.abort("done")
    assert "Traceback" not in daemon.output()
    await settled(reactor)
