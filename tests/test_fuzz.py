"""
Property-based fuzzing of a live daemon (``twistd xenmig``, mutual TLS on 127.0.0.1).

Hypothesis throws malformed AMP boxes, raw bytes, hostile Prepare arguments and
malformed stream records at one real daemon.  After each example the daemon
still runs and answers; it never answers UNKNOWN (an argument it could not
parse) or INTERNAL (an unexpected failure); at the end it still migrates a file
and has written nothing outside its state directory and its allowed root.

The client side is the standard library (blocking ``ssl`` sockets): every byte is
chosen here, nothing is checked on the way out.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.protocols import amp

sys.path.insert(0, os.path.dirname(__file__))

from daemons import PKI, Daemon, MiB, denseFile, eventually, settled  # noqa: E402

from xenmig import amp_commands as commands  # noqa: E402
from xenmig.digest import hashFile  # noqa: E402
from xenmig.errors import WIRE_ERRORS  # noqa: E402
from xenmig.model import DeviceSpec  # noqa: E402
from xenmig.records import (  # noqa: E402
    MAGIC,
    OPTIONAL,
    TYPE_DATA,
    TYPE_END,
    TYPE_METADATA,
    TYPE_ROUND,
    TYPE_ZERO,
    encodeStreamHeader,
)

#: The fuzz budget: examples per property (four properties).
EXAMPLES = int(os.environ.get("XENMIG_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
#: Error codes a well-behaved daemon may answer with.
DECLARED = set(WIRE_ERRORS.values()) - {b"INTERNAL"} | {b"UNHANDLED"}
COMMANDS = [
    c.commandName
    for c in (
        commands.Prepare,
        commands.OpenStream,
        commands.StartStream,
        commands.DeviceReady,
        commands.Commit,
        commands.Abort,
        commands.QueryMigration,
        commands.ListMigrations,
        commands.DeviceRequest,
        commands.AwaitRestored,
    )
]
ARGUMENTS = [
    b"migration_id",
    b"domain",
    b"protocol_version",
    b"devices",
    b"device",
    b"token",
    b"reason",
    b"limit",
    b"method",
    b"payload",
    b"timeout",
]


class Fuzzed:
    """The daemon under fuzz, with a directory outside everything it may touch."""

    def __init__(self, root: Path) -> None:
        self.certs = PKI(root / "pki")
        self.daemon = Daemon(root / "daemon", self.certs)
        self.outside = root / "outside"
        self.outside.mkdir()
        (self.daemon.dest / "link").symlink_to(self.outside)
        self.daemon.start()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(str(self.certs.ca / "ca.pem"))
        context.load_cert_chain(
            str(self.certs.ca / "source.test.pem"),
            str(self.certs.ca / "source.test.key"),
        )
        self.context = context
        self.counter = 0

    def connect(self) -> Connection:
        raw = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=5)
        return Connection(self.context.wrap_socket(raw, server_hostname="127.0.0.1"))

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def check(self) -> None:
        """Alive, and a well-formed command on a new connection is answered."""
        assert self.daemon.alive(), self.daemon.output()
        with self.connect() as connection:
            [answer] = connection.call(
                {"_command": commands.ListMigrations.commandName, "limit": b"1"}
            )
        assert b"_answer" in answer, answer


class Connection:
    """A blocking TLS connection speaking raw AMP boxes."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = b""
        self.closed = False
        self.asks = 0
        self.seen = 0

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def box(self, box: dict[str, bytes]) -> None:
        self.send(_serialize(box))

    def call(
        self, box: dict[str, bytes], wait: float = 5.0
    ) -> list[dict[bytes, bytes]]:
        self.asks += 1
        box = {**box, "_ask": str(self.asks).encode()}
        self.box(box)
        return self.answers(1, wait)

    def answers(self, count: int, wait: float = 1.0) -> list[dict[bytes, bytes]]:
        """Read until ``count`` boxes arrived, the peer closed, or ``wait`` s passed."""
        self.sock.settimeout(wait)
        while not self.closed and len(_boxes(self.buffer)) < self.seen + count:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLError, OSError):
                break
            if not data:
                self.closed = True
                break
            self.buffer += data
        found = _boxes(self.buffer)
        new, self.seen = found[self.seen :], len(found)
        return new


def _serialize(box: dict[Any, bytes]) -> bytes:
    out = b""
    for key, value in box.items():
        key = key.encode() if isinstance(key, str) else key
        out += struct.pack(">H", len(key)) + key + struct.pack(">H", len(value)) + value
    return out + b"\x00\x00"


def _boxes(data: bytes) -> list[dict[bytes, bytes]]:
    try:
        return [dict(b) for b in amp.parseString(data)]
    except Exception:
        return []


def assertDeclared(answers: list[dict[bytes, bytes]]) -> None:
    """Every error answered is a declared one (never UNKNOWN, never INTERNAL)."""
    for answer in answers:
        if b"_error" in answer:
            code = answer.get(b"_error_code")
            assert code in DECLARED, answer


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    made = Fuzzed(tmp_path_factory.mktemp("fuzz"))
    yield made
    made.daemon.stop()


# -- strategies ----------------------------------------------------------------------

values = st.one_of(
    st.binary(max_size=64),
    st.integers(-(2**80), 2**80).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b"True", b"False", b"{}", b"[]", b"null", b"\xff" * 8]),
    st.just(b"7" * 5000),
    st.just(b"x" * 65535),
    st.text(max_size=40).map(lambda t: t.encode()),
)
keys = st.one_of(st.sampled_from(ARGUMENTS), st.binary(min_size=1, max_size=255))
randomBoxes = st.builds(
    lambda command, fields: {"_command": command, **fields},
    st.one_of(st.sampled_from(COMMANDS), st.binary(max_size=30)),
    st.dictionaries(keys, values, max_size=6),
)


@FUZZ
@given(boxes=st.lists(randomBoxes, min_size=1, max_size=4))
def test_randomBoxes(fuzzed: Fuzzed, boxes: list[dict[Any, bytes]]) -> None:
    """Random commands with random arguments get declared errors or answers."""
    with fuzzed.connect() as connection:
        for n, box in enumerate(boxes):
            box = {k: v for k, v in box.items() if k not in (b"_ask", "_ask")}
            connection.box({**box, "_ask": str(n + 1).encode()})
        assertDeclared(connection.answers(len(boxes)))
    fuzzed.check()


@FUZZ
@given(data=st.binary(max_size=4096))
def test_rawBytes(fuzzed: Fuzzed, data: bytes) -> None:
    """Arbitrary bytes after the handshake never take the daemon down."""
    with fuzzed.connect() as connection:
        connection.send(data)
        assertDeclared(connection.answers(8, wait=0.2))
    fuzzed.check()


destinations = st.one_of(
    st.sampled_from(
        [
            "../../etc/xenmig-fuzz",
            "/etc/xenmig-fuzz",
            "/tmp/xenmig-fuzz",
            "link/x",
            "link/../x",
            "./x",
            "a/../../x",
            "",
            "/",
            ".",
            "x\x00y",
            "x" * 5000,
            "dir/",
        ]
    ),
    st.text(max_size=30),
)
paramValues = st.one_of(
    destinations,
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
paramKeys = st.one_of(
    st.sampled_from(
        [
            "target",
            "target-ctrl",
            "target-statedir",
            "target-key",
            "target-key-mode",
            "target-overwrite",
            "allocated",
            "max_size",
            "block_size",
            "format",
            "backing",
        ]
    ),
    st.text(max_size=10),
)
devices = st.fixed_dictionaries(
    {
        "kind": st.one_of(
            st.sampled_from(["file", "vtpm", "disk", "devmodel"]), st.text(max_size=8)
        ),
        "name": st.one_of(st.sampled_from(["blob", "tpm0", "root"]), st.text()),
        "size": st.one_of(
            st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 4096, 2**63 - 1])
        ),
        "precopy": st.booleans(),
        "params": st.dictionaries(paramKeys, paramValues, max_size=5),
    }
)


def _deviceBox(device: dict[str, Any]) -> bytes:
    return _serialize(
        {
            "kind": device["kind"].encode(),
            "name": device["name"].encode(),
            "size": str(device["size"]).encode(),
            "precopy": b"True" if device["precopy"] else b"False",
            "params": json.dumps(device["params"]).encode()[:65535],
        }
    )


@FUZZ
@given(
    migrationId=st.one_of(st.from_regex(r"\Afz[a-z0-9]{1,8}\Z"), st.text(max_size=80)),
    domain=st.one_of(st.sampled_from(["vm", "vm.1"]), st.text(max_size=80)),
    version=st.integers(-5, 5),
    entries=st.lists(devices, min_size=0, max_size=4),
)
def test_hostilePrepare(
    fuzzed: Fuzzed,
    migrationId: str,
    domain: str,
    version: int,
    entries: list[dict[str, Any]],
) -> None:
    """Hostile Prepare arguments are refused by rule; a session they open is aborted."""
    devicesValue = b"".join(_deviceBox(d) for d in entries)[:65535]
    with fuzzed.connect() as connection:
        answers = connection.call(
            {
                "_command": commands.Prepare.commandName,
                "migration_id": migrationId.encode()[:65535],
                "domain": domain.encode()[:65535],
                "protocol_version": str(version).encode(),
                "devices": devicesValue,
            }
        )
        assertDeclared(answers)
        if answers and b"_answer" in answers[0]:
            aborted = connection.call(
                {
                    "_command": commands.Abort.commandName,
                    "migration_id": migrationId.encode(),
                    "reason": b"fuzz",
                }
            )
            assertDeclared(aborted)
    fuzzed.check()


def _record(kind: int, flags: int, body: bytes, length: int | None) -> bytes:
    declared = len(body) if length is None else length
    return struct.pack(">IIQ", kind, flags, declared) + body + bytes(-len(body) % 8)


records = st.builds(
    _record,
    st.one_of(
        st.sampled_from(
            [TYPE_DATA, TYPE_ZERO, TYPE_METADATA, TYPE_END, TYPE_ROUND, OPTIONAL | 9]
        ),
        st.integers(0, 2**32 - 1),
    ),
    st.integers(0, 2**32 - 1),
    st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda offset, data: struct.pack(">Q", offset) + data,
            st.one_of(st.integers(0, 8192), st.integers(0, 2**64 - 1)),
            st.binary(max_size=128),
        ),
        st.builds(
            lambda a, b: struct.pack(">QQ", a, b),
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**64 - 1),
        ),
        st.sampled_from([b'{"blob":1}', b"[]", b"\xff\xfe", b"{" * 100]),
    ),
    st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
headers = st.one_of(
    st.just(encodeStreamHeader()),
    st.builds(
        lambda magic, version, options: struct.pack(">8sII", magic, version, options),
        st.one_of(st.just(MAGIC), st.binary(min_size=8, max_size=8)),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
    ),
    st.binary(max_size=20),
)


@FUZZ
@given(header=headers, body=st.lists(records, max_size=6), cut=st.booleans())
def test_malformedStreams(
    fuzzed: Fuzzed, header: bytes, body: list[bytes], cut: bool
) -> None:
    """Malformed stream records abort the migration, cleanly, and nothing else."""
    mid = fuzzed.fresh("stream")
    target = f"{mid}.bin"
    spec = {"kind": "file", "name": "blob", "size": 4096, "precopy": False}
    with fuzzed.connect() as control:
        prepared = control.call(
            {
                "_command": commands.Prepare.commandName,
                "migration_id": mid.encode(),
                "domain": mid.encode(),
                "protocol_version": b"1",
                "devices": _deviceBox({**spec, "params": {"target": target}}),
            }
        )
        assert b"_answer" in prepared[0], prepared
        [answer] = opened = control.call(
            {
                "_command": commands.OpenStream.commandName,
                "migration_id": mid.encode(),
                "device": b"blob",
            }
        )
        assert b"token" in answer, opened
        with fuzzed.connect() as stream:
            [started] = stream.call(
                {
                    "_command": commands.StartStream.commandName,
                    "token": answer[b"token"],
                }
            )
            assert b"_answer" in started, started
            data = header + b"".join(body)
            stream.send(data[: len(data) // 2] if cut else data)
            stream.answers(1, wait=0.1)  # the target sends nothing on a stream
        aborted = control.call(
            {
                "_command": commands.Abort.commandName,
                "migration_id": mid.encode(),
                "reason": b"fuzz over",
            }
        )
        assertDeclared(aborted)
        [status] = control.call(
            {
                "_command": commands.QueryMigration.commandName,
                "migration_id": mid.encode(),
            }
        )
    record = json.loads(status[b"status"])
    assert record["phase"] == "ABORTED", record
    assert "the handler failed" not in record["reason"], record
    assert not (fuzzed.daemon.dest / target).exists()
    fuzzed.check()


@pytest_twisted.ensureDeferred
async def test_afterTheFuzz(fuzzed: Fuzzed, tmp_path: Path) -> None:
    """After all that: a migration still works and nothing was written outside."""
    daemon = fuzzed.daemon
    source = denseFile(tmp_path / "source.bin", MiB)
    migration = await daemon.client(reactor).prepare(
        "after", [DeviceSpec.parse(f"file:blob:path={source},target=after.bin")]
    )
    await migration.transfer()
    await migration.commit()
    assert hashFile(str(daemon.dest / "after.bin")) == hashFile(str(source))
    await eventually(reactor, lambda: not daemon.leftovers(), what="staging removed")
    assert list(fuzzed.outside.iterdir()) == []
    assert sorted(p.name for p in daemon.dest.iterdir()) == ["after.bin", "link"]
    assert not Path("/etc/xenmig-fuzz").exists()
    assert not Path("/tmp/xenmig-fuzz").exists()
    log = daemon.logPath.read_text()
    assert "Unhandled" not in log and "failed unexpectedly" not in log, log[-3000:]
    assert daemon.alive()
    await settled(reactor)
