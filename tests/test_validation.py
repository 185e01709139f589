"""Bad input on the control connection and streams: declared errors, nothing lost."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.filepath import FilePath
from twisted.test import iosim

from xenmig import amp_commands as commands
from xenmig.devices.file import fileKind
from xenmig.devices.vtpm.kind import vtpmKind
from xenmig.digest import hashBytes
from xenmig.errors import BadSpec, CommitFailed, PathNotAllowed
from xenmig.limits import MAX_COMMANDS_IN_FLIGHT, MAX_MESSAGE
from xenmig.model import DeviceDescription
from xenmig.protocol import ControlProtocol
from xenmig.records import encodeData, encodeEnd, encodeStreamHeader, encodeZero
from xenmig.streamreceiver import StreamReceiver
from xenmig.target.config import TargetConfig
from xenmig.target.core import MigrationTarget
from xenmig.target.session import Phase
from xenmig.testing import FakeTargetContext, MemoryKind

PREPARE = commands.Prepare.commandName


class Raw(Protocol):
    """The client end: sends raw bytes, collects the boxes that come back."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.lost = True

    def boxes(self) -> list[amp.AmpBox]:
        return amp.parseString(self.received)


class Host:
    """A target (file and memory kinds, synchronous I/O) and its roots."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "vms"
        self.outside = tmp_path / "outside"
        for path in (self.root / "a", self.outside):
            path.mkdir(parents=True)
        self.clock = task.Clock()
        self.target = MigrationTarget(
            self.clock,
            TargetConfig(
                FilePath(str(tmp_path / "state")),
                allowedRoots=(FilePath(str(self.root)),),
            ),
            {"file": fileKind, "memory": MemoryKind()},
            lambda f, *a, **kw: maybeDeferred(f, *a, **kw),
        )

    def connect(self) -> tuple[ControlProtocol, Raw, Any]:
        client, server, pump = iosim.connectedServerAndClient(
            ServerClass=lambda: ControlProtocol(self.target, tls=False),
            ClientClass=Raw,
            greet=True,
        )
        server.peer = "source.test"
        return server, client, pump

    def ask(self, **box: bytes) -> tuple[amp.AmpBox, Raw, Any]:
        """Send one command box on a new connection; its answer."""
        _, client, pump = self.connect()
        send(client, pump, box)
        [answer] = client.boxes()
        return answer, client, pump


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def send(client: Raw, pump: Any, box: dict[str, bytes], ask: bytes = b"1") -> None:
    client.transport.write(amp.AmpBox(_ask=ask, **box).serialize())
    pump.flush()


def prepareBox(**override: bytes) -> dict[str, bytes]:
    device = amp.AmpList(commands._DEVICE).toStringProto(
        [
            {
                "kind": "memory",
                "name": "dev",
                "size": 10,
                "precopy": False,
                "params": {},
            }
        ],
        None,
    )
    box = {
        "_command": PREPARE,
        "migration_id": b"m1",
        "domain": b"vm1",
        "protocol_version": b"1",
        "devices": device,
    }
    box.update(override)
    return {k: v for k, v in box.items() if v is not None}


def deviceList(**override: Any) -> bytes:
    device = {"kind": "memory", "name": "dev", "size": 10, "precopy": False}
    device.update(override)
    device.setdefault("params", {})
    return amp.AmpList(commands._DEVICE).toStringProto([device], None)


def assertError(answer: amp.AmpBox, code: bytes, text: str = "") -> None:
    assert answer.get(b"_error_code") == code, answer
    description = answer[b"_error_description"].decode()
    assert text in description
    assert len(description) <= MAX_MESSAGE


# -- arguments that do not parse -----------------------------------------------------


@pytest.mark.parametrize(
    "override, text",
    [
        ({"devices": None}, "the argument 'devices' is missing"),
        ({"protocol_version": b"one"}, "ValueError"),
        ({"protocol_version": b"9" * 5000}, "ValueError"),
        ({"migration_id": b"\xff\xfe"}, "UnicodeDecodeError"),
        ({"devices": b"garbage"}, "malformed arguments"),
    ],
)
def test_unparsableArguments(
    host: Host, override: dict[str, bytes | None], text: str
) -> None:
    """Arguments that do not parse get PROTOCOL naming them; the connection stays."""
    _, client, pump = host.connect()
    send(client, pump, prepareBox(**override))  # type: ignore[arg-type]
    send(client, pump, {"_command": commands.ListMigrations.commandName}, b"2")
    first, second = client.boxes()
    assertError(first, b"PROTOCOL", text)
    assert second[b"_answer"] == b"2" and not client.lost


@pytest.mark.parametrize(
    "device, text",
    [
        ({"params": {"x": {"nested": 1}}}, "must be a string or a number"),
        ({"params": {"x": 2**64}}, "out of range"),
        ({"params": {"x": "a\nb"}}, "bad value"),
        ({"params": {"Bad Key": 1}}, "parameter name"),
        ({"size": 2**63}, "size must be an integer from 0"),
        ({"size": -1}, "size must be an integer from 0"),
        ({"name": "a/b"}, "device name"),
        ({"name": "x" * 65}, "device name"),
        ({"kind": "../file"}, "device kind"),
    ],
)
def test_badDescriptions(host: Host, device: dict[str, Any], text: str) -> None:
    """Out-of-range descriptions are refused with BAD_SPEC, never INTERNAL."""
    answer, _, _ = host.ask(**prepareBox(devices=deviceList(**device)))
    assertError(answer, b"BAD_SPEC", text)
    assert host.target.sessions == {}


def test_misspeltKeyRefusedAtPrepare(host: Host) -> None:
    """A target key the kind does not know refuses the device, naming the key."""
    devices = deviceList(
        kind="file", params={"target": "a/x", "target-overwirte": "yes"}
    )
    answer, _, _ = host.ask(**prepareBox(devices=devices))
    [offer] = amp.AmpList(commands._OFFER).fromStringProto(answer[b"offers"], None)
    assert not offer["accepted"]
    assert (
        "unknown parameter(s) target-overwirte (did you mean target-overwrite?)"
        in (offer["reason"])
    )
    assert host.target.sessions == {}
    assert os.listdir(host.root / "a") == []


def test_jsonParamsMalformed(host: Host) -> None:
    """params that are not a JSON object get PROTOCOL."""
    raw = amp.AmpBox(
        kind=b"memory", name=b"dev", size=b"1", precopy=b"False", params=b"[1, 2]"
    ).serialize()
    answer, _, _ = host.ask(**prepareBox(devices=raw))
    assertError(answer, b"PROTOCOL", "JSON argument must be a dict")


@pytest.mark.parametrize(
    "override, code, text",
    [
        ({"migration_id": b"../../etc"}, b"BAD_SPEC", "migration id"),
        ({"migration_id": b"x" * 60000}, b"BAD_SPEC", "migration id"),
        ({"domain": b""}, b"BAD_SPEC", "domain"),
        ({"protocol_version": b"99"}, b"VERSION_MISMATCH", "version 99"),
        ({"protocol_version": b"-1"}, b"VERSION_MISMATCH", ""),
    ],
)
def test_badValues(
    host: Host, override: dict[str, bytes], code: bytes, text: str
) -> None:
    """Ids, names and versions out of range get their declared error, bounded."""
    answer, client, _ = host.ask(**prepareBox(**override))
    assertError(answer, code, text)
    assert not client.lost


def test_tooManyDevices(host: Host) -> None:
    """More devices than --max-devices are refused at Prepare."""
    devices = [
        {"kind": "memory", "name": f"d{n}", "size": 1, "precopy": False, "params": {}}
        for n in range(65)
    ]
    raw = amp.AmpList(commands._DEVICE).toStringProto(devices, None)
    answer, _, _ = host.ask(**prepareBox(devices=raw))
    assertError(answer, b"BAD_SPEC", "1 to 64 devices")


def test_unknownCommand(host: Host) -> None:
    """An unknown command is UNHANDLED; the connection stays."""
    answer, client, _ = host.ask(_command=b"xenmig-\xff\x00rm -rf")
    assertError(answer, b"UNHANDLED")
    assert not client.lost


@pytest.mark.parametrize(
    "box",
    [{"_answer": b"1"}, {"_error": b"1", "_error_code": b"X"}, {"key": b"value"}],
)
def test_notACommandDrops(host: Host, box: dict[str, bytes]) -> None:
    """A box that is not a command closes the connection (this side never asks)."""
    _, client, pump = host.connect()
    client.transport.write(amp.AmpBox(**box).serialize())
    pump.flush()
    assert client.lost and client.boxes() == []


def test_oversizedBoxDrops(host: Host) -> None:
    """A box of more than MAX_BOX_BYTES closes the connection before it is used."""
    _, client, pump = host.connect()
    box = amp.AmpBox(**{f"k{n}": b"v" * 60000 for n in range(4)})
    client.transport.write(box.serialize())
    pump.flush()
    assert client.lost and client.boxes() == []


def test_commandsInFlightBounded(host: Host) -> None:
    """Beyond MAX_COMMANDS_IN_FLIGHT commands on one connection, BUSY answers."""
    _, client, pump = host.connect()
    send(client, pump, prepareBox())
    for n in range(MAX_COMMANDS_IN_FLIGHT + 2):
        box = {
            "_command": commands.DeviceReady.commandName,
            "migration_id": b"m1",
            "device": b"dev",
        }
        send(client, pump, box, str(n + 10).encode())
    boxes = client.boxes()
    assert boxes[0][b"_answer"] == b"1"  # Prepare
    refused = boxes[1:]
    assert len(refused) == 2
    for answer in refused:
        assertError(answer, b"BUSY", "commands in flight: xenmig-device-ready: ")
        assert answer[b"_error_description"].endswith(b"; retry after 0.5 s")
    assert not client.lost  # a BUSY answer keeps the connection
    host.target.sessions["m1"].abort("test over")


def test_abortReasonBounded(host: Host) -> None:
    """A huge abort reason is cut, and status still fits in an answer."""
    _, client, pump = host.connect()
    send(client, pump, prepareBox())
    abort = {
        "_command": commands.Abort.commandName,
        "migration_id": b"m1",
        "reason": b"r" * 65000,
    }
    send(client, pump, abort, b"2")
    query = {"_command": commands.QueryMigration.commandName, "migration_id": b"m1"}
    send(client, pump, query, b"3")
    _, aborted, status = client.boxes()
    assert aborted[b"phase"] == b"ABORTED"
    assert b'"phase":"ABORTED"' in status[b"status"]
    assert len(host.target.sessions["m1"].reason) < 1200


# -- streams and destinations ----------------------------------------------------------


def fileDevice(target: str, size: int) -> dict[str, Any]:
    return {
        "kind": "file",
        "name": "blob",
        "size": size,
        "precopy": False,
        "params": {"target": target},
    }


def prepareFile(host: Host, target: str, size: int) -> Any:
    results: list[Any] = []
    maybeDeferred(
        lambda: host.target.prepare(
            "source.test", "m1", "vm1", 1, [fileDevice(target, size)]
        )
    ).addBoth(results.append)
    [(_, offers)] = results
    assert offers[0].accepted, offers[0].reason
    token = host.target.openStream("source.test", "m1", "blob")
    session, device = host.target.claimToken("source.test", token)
    receiver = StreamReceiver(session, device, 60.0, host.target.chargeStream("m1"))
    transport = StringTransport()
    receiver.makeConnection(transport)
    return session, receiver, transport


def stream(*records: list[bytes]) -> bytes:
    return encodeStreamHeader() + b"".join(b"".join(r) for r in records)


def test_symlinkSwappedBeforeCommit(host: Host) -> None:
    """A directory replaced by a symlink after Prepare fails the commit, nothing out."""
    data = os.urandom(1000)
    digest = hashBytes(data)
    session, receiver, _ = prepareFile(host, "a/x.bin", len(data))
    receiver.dataReceived(
        stream(
            encodeData(0, data), encodeEnd(len(data), digest.algorithm, digest.digest)
        )
    )
    assert session.phase is Phase.READY
    os.rename(host.root / "a", host.root / "a-moved")
    os.symlink(host.outside, host.root / "a")

    results: list[Any] = []
    maybeDeferred(lambda: host.target.commit("source.test", "m1")).addBoth(
        results.append
    )
    [failure] = results
    assert failure.check(CommitFailed)
    assert "changed since it was checked" in str(failure.value)
    assert list(host.outside.iterdir()) == []
    assert list((host.root / "a-moved").iterdir()) == []
    assert session.phase is Phase.ABORTED


def test_streamBeyondDeclaredSize(host: Host) -> None:
    """A record past the declared size aborts the session; nothing installed."""
    session, receiver, transport = prepareFile(host, "a/x.bin", 100)
    receiver.dataReceived(stream(encodeData(64, b"z" * 64)))
    assert session.phase is Phase.ABORTED
    assert "beyond the declared size" in session.reason
    assert transport.disconnecting or transport.disconnected
    assert list((host.root / "a").iterdir()) == []


def test_streamMoreBytesThanDeclared(host: Host) -> None:
    """The same range sent again and again (more than declared) aborts."""
    session, receiver, _ = prepareFile(host, "a/x.bin", 100)
    receiver.dataReceived(
        stream(encodeData(0, b"a" * 100), encodeZero(0, 50), encodeData(0, b"b" * 10))
    )
    assert session.phase is Phase.ABORTED
    assert "more than the 100 bytes it declared" in session.reason


# -- vtpm parameters name host paths too ---------------------------------------------


@pytest.fixture
def vtpmContext(tmp_path: Path) -> FakeTargetContext:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    return FakeTargetContext(reactor, [str(root)], str(tmp_path / "staging"))


@pytest.mark.parametrize(
    "params, error, text",
    [
        ({"target-ctrl": "/run/other.sock"}, PathNotAllowed, "outside"),
        ({"target-ctrl": "../elsewhere/s"}, PathNotAllowed, ".."),
        (
            {"target-statedir": "tpm", "target-key": "/etc/shadow"},
            PathNotAllowed,
            "outside",
        ),
        (
            {"target-statedir": "tpm", "target-key-mode": "aes-256-cbc,remove=true"},
            BadSpec,
            "target-key-mode must be one of",
        ),
        (
            {"target-statedir": "tpm", "target-key-format": "hex,remove=true"},
            BadSpec,
            "target-key-format",
        ),
    ],
)
def test_vtpmPaths(
    vtpmContext: FakeTargetContext, params: dict[str, str], error: type, text: str
) -> None:
    """A vtpm's socket and key files lie within the roots; key options are fixed."""
    description = DeviceDescription("vtpm", "tpm0", 100, params)
    with pytest.raises(error, match=text):
        vtpmKind.target(description, vtpmContext)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("backing", ["../../etc/passwd", "/etc/passwd"])
async def test_diskBackingOutsideRoots(
    vtpmContext: FakeTargetContext, backing: str
) -> None:
    """A disk's backing file is looked for only within the roots (no probing)."""
    from xenmig.devices.disk.kind import diskKind

    description = DeviceDescription(
        "disk", "root", 4096, {"target": "root.img", "backing": backing}
    )
    with pytest.raises(PathNotAllowed):
        await diskKind.target(description, vtpmContext).accept()


@pytest.mark.parametrize(
    "params, text",
    [
        ({"max_size": "lots"}, "max_size must be a whole number"),
        ({"block_size": "4096; rm"}, "block_size must be a whole number"),
        ({"block_size": 2**70}, "out of range"),
    ],
)
def test_diskIntegerParams(
    vtpmContext: FakeTargetContext, params: dict[str, Any], text: str
) -> None:
    """A disk's integer parameters are checked, not converted blindly."""
    from xenmig.devices.disk.kind import diskKind

    with pytest.raises(BadSpec, match=text):
        description = DeviceDescription(
            "disk", "root", 4096, {"target": "r.img", **params}
        )
        diskKind.target(description, vtpmContext)
