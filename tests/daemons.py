"""
Real ``twistd xenmig`` daemons for end-to-end tests: PKI, start, kill and restart.

The daemon's command line, its ready line and free ports come from
L{xenmig.clients.processes}; here a daemon runs from blocking fixtures (and is
killed and started again from tests), and what it leaves on disk is inspected.

Also a slow ``file`` source (to catch a transfer in the middle) and, when run as
a script, a migration client that a test can kill::

    python tests/daemons.py migrate --port P --pki DIR --device SPEC --domain D
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.ssl import optionsForClientTLS, trustRootFromCertificates
from twisted.internet.task import deferLater
from twisted.protocols import amp
from zope.interface import implementer

from xenmig import tls
from xenmig.cli import pki
from xenmig.clients.processes import daemonArgv, freePort, logSaysReady
from xenmig.devices.file import FileKind, FileSource
from xenmig.interfaces import IDeviceKind, IRecordWriter
from xenmig.model import ContentDigest, DeviceSpec
from xenmig.source.client import MigrationClient
from xenmig.source.threadedstream import sslContext
from xenmig.target.recordfiles import readRecords

SERVER = "target.test"
CLIENT = "source.test"
MiB = 1024 * 1024


# -- certificates --------------------------------------------------------------------


class PKI:
    """
    A CA with a daemon host (``target.test``, IP 127.0.0.1) and a client host
    (``source.test``), and a second, unrelated CA that also issued a
    ``source.test`` certificate.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = directory / "ca"
        self.rogue = directory / "rogue"
        for where in (self.ca, self.rogue):
            pki.initCA(where)
            pki.issueHost(where, CLIENT)
        pki.issueHost(self.ca, SERVER, ["127.0.0.1"])
        self.authorities = tls.loadAuthority(self.ca / "ca.pem")

    def daemonArgs(self) -> list[str]:
        return [
            "--ca",
            str(self.ca / "ca.pem"),
            "--cert",
            str(self.ca / f"{SERVER}.pem"),
            "--key",
            str(self.ca / f"{SERVER}.key"),
        ]

    def clientTLS(self, rogue: bool = False) -> Any:
        """Client options presenting ``source.test`` from the real or rogue CA."""
        where = self.rogue if rogue else self.ca
        identity = tls.loadIdentity(where / f"{CLIENT}.pem", where / f"{CLIENT}.key")
        return tls.clientOptions("127.0.0.1", identity, self.authorities)

    def clientSSL(self) -> Any:
        """The same identity as an ``ssl`` context, for threaded streams."""
        identity = tls.loadIdentity(
            self.ca / f"{CLIENT}.pem", self.ca / f"{CLIENT}.key"
        )
        return sslContext(identity, self.authorities)

    def anonymousTLS(self) -> Any:
        """Client options that trust the daemon but present no certificate."""
        return optionsForClientTLS(
            "127.0.0.1", trustRoot=trustRootFromCertificates(self.authorities)
        )


# -- waiting ---------------------------------------------------------------------------


async def eventually(
    reactor: Any,
    check: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "the condition",
    interval: float = 0.02,
) -> Any:
    """Poll ``check`` (sync or async) until it returns something true; that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        await deferLater(reactor, interval, lambda: None)


def whenLost(protocol: Any) -> Deferred[None]:
    """A Deferred that fires once ``protocol``'s connection (open now) is lost."""
    d: Deferred[None] = Deferred()
    if getattr(protocol, "_xenmigLost", False):
        d.callback(None)
        return d
    original = protocol.connectionLost

    def lost(reason: Any) -> None:
        protocol._xenmigLost = True
        try:
            original(reason)
        finally:
            if not d.called:
                d.callback(None)

    protocol.connectionLost = lost
    return d


async def disconnect(reactor: Any, protocol: Any, timeout: float = 5.0) -> None:
    """Close ``protocol``'s connection and wait until it is really gone."""
    if protocol is None or protocol.transport is None:
        return
    gone = whenLost(protocol)
    if not gone.called:
        protocol.transport.loseConnection()
        await gone.addTimeout(timeout, reactor)


async def settled(reactor: Any, timeout: float = 5.0) -> None:
    """
    Wait until this process has no client connection open and no timer pending
    (a clean reactor); fail naming what is left.
    """
    try:
        await eventually(
            reactor,
            lambda: not openConnections(reactor) and not reactor.getDelayedCalls(),
            timeout,
            "a clean reactor",
        )
    except AssertionError:
        left = openConnections(reactor) + list(reactor.getDelayedCalls())
        raise AssertionError(f"the reactor is not clean: {left}")


class ChildProcess(ProcessProtocol):
    """A child process run by the reactor; ``ended`` fires with its exit reason."""

    def __init__(self) -> None:
        self.ended: Deferred[Any] = Deferred()
        self.output: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)

    def kill(self) -> None:
        """SIGKILL this child (by its pid)."""
        assert self.transport is not None
        self.transport.signalProcess("KILL")

    def text(self) -> str:
        return b"".join(self.output).decode(errors="replace")


def spawnClient(reactor: Any, *args: str) -> ChildProcess:
    """Run ``python daemons.py ARGS`` (a migration client) as a child process."""
    child = ChildProcess()
    argv = [sys.executable, os.path.abspath(__file__), *args]
    reactor.spawnProcess(child, sys.executable, argv, env=dict(os.environ))
    return child


def openConnections(reactor: Any) -> list[Any]:
    """The TCP and UNIX client connections still registered with the reactor."""
    from twisted.internet import tcp, unix

    kinds = (tcp.Client, unix.Client)
    return [
        s
        for s in set(reactor.getReaders()) | set(reactor.getWriters())
        if isinstance(s, kinds)
    ]


# -- the daemon ------------------------------------------------------------------------


class Daemon:
    """
    One ``twistd -n xenmig`` process on 127.0.0.1, with its own state dir and an
    allowed root ``dest``.  Its log is ``daemon-N.log`` for the N-th start.
    """

    def __init__(self, root: Path, certs: PKI, *extra: str) -> None:
        self.root = root
        self.pki = certs
        self.extra = list(extra)
        self.port = freePort()
        self.stateDir = root / "state"
        self.dest = root / "dest"
        self.dest.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def logPath(self) -> Path:
        return self.root / f"daemon-{self.starts}.log"

    @property
    def socketPath(self) -> str:
        return str(self.stateDir / "control.sock")

    def targetArgs(self) -> list[str]:
        """`xenmig`'s --target and TLS options for this daemon, as source.test."""
        where = self.pki.ca
        return [
            "--target",
            f"127.0.0.1:{self.port}",
            "--ca",
            str(where / "ca.pem"),
            "--cert",
            str(where / f"{CLIENT}.pem"),
            "--key",
            str(where / f"{CLIENT}.key"),
        ]

    def argv(self) -> list[str]:
        options = [
            "--port",
            str(self.port),
            "--interface",
            "127.0.0.1",
            "--state-dir",
            str(self.stateDir),
            "--allow-root",
            str(self.dest),
            *self.pki.daemonArgs(),
            *self.extra,
        ]
        return daemonArgv(options, str(self.logPath))

    def spawn(self) -> None:
        """Start the process (not waiting for it to listen)."""
        assert self.process is None or self.process.poll() is not None
        self.starts += 1
        output = open(self.root / f"daemon-{self.starts}.out", "wb")  # noqa: SIM115
        with output:
            self.process = subprocess.Popen(
                self.argv(), stdout=output, stderr=subprocess.STDOUT, cwd=self.root
            )

    def ready(self) -> bool:
        """Whether it listens; raise if it has exited instead."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"xenmig daemon exited with {self.process.returncode}:\n"
                + self.output()
            )
        return logSaysReady(self.logPath)

    def start(self, timeout: float = 20.0) -> Daemon:
        """Blocking (for fixtures, before the test runs): start and wait."""
        self.spawn()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError("xenmig daemon did not start:\n" + self.output())
            time.sleep(0.02)
        return self

    async def launch(self, reactor: Any, timeout: float = 20.0) -> Daemon:
        """Start (or start again: same state dir and port) without blocking."""
        self.spawn()
        await eventually(reactor, self.ready, timeout, "the daemon's start")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to this daemon (by pid) and reap it; its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        return self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited after 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def peakRSS(self) -> int:
        """The daemon's peak resident memory (VmHWM), in bytes."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def output(self) -> str:
        parts = []
        for path in (self.logPath, self.root / f"daemon-{self.starts}.out"):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    # -- what it left on disk --------------------------------------------------------

    def journal(self, migrationId: str) -> dict[str, Any]:
        """The session's journal record, as on disk."""
        return json.loads(readRecords(str(self.stateDir / "sessions"))[migrationId])

    def journals(self) -> list[str]:
        """The sessions journalled, by the names of their files."""
        return sorted(
            p.name
            for p in (self.stateDir / "sessions").glob("*")
            if not p.name.startswith(".spare-")
        )

    def leftovers(self) -> list[str]:
        """Everything staged: under ``STATE_DIR/staging`` and ``*.part`` in ``dest``."""
        staged = _tree(self.stateDir / "staging")
        return staged + [p for p in _tree(self.dest) if p.endswith(".part")]

    # -- talking to it ---------------------------------------------------------------

    def client(
        self, reactor: Any, tlsOptions: Any = None, port: int | None = None, **kw: Any
    ) -> Any:
        """
        A MigrationClient for this daemon, as ``source.test`` by default, with
        threaded streams (as the command line) unless other options are given;
        reaching it on ``port`` (a fault proxy's) if given.
        """
        if tlsOptions is None:
            tlsOptions = self.pki.clientTLS()
            kw.setdefault("sslContext", self.pki.clientSSL())
            kw.setdefault("serverName", "127.0.0.1")
        port = port or self.port
        return MigrationClient(reactor, "127.0.0.1", port, tls=tlsOptions, **kw)

    async def local(self, reactor: Any, command: type, **kw: Any) -> dict[str, Any]:
        """One AMP call on the daemon's local (owner-only) socket."""
        endpoint = UNIXClientEndpoint(reactor, self.socketPath, timeout=5)
        protocol = await connectProtocol(endpoint, amp.AMP())
        try:
            return await protocol.callRemote(command, **kw).addTimeout(30, reactor)
        finally:
            await disconnect(reactor, protocol)

    async def status(self, reactor: Any, migrationId: str) -> dict[str, Any]:
        """QueryMigration on the local socket."""
        from xenmig.amp_commands import QueryMigration

        answer = await self.local(reactor, QueryMigration, migration_id=migrationId)
        return answer["status"]

    async def waitPhase(
        self, reactor: Any, migrationId: str, phase: str, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Poll the local socket until the migration is in ``phase``; its status."""

        async def check() -> dict[str, Any] | None:
            status = await self.status(reactor, migrationId)
            return status if status["phase"] == phase else None

        return await eventually(reactor, check, timeout, f"{migrationId} {phase}")

    async def waitBytes(
        self, reactor: Any, migrationId: str, least: int, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Poll until the target has received ``least`` bytes; the status then."""
        from xenmig.amp_commands import QueryMigration
        from xenmig.errors import UnknownMigration

        async def check() -> dict[str, Any] | None:
            try:
                answer = await self.local(
                    reactor, QueryMigration, migration_id=migrationId
                )
            except UnknownMigration:
                return None
            status = answer["status"]
            done = sum(d["bytes_done"] for d in status["devices"])
            return status if done >= least and status["phase"] == "RECEIVING" else None

        return await eventually(reactor, check, timeout, f"{least} bytes received")


def _tree(root: Path) -> list[str]:
    """Every path under ``root``; parts the daemon removes meanwhile are skipped."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        found += [os.path.join(directory, n) for n in subdirectories + files]
    return found


# -- state files -----------------------------------------------------------------------


async def migrateFile(
    client: Any, source: Path, target: Path | str, domain: str = "vm1"
) -> Any:
    """One ``file`` device ``blob`` migrated: prepared, sent, committed."""
    spec = DeviceSpec.parse(f"file:blob:path={source},target={target}")
    migration = await client.prepare(domain, [spec])
    await migration.transfer()
    await migration.commit()
    return migration


def denseFile(path: Path, size: int) -> Path:
    """A file of ``size`` random bytes."""
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            chunk = min(remaining, 8 * MiB)
            f.write(os.urandom(chunk))
            remaining -= chunk
    return path


def sparseFile(path: Path, size: int, extents: list[tuple[int, int]]) -> Path:
    """A file of ``size`` bytes, random data in ``extents`` (start, stop), holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for start, stop in extents:
            f.seek(start)
            f.write(os.urandom(stop - start))
    return path


# -- a slow source, to catch a transfer in the middle ----------------------------------


@implementer(IRecordWriter)
class SlowWriter:
    """Passes records to ``writer``, each data record ``delay`` seconds late."""

    def __init__(self, writer: Any, reactor: Any, delay: float) -> None:
        self.writer = writer
        self.reactor = reactor
        self.delay = delay

    @property
    def bytesWritten(self) -> int:
        return self.writer.bytesWritten

    def writeData(self, offset: int, data: bytes) -> Deferred[None]:
        d = deferLater(self.reactor, self.delay, lambda: None)
        return d.addCallback(lambda _: self.writer.writeData(offset, data))

    def writeZero(self, offset: int, length: int) -> Deferred[None]:
        return self.writer.writeZero(offset, length)

    def writeMetadata(self, metadata: dict[str, Any]) -> Deferred[None]:
        return self.writer.writeMetadata(metadata)


class SlowFileSource(FileSource):
    """The ``file`` source, sending through a L{SlowWriter}."""

    delay = 0.05

    def sendFinal(self, writer: IRecordWriter) -> Deferred[ContentDigest]:
        return super().sendFinal(SlowWriter(writer, self.context.reactor, self.delay))


@implementer(IDeviceKind)
class SlowFileKind(FileKind):
    """The ``file`` kind whose source sends one 1 MiB record per ``delay`` s."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def source(self, spec: DeviceSpec, context: Any) -> FileSource:
        source = SlowFileSource(spec, context)
        source.delay = self.delay
        return source


def slowKinds(delay: float) -> dict[str, Any]:
    return {"file": SlowFileKind(delay)}


# -- the client as a process (``python daemons.py migrate ...``) -----------------------


async def _migrate(reactor: Any, args: argparse.Namespace) -> None:
    where = Path(args.pki)
    identity = tls.loadIdentity(where / f"{CLIENT}.pem", where / f"{CLIENT}.key")
    options = tls.clientOptions(
        "127.0.0.1", identity, tls.loadAuthority(where / "ca.pem")
    )
    kinds = slowKinds(args.delay) if args.delay else None
    client = MigrationClient(reactor, "127.0.0.1", args.port, tls=options, kinds=kinds)
    specs = [DeviceSpec.parse(text) for text in args.device]
    migration = await client.prepare(args.domain, specs, args.id)
    print("prepared", migration.migrationId, flush=True)
    await migration.transfer()
    print("ready", flush=True)
    await migration.commit()
    print("committed", flush=True)


def main(argv: list[str] | None = None) -> None:
    from twisted.internet.task import react

    parser = argparse.ArgumentParser(prog="daemons.py")
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate", help="run one migration")
    migrate.add_argument("--port", type=int, required=True)
    migrate.add_argument("--pki", required=True, help="directory of ca.pem etc.")
    migrate.add_argument("--device", action="append", required=True)
    migrate.add_argument("--domain", default="vm1")
    migrate.add_argument("--id", default=None)
    migrate.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)

    def run(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(_migrate(reactor, args))

    react(run)


if __name__ == "__main__":
    main()
