"""
A bounded connection flood on loopback against a live daemon: half-open TLS
handshakes, partial handshakes and authenticated idle connections, from several
addresses of 127.0.0.0/8.  The daemon bounds what it holds, keeps its memory, and
still completes a legitimate migration during the flood.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

sys.path.insert(0, os.path.dirname(__file__))

from daemons import PKI, Daemon, MiB, denseFile, eventually, settled  # noqa: E402

from xenmig.digest import hashFile  # noqa: E402
from xenmig.model import DeviceSpec  # noqa: E402

#: Flooding addresses (the legitimate client uses 127.0.0.1) and sockets from each.
FLOODERS = [f"127.0.0.{n}" for n in range(2, 6)]
PER_ADDRESS = 60
PARTIAL = 40
IDLE = 40
#: A TLS record header and the start of a ClientHello that never finishes.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(40)


def rss(pid: int) -> int:
    """The resident memory of process ``pid``, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def connectFrom(source: str, port: int) -> socket.socket | None:
    try:
        return socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=(source, 0)
        )
    except OSError:
        return None


def flood(daemon: Daemon, certs: PKI) -> list[socket.socket]:
    """Blocking: open the flood's sockets; those the daemon did not close at once."""
    held: list[socket.socket] = []
    for source in FLOODERS:
        for _ in range(PER_ADDRESS):  # TCP only: a TLS handshake never started
            sock = connectFrom(source, daemon.port)
            if sock is not None:
                held.append(sock)
    for n in range(PARTIAL):  # a ClientHello cut short
        sock = connectFrom(FLOODERS[n % len(FLOODERS)], daemon.port)
        if sock is not None:
            try:
                sock.sendall(PARTIAL_HELLO)
            except OSError:
                pass
            held.append(sock)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(certs.ca / "ca.pem"))
    context.load_cert_chain(
        str(certs.ca / "source.test.pem"), str(certs.ca / "source.test.key")
    )
    for _ in range(IDLE):  # authenticated, then silent
        sock = connectFrom("127.0.0.6", daemon.port)
        if sock is None:
            continue
        try:
            held.append(context.wrap_socket(sock, server_hostname="127.0.0.1"))
        except OSError:
            sock.close()
    return held


@pytest.fixture
def certs(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")


@pytest_twisted.ensureDeferred
async def test_floodLeavesDaemonResponsive(certs: PKI, tmp_path: Path) -> None:
    """Under a flood of handshakes and idle connections a migration still commits."""
    daemon = Daemon(
        tmp_path / "daemon",
        certs,
        "--handshake-timeout",
        "3",
        "--control-idle-timeout",
        "4",
    )
    await daemon.launch(reactor)
    held: list[socket.socket] = []
    try:
        source = denseFile(tmp_path / "source.bin", 4 * MiB)
        client = daemon.client(reactor)
        migration = await client.prepare(
            "warm", [DeviceSpec.parse(f"file:blob:path={source},target=warm.bin")]
        )
        await migration.transfer()
        await migration.commit()
        before = rss(daemon.pid)

        started = time.monotonic()
        held = await deferToThread(flood, daemon, certs)
        migration = await client.prepare(
            "during", [DeviceSpec.parse(f"file:blob:path={source},target=during.bin")]
        )
        await migration.transfer()
        await migration.commit()
        during = rss(daemon.pid)
        assert time.monotonic() - started < 30
        assert hashFile(str(daemon.dest / "during.bin")) == hashFile(str(source))

        log = lambda: daemon.logPath.read_text()  # noqa: E731
        assert re.search(
            r"refused \d+ connection\(s\), the last from 127\.0\.0\.\d", log()
        )
        assert "--per-address-handshakes" in log()
        # Half-open handshakes time out; idle authenticated connections close.
        await eventually(
            reactor,
            lambda: "not finished in 3.0 s; dropped" in log(),
            timeout=10,
            what="handshakes timed out",
        )
        await eventually(
            reactor,
            lambda: "idle for 4.0 s; closed" in log(),
            timeout=15,
            what="idle connections closed",
        )
    finally:
        for sock in held:
            sock.close()
    assert daemon.alive()
    after = rss(daemon.pid)
    print(f"flood: {len(held)} sockets held, RSS {before} -> {during} -> {after}")
    assert during - before < 64 * MiB, (before, during)
    assert after - before < 64 * MiB, (before, after)
    daemon.stop()
    await settled(reactor)
