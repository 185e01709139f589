"""Tests for the Twisted QMP client and the counting test guest."""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IUNIXTransport
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig.clients.qmp import (
    QEMUMigrationFailed,
    QMPConnectionError,
    QMPError,
    QMPProtocol,
    QMPTimeout,
)
from xenmig.clients.qmpclient import UNLIMITED_BANDWIDTH, QMPClient, connectQMP
from xenmig.demo import testguest
from xenmig.errors import DeviceError
from xenmig.testing import requirePrograms

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
    b'"package": ""}, "capabilities": ["oob"]}}\r\n'
)


@implementer(IUNIXTransport)
class UNIXStringTransport(StringTransport):
    """A StringTransport that records each passed descriptor with its byte offset."""

    def __init__(self) -> None:
        super().__init__()
        self.fds: list[tuple[int, int]] = []

    def sendFileDescriptor(self, fd: int) -> None:
        self.fds.append((len(self.value()), fd))


class FakeQEMU:
    """Answers the commands a QMPProtocol wrote, from a table of replies."""

    def __init__(self, transport: UNIXStringTransport, proto: QMPProtocol) -> None:
        self.transport = transport
        self.protocol = proto
        self.commands: list[dict[str, Any]] = []
        self.replies: dict[str, list[dict[str, Any]]] = {}
        self._read = 0

    def sent(self) -> list[dict[str, Any]]:
        """The commands written since the last call."""
        data = self.transport.value()[self._read :]
        self._read += len(data)
        new = [json.loads(line) for line in data.splitlines()]
        self.commands += new
        return new

    def pump(self) -> None:
        """Answer every command written so far, and those the answers cause."""
        while new := self.sent():
            for command in new:
                queue = self.replies.get(command["execute"], [{"return": {}}])
                reply = dict(queue.pop(0) if len(queue) > 1 else queue[0])
                reply["id"] = command["id"]
                self.protocol.dataReceived(json.dumps(reply).encode() + b"\r\n")

    def names(self) -> list[str]:
        return [command["execute"] for command in self.commands]


def connected(clock: Clock | None = None) -> tuple[QMPProtocol, FakeQEMU, Clock]:
    """A QMPProtocol on a fake transport that has just connected (no greeting)."""
    clock = clock or Clock()
    proto = QMPProtocol(clock)
    transport = UNIXStringTransport()
    proto.makeConnection(transport)
    return proto, FakeQEMU(transport, proto), clock


def ready(clock: Clock | None = None) -> tuple[QMPProtocol, FakeQEMU, Clock]:
    """A QMPProtocol that has had the greeting and negotiated capabilities."""
    proto, qemu, clock = connected(clock)
    proto.dataReceived(GREETING)
    qemu.pump()
    assert proto.ready
    return proto, qemu, clock


def reply(commandId: int, value: object) -> bytes:
    return json.dumps({"return": value, "id": commandId}).encode() + b"\r\n"


def event(name: str, data: object = None) -> bytes:
    message = {"event": name, "data": data or {}, "timestamp": {"seconds": 1}}
    return json.dumps(message).encode() + b"\r\n"


def result(d: Deferred[Any]) -> Any:
    """The result a fired Deferred holds (a Failure if it failed)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


# -- framing, matching, events -------------------------------------------------


def test_greetingNegotiatesCapabilities() -> None:
    """The protocol answers the greeting with qmp_capabilities and is then ready."""
    proto, qemu, _ = connected()
    d = proto.whenReady()
    proto.dataReceived(GREETING)
    assert [c["execute"] for c in qemu.sent()] == ["qmp_capabilities"]
    assert not d.called
    proto.dataReceived(reply(1, {}))
    assert result(d)["QMP"]["version"]["qemu"]["major"] == 7
    assert proto.ready


def test_executeBeforeGreetingFails() -> None:
    """A command issued before capabilities are negotiated fails clearly."""
    proto, qemu, _ = connected()
    failure = result(proto.execute("query-status"))
    assert failure.check(QMPConnectionError)
    assert "not ready" in failure.getErrorMessage()
    assert qemu.sent() == []


def test_repliesMatchedByIdOutOfOrder() -> None:
    """Replies that arrive out of order go to the command with their id."""
    proto, qemu, _ = ready()
    first = proto.execute("query-status")
    second = proto.execute("query-name")
    ids = [c["id"] for c in qemu.sent()]
    proto.dataReceived(reply(ids[1], {"name": "vm"}) + reply(ids[0], {"x": 1}))
    assert result(first) == {"x": 1}
    assert result(second) == {"name": "vm"}


def test_eventsBetweenRepliesGoToCallbacks() -> None:
    """Events interleaved with replies reach onEvent callbacks, in order."""
    proto, qemu, _ = ready()
    seen: list[tuple[str, object]] = []
    proto.onEvent("STOP", lambda e: seen.append(("STOP", e["data"])))
    unsubscribe = proto.onEvent("RESUME", lambda e: seen.append(("RESUME", 0)))
    d = proto.execute("stop")
    [command] = qemu.sent()
    proto.dataReceived(event("STOP") + event("RESUME") + reply(command["id"], {}))
    unsubscribe()
    proto.dataReceived(event("RESUME") + event("STOP", {"n": 2}))
    assert result(d) == {}
    assert seen == [("STOP", {}), ("RESUME", 0), ("STOP", {"n": 2})]


def test_errorReplyBecomesQMPError() -> None:
    """An error reply fails the command with QEMU's desc word for word."""
    proto, qemu, _ = ready()
    d = proto.execute("migrate", {"uri": "bogus:"})
    [command] = qemu.sent()
    desc = "Parameter 'uri' expects a valid migration protocol"
    error = {"class": "GenericError", "desc": desc}
    proto.dataReceived(
        json.dumps({"error": error, "id": command["id"]}).encode() + b"\r\n"
    )
    failure = result(d)
    assert failure.check(QMPError, DeviceError)
    assert failure.value.desc == desc
    assert failure.value.errorClass == "GenericError"
    assert str(failure.value) == f"QEMU refused 'migrate': {desc}"


def test_linesInPieces() -> None:
    """A greeting and a reply delivered a byte at a time are parsed whole."""
    proto, qemu, _ = connected()
    for i in range(len(GREETING)):
        proto.dataReceived(GREETING[i : i + 1])
    qemu.pump()
    d = proto.execute("query-status")
    [command] = qemu.sent()
    data = event("STOP") + reply(command["id"], {"status": "paused"})
    for i in range(len(data)):
        proto.dataReceived(data[i : i + 1])
    assert result(d) == {"status": "paused"}


def test_garbageBreaksTheConnection() -> None:
    """A line that is not JSON drops the connection and fails pending commands."""
    proto, qemu, _ = ready()
    d = proto.execute("query-status")
    proto.dataReceived(b"this is not json\r\n")
    assert qemu.transport.disconnecting
    proto.connectionLost(Failure(ConnectionError()))
    failure = result(d)
    assert failure.check(QMPConnectionError)
    assert "not JSON: b'this is not json'" in failure.getErrorMessage()


def test_overlongLineBreaksTheConnection() -> None:
    """A line longer than MAX_LENGTH drops the connection with a clear reason."""
    proto, qemu, _ = ready()
    proto.MAX_LENGTH = 100
    d = proto.execute("query-qmp-schema")
    proto.dataReceived(b"[" + b" " * 200)
    proto.connectionLost(Failure(ConnectionError()))
    assert qemu.transport.disconnecting
    assert "longer than 100 bytes" in result(d).getErrorMessage()


def test_connectionLostFailsPendingButNotQuit() -> None:
    """Closing the socket fails pending commands, except quit, which succeeds."""
    proto, qemu, _ = ready()
    status = proto.execute("query-status")
    quit = proto.execute("quit")
    closed = proto.whenClosed()
    proto.connectionLost(Failure(ConnectionError()))
    failure = result(status)
    assert failure.check(QMPConnectionError)
    assert "before 'query-status'" in failure.getErrorMessage()
    assert result(quit) == {}
    assert closed.called
    assert result(proto.execute("cont")).check(QMPConnectionError)


def test_connectionLostDuringNegotiationFailsTheWaiterOnce() -> None:
    """A QEMU gone while capabilities are negotiated fails whenReady, once."""
    errors: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(errors.append)
    try:
        proto, qemu, _ = connected()
        d = proto.whenReady()
        proto.dataReceived(GREETING)  # qmp_capabilities is now pending
        proto.connectionLost(Failure(ConnectionError()))
        assert result(d).check(QMPConnectionError)
        del proto, qemu
        gc.collect()  # an unhandled failure (AlreadyCalledError) is logged now
    finally:
        globalLogPublisher.removeObserver(errors.append)
    assert [e for e in errors if e.get("log_level") == LogLevel.critical] == []


def test_cancelledCommandIgnoresLateReply() -> None:
    """A cancelled command fails with CancelledError and its late reply is dropped."""
    proto, qemu, _ = ready()
    d = proto.execute("query-status")
    [command] = qemu.sent()
    d.cancel()
    proto.dataReceived(reply(command["id"], {"status": "running"}))
    assert result(d).check(CancelledError)
    later = proto.execute("query-name")
    proto.dataReceived(reply(qemu.sent()[0]["id"], {}))
    assert result(later) == {}


def test_strayRepliesAreDropped() -> None:
    """Replies without a known id, even with an odd id, disturb nothing."""
    proto, qemu, _ = ready()
    d = proto.execute("query-status")
    [command] = qemu.sent()
    error = {"class": "GenericError", "desc": "JSON parse error, invalid literal"}
    proto.dataReceived(json.dumps({"error": error}).encode() + b"\r\n")
    proto.dataReceived(reply(999, {}) + b'{"return": {}, "id": {"odd": [1]}}\r\n')
    assert not d.called and not qemu.transport.disconnecting
    proto.dataReceived(reply(command["id"], {"status": "running"}))
    assert result(d) == {"status": "running"}


def test_waitEventFires() -> None:
    """waitEvent fires with the next event of that name and leaves no timer."""
    proto, _, clock = ready()
    d = proto.waitEvent("SHUTDOWN", timeout=5)
    proto.dataReceived(event("STOP") + event("SHUTDOWN", {"guest": False}))
    assert result(d)["data"] == {"guest": False}
    assert not clock.getDelayedCalls()


def test_waitEventTimesOut() -> None:
    """waitEvent fails with QMPTimeout when the event does not come in time."""
    proto, _, clock = ready()
    d = proto.waitEvent("SHUTDOWN", timeout=2)
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.1)
    failure = result(d)
    assert failure.check(QMPTimeout)
    assert failure.getErrorMessage() == "no SHUTDOWN event from QEMU in 2s"
    assert not clock.getDelayedCalls()
    proto.dataReceived(event("SHUTDOWN"))


# -- file descriptors ----------------------------------------------------------


def test_sendFDAttachesDescriptorToGetfd() -> None:
    """sendFD queues the descriptor right before the first byte of its getfd."""
    proto, qemu, _ = ready()
    start = len(qemu.transport.value())
    d = proto.sendFD(42, "mine")
    assert qemu.transport.fds == [(start, 42)]
    [command] = qemu.sent()
    assert command["execute"] == "getfd"
    assert command["arguments"] == {"fdname": "mine"}
    proto.dataReceived(reply(command["id"], {}))
    assert result(d) == {}


def test_sendFDOneAtATime() -> None:
    """A second descriptor is not sent before QEMU has taken the first one."""
    proto, qemu, _ = ready()
    first = proto.sendFD(5, "a")
    second = proto.sendFD(6, "b")
    [command] = qemu.sent()
    assert [fd for _, fd in qemu.transport.fds] == [5]
    proto.dataReceived(reply(command["id"], {}))
    assert [fd for _, fd in qemu.transport.fds] == [5, 6]
    qemu.pump()
    assert result(first) == {} and result(second) == {}


def test_sendFDNeedsAUnixSocket() -> None:
    """sendFD fails clearly on a transport that cannot carry descriptors."""
    proto = QMPProtocol(Clock())
    proto.makeConnection(StringTransport())
    failure = result(proto.sendFD(3, "x"))
    assert failure.check(QMPConnectionError)
    assert "unix socket" in failure.getErrorMessage()


# -- migration helpers, scripted -----------------------------------------------


def scriptedClient() -> tuple[QMPClient, FakeQEMU, Clock]:
    proto, qemu, clock = ready()
    qemu.commands.clear()
    return QMPClient(clock, proto, pollInterval=0.5), qemu, clock


def pollUntilFired(d: Deferred[Any], qemu: FakeQEMU, clock: Clock) -> Any:
    for _ in range(20):
        qemu.pump()
        if d.called:
            break
        clock.advance(0.5)
    assert not clock.getDelayedCalls()
    return result(d)


def test_migrateToFDPollsToCompleted() -> None:
    """migrateToFD raises the bandwidth cap, passes the fd and polls to completed."""
    client, qemu, clock = scriptedClient()
    qemu.replies["query-migrate"] = [
        {"return": {"status": "setup"}},
        {"return": {"status": "active"}},
        {"return": {"status": "completed", "total-time": 3}},
    ]
    info = pollUntilFired(client.migrateToFD(9, 2**40), qemu, clock)
    assert info == {"status": "completed", "total-time": 3}
    assert (
        qemu.names()
        == ["migrate-set-parameters", "getfd", "migrate"] + ["query-migrate"] * 3
    )
    setParameters, getfd, migrate = qemu.commands[:3]
    assert setParameters["arguments"] == {"max-bandwidth": 2**40}
    assert migrate["arguments"]["uri"] == "fd:" + getfd["arguments"]["fdname"]
    assert [fd for _, fd in qemu.transport.fds] == [9]


def test_migrateToFDFailsWithErrorDesc() -> None:
    """migrateToFD fails with QEMU's error-desc word for word when it failed."""
    client, qemu, clock = scriptedClient()
    desc = "Unable to write to socket: Broken pipe"
    qemu.replies["query-migrate"] = [
        {"return": {"status": "active"}},
        {"return": {"status": "failed", "error-desc": desc}},
    ]
    failure = pollUntilFired(client.migrateToFD(9, 2**40), qemu, clock)
    assert failure.check(QEMUMigrationFailed, DeviceError)
    assert failure.value.desc == desc
    assert str(failure.value) == f"QEMU migration failed: {desc}"


def test_migrateRefusedClosesTheFD() -> None:
    """When QEMU refuses migrate, the passed fd is closed by name and the error kept."""
    client, qemu, clock = scriptedClient()
    error = {"class": "GenericError", "desc": "There's a migration process in progress"}
    qemu.replies["migrate"] = [{"error": error}]
    failure = pollUntilFired(client.migrateToFD(9, 2**40), qemu, clock)
    assert failure.value.desc == "There's a migration process in progress"
    assert qemu.names()[-2:] == ["migrate", "closefd"]
    assert qemu.commands[-1]["arguments"] == qemu.commands[1]["arguments"]


def test_cancelMigrateToFDSendsMigrateCancel() -> None:
    """Cancelling migrateToFD while it polls sends migrate_cancel and stops polling."""
    client, qemu, clock = scriptedClient()
    qemu.replies["query-migrate"] = [{"return": {"status": "active"}}]
    d = client.migrateToFD(9, 2**40)
    qemu.pump()
    d.cancel()
    qemu.pump()
    assert result(d).check(CancelledError)
    assert qemu.names()[-1] == "migrate_cancel"
    assert not clock.getDelayedCalls()


def test_migrateIncomingWaitsForPaused() -> None:
    """migrateIncomingFromFD waits for completed and a run state past inmigrate."""
    client, qemu, clock = scriptedClient()
    qemu.replies["query-migrate"] = [
        {"return": {"status": "active"}},
        {"return": {"status": "completed"}},
    ]
    qemu.replies["query-status"] = [
        {"return": {"status": "inmigrate"}},
        {"return": {"status": "paused"}},
    ]
    state = pollUntilFired(client.migrateIncomingFromFD(11), qemu, clock)
    assert state == "paused"
    getfd, incoming = qemu.commands[:2]
    assert incoming["execute"] == "migrate-incoming"
    assert incoming["arguments"]["uri"] == "fd:" + getfd["arguments"]["fdname"]


# -- connecting ------------------------------------------------------------------


def test_connectTimesOutWithoutConnection() -> None:
    """connectQMP gives up with a clear error when the connect never completes."""
    reactor = MemoryReactorClock()
    d = connectQMP(reactor, "/run/qemu/vm.qmp", timeout=3)
    reactor.advance(3)
    failure = result(d)
    assert failure.check(QMPConnectionError)
    assert "no QMP greeting from /run/qemu/vm.qmp within 3s" in str(failure.value)
    assert reactor.connectors[0].stoppedConnecting
    assert not reactor.getDelayedCalls()


def test_connectTimesOutWithoutGreeting() -> None:
    """connectQMP closes a connection that sends no greeting in time."""
    reactor = MemoryReactorClock()
    d = connectQMP(reactor, "/run/qemu/vm.qmp", timeout=3)
    factory = reactor.unixClients[0][1]
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    reactor.advance(3)
    assert result(d).check(QMPConnectionError)
    assert transport.disconnecting
    assert not reactor.getDelayedCalls()


def test_connectReturnsReadyClient() -> None:
    """connectQMP fires with a client once capabilities are negotiated."""
    reactor = MemoryReactorClock()
    d = connectQMP(reactor, "/run/qemu/vm.qmp", timeout=3)
    factory = reactor.unixClients[0][1]
    transport = UNIXStringTransport()
    proto = factory.buildProtocol(None)
    proto.makeConnection(transport)
    proto.dataReceived(GREETING + reply(1, {}))
    client = result(d)
    assert isinstance(client, QMPClient)
    assert client.protocol.ready
    assert not reactor.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_connectToMissingSocket(workdir: str) -> None:
    """connectQMP says there is no socket, and how QEMU should be started."""
    from twisted.internet import reactor

    path = os.path.join(workdir, "absent.qmp")
    with pytest.raises(QMPConnectionError) as caught:
        await connectQMP(reactor, path, timeout=5)
    assert str(caught.value) == (
        f"no QMP socket at {path} "
        f"(is QEMU running with -qmp unix:{path},server=on,wait=off?)"
    )


@pytest_twisted.ensureDeferred
async def test_connectToRefusingSocket(workdir: str) -> None:
    """connectQMP reports a refused connection when nothing listens."""
    from twisted.internet import reactor

    path = os.path.join(workdir, "dead.qmp")
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(path)
        with pytest.raises(QMPConnectionError) as caught:
            await connectQMP(reactor, path, timeout=5)
    assert "refused the connection" in str(caught.value)


# -- the test guest, offline -----------------------------------------------------


def test_guestImageShape() -> None:
    """The guest image is 64 KiB with a far jump to the counting loop at reset."""
    image = testguest.guestImage()
    assert len(image) == 65536
    assert image[0xFFF0:0xFFF5] == bytes.fromhex("ea000000f0")
    assert image[0x0E:0x13] == bytes.fromhex("66ff060005")  # inc dword [0x500]


def test_targetCommandWaitsForIncoming() -> None:
    """The target's command line defers the incoming migration and starts paused."""
    source = testguest.qemuCommand("/g.rom", "/s.qmp")
    target = testguest.qemuCommand("/g.rom", "/t.qmp", incoming=True)
    assert target[: len(source)] == source[:-1] + ["unix:/t.qmp,server=on,wait=off"]
    assert target[len(source) :] == ["-S", "-incoming", "defer"]
    assert "-incoming" not in source


# -- real QEMU -------------------------------------------------------------------


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="xenmig-qmp-")
    yield path
    shutil.rmtree(path)


@pytest.fixture
def qemu() -> str:
    requirePrograms(testguest.QEMU)
    path = testguest.findQEMU()
    assert path is not None
    return path


class Guests:
    """Starts counting guests in a directory and ends them all afterwards."""

    def __init__(self, reactor: Any, directory: str) -> None:
        self.reactor = reactor
        self.directory = directory
        self.image = os.path.join(directory, "guest.rom")
        testguest.writeGuestImage(self.image)
        self.started: list[testguest.RunningGuest] = []

    async def start(self, name: str, incoming: bool = False) -> testguest.RunningGuest:
        socketPath = os.path.join(self.directory, name + ".qmp")
        guest = await testguest.startGuest(
            self.reactor, self.image, socketPath, incoming
        )
        self.started.append(guest)
        return guest

    async def endAll(self) -> None:
        for guest in self.started:
            await guest.terminate()
            await guest.qmp.protocol.whenClosed()

    async def sleep(self, seconds: float) -> None:
        await deferLater(self.reactor, seconds, lambda: None)


@pytest_twisted.async_yield_fixture
async def guests(qemu: str, workdir: str) -> Any:
    from twisted.internet import reactor

    before = set(reactor.getReaders()) | set(reactor.getWriters())
    pool = Guests(reactor, workdir)
    yield pool
    await pool.endAll()
    assert set(reactor.getReaders()) | set(reactor.getWriters()) <= before
    assert not [call for call in reactor.getDelayedCalls() if call.active()]


class Collect(protocol.Protocol):
    """Writes what arrives on an adopted socket into a file, until EOF."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "wb")  # closed at connectionLost
        self.done: Deferred[int] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.file.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        size = self.file.tell()
        self.file.close()
        self.done.callback(size)


class Feed(protocol.Protocol):
    """Writes a file's bytes into an adopted socket, then closes it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        with open(self.path, "rb") as f:
            self.transport.write(f.read())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.done.callback(None)


def adopt(reactor: Any, sock: socket.socket, proto: protocol.Protocol) -> None:
    """Give one end of a socketpair to the reactor (it keeps a duplicate)."""
    factory = protocol.Factory.forProtocol(lambda: proto)
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, factory)
    sock.close()


async def saveState(guests: Guests, guest: testguest.RunningGuest, path: str) -> Any:
    """Migrate a stopped guest into ``path`` through a socketpair; the final info."""
    mine, theirs = socket.socketpair()
    collect = Collect(path)
    adopt(guests.reactor, theirs, collect)
    with mine:
        info = await guest.qmp.migrateToFD(mine.fileno(), UNLIMITED_BANDWIDTH)
    await collect.done
    return info


async def loadState(guests: Guests, guest: testguest.RunningGuest, path: str) -> str:
    """Feed ``path`` into a ``-incoming defer`` guest through a socketpair."""
    mine, theirs = socket.socketpair()
    feed = Feed(path)
    adopt(guests.reactor, theirs, feed)
    try:
        with mine:
            return await guest.qmp.migrateIncomingFromFD(mine.fileno())
    finally:
        await feed.done


async def countsPast(guests: Guests, guest: testguest.RunningGuest, value: int) -> None:
    """Return once the guest's counter is above ``value`` (within 4 s)."""
    for _ in range(200):
        if await guest.readCounter() > value:
            return
        await guests.sleep(0.02)
    raise AssertionError(f"the guest's counter did not pass {value} in 4s")


@pytest_twisted.ensureDeferred
async def test_guestCountsOnlyWhileRunning(guests: Guests) -> None:
    """The guest's counter increases while it runs and holds still when stopped."""
    guest = await guests.start("vm")
    first = await guest.readCounter()
    await countsPast(guests, guest, first)
    await guest.qmp.stop()
    assert await guest.qmp.queryStatus() == "paused"
    stopped = await guest.readCounter()
    await guests.sleep(0.2)
    assert await guest.readCounter() == stopped
    await guest.qmp.cont()
    assert await guest.qmp.queryStatus() == "running"
    await countsPast(guests, guest, stopped)


@pytest_twisted.ensureDeferred
async def test_migrateThroughDescriptors(guests: Guests) -> None:
    """State saved through a passed fd loads into an incoming QEMU that counts on."""
    source = await guests.start("source")
    await countsPast(guests, source, 100)
    await source.qmp.stop()
    atStop = await source.readCounter()
    statePath = os.path.join(guests.directory, "state")
    info = await saveState(guests, source, statePath)
    assert info["status"] == "completed"
    assert await source.qmp.queryStatus() == "postmigrate"
    with open(statePath, "rb") as f:
        assert f.read(4) == b"QEVM"
    assert os.path.getsize(statePath) > 64 * 1024

    target = await guests.start("target", incoming=True)
    assert await target.qmp.queryStatus() == "inmigrate"
    assert await loadState(guests, target, statePath) == "paused"
    assert await target.readCounter() == atStop
    await target.qmp.cont()
    await countsPast(guests, target, atStop)


@pytest_twisted.ensureDeferred
async def test_sourceResumesAfterMigration(guests: Guests) -> None:
    """After migrating out, the source still resumes with cont and counts on."""
    source = await guests.start("source")
    await source.qmp.stop()
    atStop = await source.readCounter()
    await saveState(guests, source, os.path.join(guests.directory, "state"))
    await source.qmp.cont()
    assert await source.qmp.queryStatus() == "running"
    await countsPast(guests, source, atStop)


@pytest_twisted.ensureDeferred
async def test_migrationFailureGivesErrorDesc(guests: Guests) -> None:
    """A migration into a socket nobody reads fails with QEMU's error-desc."""
    source = await guests.start("source")
    await source.qmp.stop()
    mine, theirs = socket.socketpair()
    theirs.close()
    with mine, pytest.raises(QEMUMigrationFailed) as caught:
        await source.qmp.migrateToFD(mine.fileno(), UNLIMITED_BANDWIDTH)
    info = await source.qmp.execute("query-migrate")
    assert info["status"] == "failed"
    assert caught.value.desc == info["error-desc"]
    assert "Broken pipe" in caught.value.desc


@pytest_twisted.ensureDeferred
async def test_qmpErrorIsWordForWord(guests: Guests) -> None:
    """A command QEMU rejects fails with QEMU's desc word for word."""
    guest = await guests.start("vm")
    with pytest.raises(QMPError) as caught:
        await guest.qmp.execute("migrate", {"uri": "bogus:nowhere"})
    assert caught.value.desc == "Parameter 'uri' expects a valid migration protocol"
    assert caught.value.errorClass == "GenericError"
    assert str(caught.value) == f"QEMU refused 'migrate': {caught.value.desc}"


@pytest_twisted.ensureDeferred
async def test_targetRejectsGarbage(guests: Guests) -> None:
    """Loading bytes that are no migration stream fails, and QEMU says why."""
    target = await guests.start("target", incoming=True)
    garbage = os.path.join(guests.directory, "garbage")
    with open(garbage, "wb") as f:
        f.write(b"not a migration stream\n" * 50)
    with pytest.raises(QEMUMigrationFailed) as caught:
        await loadState(guests, target, garbage)
    assert "exited while loading" in str(caught.value)
    await target.process.whenEnded()
    assert b"Not a migration stream" in target.process.stderr


@pytest_twisted.ensureDeferred
async def test_quitSucceedsAndQEMUExits(guests: Guests) -> None:
    """quit succeeds even though QEMU may close the socket before answering."""
    guest = await guests.start("vm")
    assert await guest.qmp.quit() == {}
    await guest.process.whenEnded()
    assert guest.process.ended is not None
    assert guest.process.ended.check(ProcessDone)  # exit status 0


def docExample() -> dict[str, Any]:
    """Run the Python example of doc/qmp.md and return what it defines."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "doc", "qmp.md")
    with open(path) as f:
        text = f.read()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "doc/qmp.md", "exec"), namespace)
    return namespace


@pytest_twisted.ensureDeferred
async def test_docExampleSavesTheState(guests: Guests) -> None:
    """The example in doc/qmp.md stops a guest and saves its state into an fd."""
    guest = await guests.start("vm")
    await guest.qmp.close()  # QEMU serves one QMP client at a time
    qmpPath = os.path.join(guests.directory, "vm.qmp")
    statePath = os.path.join(guests.directory, "state")
    mine, theirs = socket.socketpair()
    collect = Collect(statePath)
    adopt(guests.reactor, theirs, collect)
    with mine:
        outcome = await docExample()["saveDeviceModel"](
            guests.reactor, qmpPath, mine.fileno()
        )
    assert outcome == ("completed", "postmigrate")
    assert await collect.done > 64 * 1024
    with open(statePath, "rb") as f:
        assert f.read(4) == b"QEVM"
