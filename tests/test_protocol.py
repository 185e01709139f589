"""The control protocol and state streams in memory: iosim, StringTransport, Clock."""

import ast
import json
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test import iosim
from zope.interface.verify import verifyObject

from xenmig import amp_commands as commands
from xenmig.digest import hashBytes
from xenmig.errors import (
    BadToken,
    DigestMismatch,
    DuplicateMigration,
    InvalidTransition,
    MigrationAborted,
    VersionMismatch,
)
from xenmig.interfaces import IMigrationTarget, IReceivingSession
from xenmig.protocol import ControlProtocol
from xenmig.records import (
    DataRecord,
    EndRecord,
    encodeData,
    encodeEnd,
    encodeStreamHeader,
)
from xenmig.streamreceiver import StreamReceiver
from xenmig.target.config import TargetConfig, Timeouts
from xenmig.target.core import MigrationTarget
from xenmig.target.recordfiles import readRecords
from xenmig.target.session import Phase
from xenmig.testing import MemoryKind

STATE = b"device state " * 1000
SIZE = len(STATE)


def syncRunner(function, *args, **kw):
    return maybeDeferred(function, *args, **kw)


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def kind():
    return MemoryKind()


@pytest.fixture
def target(tmp_path, clock, kind):
    timeouts = Timeouts(idle=5, prepared=30, receiving=60, ready=60, token=10)
    config = TargetConfig(FilePath(str(tmp_path)), timeouts=timeouts)
    return MigrationTarget(clock, config, {"memory": kind}, syncRunner)


def connect(target):
    """A control connection (plaintext, in memory) and its pump."""
    client, server, pump = iosim.connectedServerAndClient(
        ServerClass=lambda: ControlProtocol(target, tls=False),
        ClientClass=amp.AMP,
        greet=True,
    )
    server.peer = "source.test"  # as a TLS handshake would name it
    return server, client, pump


def call(pump, client, command, **kw):
    """Call a command, pump until answered, and return the result or raise."""
    results = []
    client.callRemote(command, **kw).addBoth(results.append)
    pump.flush()
    assert results, f"{command.__name__} was not answered"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def device(name="dev", size=SIZE, **params):
    return {
        "kind": "memory",
        "name": name,
        "size": size,
        "precopy": False,
        "params": params,
    }


def prepare(pump, client, migrationId="m1", devices=None):
    return call(
        pump,
        client,
        commands.Prepare,
        migration_id=migrationId,
        domain="vm1",
        protocol_version=commands.PROTOCOL_VERSION,
        devices=devices or [device()],
    )


class RawSender(Protocol):
    """The raw end of a stream after the protocol switch."""

    def connectionMade(self):
        self.connected_ = True


class SwitchFactory(ClientFactory):
    def __init__(self):
        self.sender = RawSender()

    def buildProtocol(self, addr):
        return self.sender


def openStream(target, pump, client, name="dev", migrationId="m1"):
    """Open a device stream on a second connection; the raw sender and its pump."""
    token = call(
        pump, client, commands.OpenStream, migration_id=migrationId, device=name
    )["token"]
    _, streamClient, streamPump = connect(target)
    factory = SwitchFactory()
    call(
        streamPump,
        streamClient,
        commands.StartStream,
        token=token,
        _protoToSwitchToFactory=factory,
    )
    return factory.sender, streamPump


def sendState(sender, pump, data=STATE, digest=None):
    digest = digest or hashBytes(data)
    sender.transport.write(encodeStreamHeader())
    sender.transport.writeSequence(encodeData(0, data))
    sender.transport.writeSequence(
        encodeEnd(digest.size, digest.algorithm, digest.digest)
    )
    pump.flush()


def test_fullMigration(target, kind, clock):
    """Prepare, stream, verify and commit install the state and fire the gate."""
    server, client, pump = connect(target)
    answer = prepare(pump, client)
    assert answer["offers"][0]["accepted"] is True
    assert answer["offers"][0]["params"] == {"accepted-by": "memory"}
    restored = target.awaitRestored("vm1", 60)
    sender, streamPump = openStream(target, pump, client)
    sendState(sender, streamPump)
    ready = call(pump, client, commands.DeviceReady, migration_id="m1", device="dev")
    assert ready["digest"] == hashBytes(STATE).digest
    assert target.sessions["m1"].phase is Phase.READY
    installed = call(pump, client, commands.Commit, migration_id="m1")["installed"]
    assert installed == ["memory:dev"]
    assert bytes(kind.targets[0].data) == STATE
    assert kind.targets[0].committed
    assert restored.result.migrationId == "m1"
    status = call(pump, client, commands.QueryMigration, migration_id="m1")["status"]
    assert status["phase"] == "COMMITTED"
    assert status["peer"] == "source.test"
    assert status["devices"][0]["bytes_done"] == len(STATE)
    assert not clock.getDelayedCalls()


def test_refusedDevice(target, kind):
    """A refused device refuses the migration, with the handler's reason."""
    server, client, pump = connect(target)
    answer = prepare(
        pump, client, devices=[device("a"), device("b", refuse="no keys here")]
    )
    offers = {o["name"]: o for o in answer["offers"]}
    assert offers["a"]["accepted"] and not offers["b"]["accepted"]
    assert "no keys here" in offers["b"]["reason"]
    assert "m1" not in target.sessions
    assert kind.targets[0].aborted
    # The operator of the target sees the refusal and why ...
    status = call(pump, client, commands.QueryMigration, migration_id="m1")["status"]
    assert status["phase"] == "ABORTED"
    assert status["reason"].startswith("refused at Prepare: ")
    assert "no keys here" in status["reason"]
    states = {d["name"]: d["state"] for d in status["devices"]}
    assert states == {"a": "ABORTED", "b": "REFUSED"}
    # ... and the same id may be prepared again once the cause is fixed.
    again = prepare(pump, client, devices=[device("a"), device("b")])
    assert all(o["accepted"] for o in again["offers"])
    assert target.sessions["m1"].phase is Phase.PREPARED


def test_unknownKind(target):
    """A kind this host has no handler for is refused by name."""
    server, client, pump = connect(target)
    answer = prepare(pump, client, devices=[{**device(), "kind": "warp-drive"}])
    assert "no handler for device kind 'warp-drive'" in answer["offers"][0]["reason"]


def test_versionMismatch(target):
    """A newer control protocol version is refused with a clear error."""
    server, client, pump = connect(target)
    with pytest.raises(VersionMismatch, match="version 99"):
        call(
            pump,
            client,
            commands.Prepare,
            migration_id="m1",
            domain="vm1",
            protocol_version=99,
            devices=[device()],
        )


def test_duplicate(target):
    """A second Prepare with the same migration id is refused."""
    server, client, pump = connect(target)
    prepare(pump, client)
    with pytest.raises(DuplicateMigration):
        prepare(pump, client)


def test_tokenSingleUse(target):
    """A stream token works once; a second use is refused."""
    server, client, pump = connect(target)
    prepare(pump, client)
    token = call(pump, client, commands.OpenStream, migration_id="m1", device="dev")[
        "token"
    ]
    _, c1, p1 = connect(target)
    call(
        p1,
        c1,
        commands.StartStream,
        token=token,
        _protoToSwitchToFactory=SwitchFactory(),
    )
    _, c2, p2 = connect(target)
    with pytest.raises(BadToken):
        call(
            p2,
            c2,
            commands.StartStream,
            token=token,
            _protoToSwitchToFactory=SwitchFactory(),
        )


def test_tokenOtherPeer(target):
    """A token presented by another host is refused."""
    server, client, pump = connect(target)
    prepare(pump, client)
    token = target.openStream(server.peer, "m1", "dev")
    with pytest.raises(BadToken, match="another host"):
        target.claimToken("thief.example", token)


def test_tokenExpires(target, clock):
    """A token not used within its lifetime is refused."""
    server, client, pump = connect(target)
    prepare(pump, client)
    token = target.openStream(server.peer, "m1", "dev")
    clock.advance(11)
    with pytest.raises(BadToken):
        target.claimToken(server.peer, token)


def test_digestMismatch(target, kind):
    """A stream whose END digest does not match aborts; DeviceReady says why."""
    server, client, pump = connect(target)
    prepare(pump, client)
    sender, streamPump = openStream(target, pump, client)
    sendState(sender, streamPump, digest=hashBytes(b"something else"))
    with pytest.raises(DigestMismatch, match="does not match the source"):
        call(pump, client, commands.DeviceReady, migration_id="m1", device="dev")
    assert target.sessions["m1"].phase is Phase.ABORTED
    assert kind.targets[0].aborted


def test_commitBeforeReady(target):
    """Commit before every device is READY is refused and changes nothing."""
    server, client, pump = connect(target)
    prepare(pump, client)
    with pytest.raises(InvalidTransition, match="commit needs every device READY"):
        call(pump, client, commands.Commit, migration_id="m1")
    assert target.sessions["m1"].phase is Phase.PREPARED


def test_abortBySource(target, kind, clock):
    """Abort discards the device and answers the phase; later calls see the reason."""
    server, client, pump = connect(target)
    prepare(pump, client)
    phase = call(pump, client, commands.Abort, migration_id="m1", reason="VM crashed")
    assert phase["phase"] == "ABORTED"
    assert kind.targets[0].aborted
    with pytest.raises(MigrationAborted, match="VM crashed"):
        call(pump, client, commands.OpenStream, migration_id="m1", device="dev")
    assert not clock.getDelayedCalls()


def test_controlConnectionLost(target, kind):
    """Losing the control connection before commit aborts the session."""
    server, client, pump = connect(target)
    prepare(pump, client)
    client.transport.loseConnection()
    pump.flush()
    session = target.sessions["m1"]
    assert session.phase is Phase.ABORTED
    assert "control connection was lost" in session.reason


def test_streamCutOff(target, kind):
    """A stream lost before its END record aborts, naming the device."""
    server, client, pump = connect(target)
    prepare(pump, client)
    sender, streamPump = openStream(target, pump, client)
    sender.transport.write(encodeStreamHeader())
    sender.transport.writeSequence(encodeData(0, STATE[:100]))
    streamPump.flush()
    sender.transport.loseConnection()
    streamPump.flush()
    session = target.sessions["m1"]
    assert session.phase is Phase.ABORTED
    assert "stream of device dev was cut off" in session.reason


def test_deviceRequest(target):
    """A handler-scoped request reaches the target device and answers."""
    server, client, pump = connect(target)
    prepare(pump, client)
    answer = call(
        pump,
        client,
        commands.DeviceRequest,
        migration_id="m1",
        device="dev",
        method="echo",
        payload={"x": 1},
    )
    assert answer["payload"] == {"echo": {"x": 1}}


def test_listMigrations(target):
    """ListMigrations reports sessions, newest first."""
    server, client, pump = connect(target)
    prepare(pump, client, "m1")
    client.transport.loseConnection()
    pump.flush()
    server, client, pump = connect(target)
    prepare(pump, client, "m2")
    listed = call(pump, client, commands.ListMigrations, limit=10)["migrations"]
    assert [m["migration_id"] for m in listed] == ["m2", "m1"]


# -- the stream receiver alone, with a StringTransport and a Clock -------------------


def receiver(target, clock):
    server, client, pump = connect(target)
    prepare(pump, client)
    session = target.sessions["m1"]
    session.streamStarted("dev")
    protocol = StreamReceiver(session, "dev", idleTimeout=5)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, session


def test_idleTimeout(target, clock):
    """A stream silent for longer than the idle time-out aborts, naming it."""
    protocol, transport, session = receiver(target, clock)
    protocol.dataReceived(encodeStreamHeader())
    clock.advance(4)
    protocol.dataReceived(b"".join(encodeData(0, b"abc")))
    clock.advance(4)
    assert session.phase is Phase.RECEIVING  # reset by the data
    clock.advance(1.5)
    assert session.phase is Phase.ABORTED
    assert "idle for more than 5 seconds" in session.reason
    assert transport.disconnecting or transport.disconnected


def test_backpressure(target, clock, kind):
    """A device that asks to wait pauses the transport until it is ready again."""
    protocol, transport, session = receiver(target, clock)
    kind.targets[0].hold = Deferred()
    data = encodeStreamHeader() + b"".join(encodeData(0, b"a" * 10))
    data += b"".join(encodeData(10, b"b" * 10))
    protocol.dataReceived(data)
    assert transport.producerState == "paused"
    assert len(kind.targets[0].records) == 1
    hold, kind.targets[0].hold = kind.targets[0].hold, None
    hold.callback(None)
    assert transport.producerState == "producing"
    assert bytes(kind.targets[0].data[:20]) == b"a" * 10 + b"b" * 10


def test_garbageStream(target, clock):
    """Garbage instead of a stream header aborts the session and drops the stream."""
    protocol, transport, session = receiver(target, clock)
    protocol.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    assert session.phase is Phase.ABORTED
    assert "magic" in session.reason
    assert transport.disconnecting or transport.disconnected


def test_recordBeyondSize(target, clock):
    """A record beyond the declared size aborts with the device's reason."""
    protocol, transport, session = receiver(target, clock)
    protocol.dataReceived(
        encodeStreamHeader() + b"".join(encodeData(len(STATE), b"overflow"))
    )
    assert session.phase is Phase.ABORTED
    assert "exceed the declared size" in session.reason


def test_phaseDeadline(target, clock):
    """A session stuck in PREPARED past its deadline aborts, naming the phase."""
    server, client, pump = connect(target)
    prepare(pump, client)
    clock.advance(31)
    session = target.sessions["m1"]
    assert session.phase is Phase.ABORTED
    assert "PREPARED phase did not finish within 30 seconds" in session.reason
    assert not clock.getDelayedCalls()


def test_endRecordVerifies(target, clock, kind):
    """An END record moves the device to READY once the digests agree."""
    protocol, transport, session = receiver(target, clock)
    digest = hashBytes(STATE)
    protocol.dataReceived(
        encodeStreamHeader()
        + b"".join(encodeData(0, STATE))
        + b"".join(encodeEnd(digest.size, digest.algorithm, digest.digest))
    )
    assert session.phase is Phase.READY
    assert isinstance(kind.targets[0].records[0], DataRecord)
    assert not isinstance(kind.targets[0].records[-1], EndRecord)


def test_endWaitingBehindPausedDevice(target, clock, kind):
    """A stream closed right after its END, while the device holds it paused, ends
    READY once the device catches up, not cut off."""
    protocol, transport, session = receiver(target, clock)
    kind.targets[0].hold = Deferred()
    digest = hashBytes(STATE)
    protocol.dataReceived(
        encodeStreamHeader()
        + b"".join(encodeData(0, STATE))
        + b"".join(encodeEnd(digest.size, digest.algorithm, digest.digest))
    )
    protocol.connectionLost(Failure(ConnectionDone()))
    assert session.phase is Phase.RECEIVING
    hold, kind.targets[0].hold = kind.targets[0].hold, None
    hold.callback(None)
    assert session.phase is Phase.READY


def test_cutOffBehindPausedDevice(target, clock, kind):
    """A stream closed before its END, while the device holds it paused, aborts
    once the waiting records are handed over."""
    protocol, transport, session = receiver(target, clock)
    kind.targets[0].hold = Deferred()
    protocol.dataReceived(encodeStreamHeader() + b"".join(encodeData(0, b"abc")))
    protocol.connectionLost(Failure(ConnectionDone()))
    assert session.phase is Phase.RECEIVING
    hold, kind.targets[0].hold = kind.targets[0].hold, None
    hold.callback(None)
    assert session.phase is Phase.ABORTED
    assert "was cut off" in session.reason


# -- the protocols' contract with the core --------------------------------------------

#: The top-level modules of the contract and the wire, and the rooms above them.
WIRE_MODULES = ("protocol.py", "factories.py", "streamreceiver.py")
HIGHER_ROOMS = ("xenmig.target", "xenmig.source", "xenmig.cli", "xenmig.demo")


def importedModules(path):
    """Every module ``path`` imports, anywhere in it (TYPE_CHECKING blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("name", WIRE_MODULES)
def test_wireModulesImportNoRoom(name):
    """The protocols and factories know the core only by its interface."""
    xenmig = Path(__file__).resolve().parent.parent / "xenmig"
    imported = importedModules(xenmig / name)
    higher = {m for m in imported if m.startswith(HIGHER_ROOMS)}
    assert higher == set(), name


def test_coreProvidesItsInterfaces(target):
    """The target core and its sessions provide what the protocols call."""
    assert verifyObject(IMigrationTarget, target)
    server, client, pump = connect(target)
    prepare(pump, client)
    assert verifyObject(IReceivingSession, target.sessions["m1"])


def test_idleControlConnectionWithSession(kind, clock, tmp_path):
    """A control connection whose migration runs is not closed as idle; once the
    migration has finished, it is."""
    config = TargetConfig(FilePath(str(tmp_path)), timeouts=Timeouts(prepared=1000))
    target = MigrationTarget(clock, config, {"memory": kind}, syncRunner)
    client, server, pump = iosim.connectedServerAndClient(
        ServerClass=lambda: ControlProtocol(target, tls=False, idleTimeout=10),
        ClientClass=amp.AMP,
        greet=True,
    )
    server.peer = "source.test"
    prepare(pump, client)
    clock.advance(11)
    assert not server.transport.disconnecting
    assert target.hasActiveWork({"m1"})
    call(pump, client, commands.Abort, migration_id="m1", reason="done")
    assert not target.hasActiveWork({"m1"})
    clock.advance(11)
    assert server.transport.disconnecting
    pump.flush()
    assert not clock.getDelayedCalls()


def test_lostConnectionSparesCommitting(target, kind):
    """A lost control connection aborts its PREPARED sessions, not a COMMITTING one."""
    server, client, pump = connect(target)
    prepare(pump, client, "m1")
    call(
        pump,
        client,
        commands.Prepare,
        migration_id="m2",
        domain="vm2",
        protocol_version=commands.PROTOCOL_VERSION,
        devices=[device()],
    )
    sender, streamPump = openStream(target, pump, client, migrationId="m2")
    sendState(sender, streamPump)
    installing = Deferred()
    kind.targets[1].commit = lambda: installing  # the install takes a while
    committed = Deferred.fromCoroutine(target.commit("source.test", "m2"))
    assert target.sessions["m2"].phase is Phase.COMMITTING
    target.controlConnectionLost("source.test", {"m1", "m2", "unknown"})
    assert target.sessions["m1"].phase is Phase.ABORTED
    assert target.sessions["m2"].phase is Phase.COMMITTING
    installing.callback(["memory:dev"])
    assert committed.result == ["memory:dev"]
    assert target.sessions["m2"].phase is Phase.COMMITTED


def test_claimAfterRefusalJournalsTheCommit(target, tmp_path):
    """A migration prepared again after a refusal, committed and claimed, stays
    COMMITTED in the journal (the old refusal's record is not written back)."""
    server, client, pump = connect(target)
    prepare(pump, client, devices=[device("dev", refuse="not yet")])
    prepare(pump, client)
    restored = target.awaitRestored("vm1", 60)
    sender, streamPump = openStream(target, pump, client)
    sendState(sender, streamPump)
    call(pump, client, commands.Commit, migration_id="m1")
    assert restored.result.migrationId == "m1"
    journal = json.loads(readRecords(str(tmp_path / "sessions"))["m1"])
    assert (journal["phase"], journal["claimed"]) == ("COMMITTED", True)
    assert "refused" not in journal
