"""End to end: real ``twistd xenmig`` daemons, real mutual TLS on 127.0.0.1."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.application import service
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger, capturedLogs, formatEvent

sys.path.insert(0, os.path.dirname(__file__))

from daemons import (  # noqa: E402
    PKI,
    Daemon,
    MiB,
    denseFile,
    disconnect,
    eventually,
    settled,
    sparseFile,
    spawnClient,
    whenLost,
)

from xenmig import amp_commands as commands  # noqa: E402
from xenmig import tap  # noqa: E402
from xenmig.clients import processes  # noqa: E402
from xenmig.devices.sparse import dataExtents  # noqa: E402
from xenmig.digest import hashFile  # noqa: E402
from xenmig.errors import ConfigurationError, PhaseTimeout  # noqa: E402
from xenmig.fs import InstallAs  # noqa: E402
from xenmig.model import DeviceSpec  # noqa: E402
from xenmig.source.connection import ClientTimeouts  # noqa: E402
from xenmig.source.streamsender import StreamSender  # noqa: E402
from xenmig.target.config import TargetConfig, Timeouts  # noqa: E402
from xenmig.target.service import READY_LINE, TargetDaemon  # noqa: E402

log = Logger()

#: Data extents of the sparse test file: the rest is holes.
EXTENTS = [(0, 4 * MiB), (20 * MiB, 28 * MiB), (63 * MiB, 64 * MiB)]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def daemon(daemons: Callable[..., Daemon]) -> Daemon:
    return daemons().start()


def fileSpec(source: Path, destination: Path, name: str = "blob") -> DeviceSpec:
    return DeviceSpec.parse(f"file:{name}:path={source},target={destination}")


def extentsOf(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(dataExtents(fd, 0, os.fstat(fd).st_size))
    finally:
        os.close(fd)


async def migrate(daemon: Daemon, source: Path, destination: Path, domain: str) -> Any:
    """A whole migration of one file; the committed SourceMigration."""
    migration = await daemon.client(reactor).prepare(
        domain, [fileSpec(source, destination)]
    )
    await migration.transfer()
    await migration.commit()
    return migration


class SwitchTo(ClientFactory):
    """Hands a raw protocol to AMP's protocol switch."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self.protocol


# -- a migration ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_migrates_sparse_file(daemon: Daemon, tmp_path: Path) -> None:
    """A sparse 64 MiB file migrates over mutual TLS intact, sparse and committed."""
    source = sparseFile(tmp_path / "source.img", 64 * MiB, EXTENTS)
    destination = daemon.dest / "vm1.img"
    expected = hashFile(str(source))

    migration = await migrate(daemon, source, destination, "vm1")

    assert migration.phase == "COMMITTED"
    assert migration.installed == [str(destination)]
    assert hashFile(str(destination)) == expected
    assert extentsOf(destination) == EXTENTS
    dataBytes = sum(stop - start for start, stop in EXTENTS)
    assert os.stat(destination).st_blocks * 512 < dataBytes + MiB
    mid = migration.migrationId
    record = daemon.journal(mid)
    assert (record["phase"], record["peer"]) == ("COMMITTED", "source.test")
    status = await daemon.client(reactor).query(mid)
    assert status["phase"] == "COMMITTED"
    assert status["peer"] == "source.test"
    assert status["installed"] == [str(destination)]
    [device] = status["devices"]
    assert (device["state"], device["bytes_done"]) == ("COMMITTED", 64 * MiB)
    assert device["digest"] == expected.hex
    assert daemon.leftovers() == []
    await settled(reactor)


# -- authentication --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refuses_unauthenticated_clients(
    daemon: Daemon, certs: PKI, tmp_path: Path
) -> None:
    """Clients from another CA or without a certificate are refused, leaving nothing."""
    source = sparseFile(tmp_path / "source.img", 4 * MiB, [(0, MiB)])
    destination = daemon.dest / "vm2.img"
    timeouts = ClientTimeouts(connect=10, call=10)
    intruders = [
        (certs.clientTLS(rogue=True), "unknown ca"),
        (certs.anonymousTLS(), "certificate required"),
    ]
    for options, alert in intruders:
        client = daemon.client(reactor, options, timeouts=timeouts)
        with pytest.raises(SSL.Error, match=alert):
            await client.prepare("vm2", [fileSpec(source, destination)], "intruder")
        await settled(reactor)
    assert daemon.journals() == []
    assert daemon.leftovers() == []
    assert list(daemon.dest.iterdir()) == []
    assert daemon.alive()

    migration = await migrate(daemon, source, destination, "vm2")
    assert migration.phase == "COMMITTED"
    assert hashFile(str(destination)) == hashFile(str(source))
    await settled(reactor)


# -- losing the source -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_killed_mid_transfer(
    daemon: Daemon, certs: PKI, tmp_path: Path
) -> None:
    """Killing the client process mid-transfer aborts the session and leaves nothing."""
    source = denseFile(tmp_path / "source.bin", 32 * MiB)
    destination = daemon.dest / "vm3.bin"
    mid = "killed-client"
    client = spawnClient(
        reactor,
        "migrate",
        f"--port={daemon.port}",
        f"--pki={certs.ca}",
        f"--device=file:blob:path={source},target={destination}",
        "--domain=vm3",
        f"--id={mid}",
        "--delay=0.05",
    )
    await daemon.waitBytes(reactor, mid, 2 * MiB, timeout=30)
    client.kill()
    ended = await client.ended
    assert ended.signal == 9, client.text()

    status = await daemon.waitPhase(reactor, mid, "ABORTED")
    assert re.search(r"connection was lost|stream of device blob", status["reason"])
    assert 0 < status["devices"][0]["bytes_done"] < 32 * MiB
    await eventually(reactor, lambda: not daemon.leftovers(), what="staging removed")
    assert not destination.exists()
    assert daemon.journal(mid)["phase"] == "ABORTED"
    # What the operator sees: `xenmig status` on the target shows it, and why.
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenmig.cli.main",
            "status",
            "--state-dir",
            str(daemon.stateDir),
            mid,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    assert "ABORTED" in shown.stdout
    assert re.search(r"connection was lost|stream of device blob", shown.stdout)
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_stalled_stream_times_out(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A stream silent past --idle-timeout aborts the session and leaves nothing."""
    daemon = await daemons("--idle-timeout", "1").launch(reactor)
    source = denseFile(tmp_path / "source.bin", 4 * MiB)
    destination = daemon.dest / "vm4.bin"
    client = daemon.client(reactor)
    migration = await client.prepare("vm4", [fileSpec(source, destination)])
    mid = migration.migrationId
    answer = await client.call(
        migration.control, commands.OpenStream, migration_id=mid, device="blob"
    )
    sender = StreamSender("blob")
    await client.call(
        await client.connect(),
        commands.StartStream,
        token=answer["token"],
        _protoToSwitchToFactory=SwitchTo(sender),
    )
    await sender.opened
    streamLost = whenLost(sender)
    await sender.writeRound(0, True)
    await sender.writeData(0, os.urandom(MiB))  # ... and then nothing more

    status = await daemon.waitPhase(reactor, mid, "ABORTED", timeout=10)
    assert "idle for more than 1 seconds" in status["reason"]
    assert status["devices"][0]["bytes_done"] == MiB
    await streamLost.addTimeout(5, reactor)  # the target hung up on the stream
    await eventually(reactor, lambda: not daemon.leftovers(), what="staging removed")
    assert not destination.exists()
    assert daemon.journal(mid)["phase"] == "ABORTED"
    await disconnect(reactor, migration.control)
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_prepared_phase_deadline(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A session with no stream within --prepare-timeout aborts, naming PREPARED."""
    daemon = await daemons("--prepare-timeout", "1").launch(reactor)
    source = denseFile(tmp_path / "source.bin", MiB)
    destination = daemon.dest / "vm7.bin"
    migration = await daemon.client(reactor).prepare(
        "vm7", [fileSpec(source, destination)]
    )

    status = await daemon.waitPhase(reactor, migration.migrationId, "ABORTED")
    assert "PREPARED phase did not finish within 1 seconds" in status["reason"]
    await eventually(reactor, lambda: not daemon.leftovers(), what="staging removed")
    assert not destination.exists()
    await disconnect(reactor, migration.control)
    await settled(reactor)


# -- the resume gate ------------------------------------------------------------------

HOOK = """
import json, os, sys
found = {k: v for k, v in os.environ.items() if k.startswith("XENMIG_")}
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(found, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
"""


@pytest_twisted.ensureDeferred
async def test_commit_releases_waiter_and_runs_hook(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A commit answers AwaitRestored and runs --on-commit with the migration's env."""
    seen = tmp_path / "hook.json"
    hook = shlex.join([sys.executable, "-c", HOOK, str(seen)])
    daemon = await daemons("--on-commit", hook).launch(reactor)
    source = sparseFile(tmp_path / "source.img", 8 * MiB, [(MiB, 3 * MiB)])
    destination = daemon.dest / "vm8.img"
    waiter = Deferred.fromCoroutine(
        daemon.local(reactor, commands.AwaitRestored, domain="vm8", timeout=30.0)
    )
    migration = await daemon.client(reactor).prepare(
        "vm8", [fileSpec(source, destination)]
    )
    await migration.transfer()
    assert not waiter.called
    assert not destination.exists()

    installed = await migration.commit()

    mid = migration.migrationId
    assert installed == [str(destination)]
    assert await waiter == {"migration_id": mid, "installed": installed}
    environment = await eventually(
        reactor, lambda: seen.exists() and json.loads(seen.read_text()), what="hook"
    )
    assert environment == {
        "XENMIG_MIGRATION_ID": mid,
        "XENMIG_DOMAIN": "vm8",
        "XENMIG_INSTALLED": str(destination),
        "XENMIG_PEER": "source.test",
    }
    # The VM is released once: asking again waits for the next migration ...
    with pytest.raises(PhaseTimeout, match="did not commit within 1 seconds"):
        await daemon.local(reactor, commands.AwaitRestored, domain="vm8", timeout=1.0)
    # ... while naming this migration still answers for it.
    again = await daemon.local(
        reactor, commands.AwaitRestored, domain="vm8", timeout=1.0, migration_id=mid
    )
    assert again["migration_id"] == mid
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_await_after_commit(daemon: Daemon, tmp_path: Path) -> None:
    """AwaitRestored asked after a commit answers at once with what was installed."""
    source = sparseFile(tmp_path / "source.img", 4 * MiB, [(0, MiB)])
    destination = daemon.dest / "vm9.img"
    migration = await migrate(daemon, source, destination, "vm9")

    answer = await daemon.local(
        reactor, commands.AwaitRestored, domain="vm9", timeout=5.0
    )

    assert answer == {
        "migration_id": migration.migrationId,
        "installed": [str(destination)],
    }
    await settled(reactor)


# -- start-up ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, message",
    [
        pytest.param(
            "missing-cert",
            r"certificate file \S+/missing\.pem does not exist",
            id="missing-cert",
        ),
        pytest.param(
            "wrong-key",
            r"the private key in \S+ does not match the certificate in \S+",
            id="wrong-key",
        ),
        pytest.param(
            "port-in-use",
            r"cannot listen on 127\.0\.0\.1:\d+: address already in use",
            id="port-in-use",
        ),
    ],
)
def test_refuses_to_start(
    daemons: Callable[..., Daemon], certs: PKI, case: str, message: str
) -> None:
    """A misconfigured daemon exits non-zero with one clear line and no traceback."""
    daemon = daemons()
    argv = daemon.argv()
    if case == "missing-cert":
        argv[argv.index("--cert") + 1] = str(certs.ca / "missing.pem")
    elif case == "wrong-key":
        argv[argv.index("--key") + 1] = str(certs.ca / "source.test.key")
    with socket.socket() as squatter:
        if case == "port-in-use":
            squatter.bind(("127.0.0.1", daemon.port))
            squatter.listen()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch("xenmig: " + message, lines[0]), lines[0]
    log = daemon.logPath.read_text() if daemon.logPath.exists() else ""
    assert "Traceback" not in result.stdout + result.stderr + log
    assert not (daemon.stateDir / "control.sock").exists()


def test_refuses_to_start_daemonized(daemons: Callable[..., Daemon]) -> None:
    """Without -n, a port in use still ends twistd non-zero with the clear line."""
    daemon = daemons()
    argv = [word for word in daemon.argv() if word != "-n"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", daemon.port))
        squatter.listen()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "xenmig: cannot listen on 127.0.0.1" in result.stderr, result.stderr
    assert "address already in use" in daemon.logPath.read_text()


class Starting(service.Service):
    """A service that logs when it starts, or fails to start as configured."""

    def __init__(self, name: str, error: Exception | None = None) -> None:
        self.setName(name)
        self.error = error

    def privilegedStartService(self) -> None:
        if self.error is not None:
            raise self.error

    def startService(self) -> None:
        super().startService()
        log.info("{name} started", name=self.name)


def test_readyLineIsLast() -> None:
    """The daemon logs its readiness after every one of its services started."""
    top = TargetDaemon("127.0.0.1:8002", None)
    for name in ("first", "second"):
        Starting(name).setServiceParent(top)
    with capturedLogs() as events:
        top.privilegedStartService()
        top.startService()
    texts = [formatEvent(e) for e in events]
    assert texts == [
        "first started",
        "second started",
        READY_LINE + ": listening on 127.0.0.1:8002",
    ]
    assert processes.READY_LINE == READY_LINE  # what launchers wait for


def test_startupErrorExits(capfd: pytest.CaptureFixture[str]) -> None:
    """A ConfigurationError at start-up exits 1 with one clear line on stderr."""
    top = TargetDaemon("127.0.0.1:8002", None)
    failing = Starting("probe", ConfigurationError("cannot listen on *:1: nope"))
    failing.setServiceParent(top)
    with capturedLogs(), pytest.raises(SystemExit) as exited:
        top.privilegedStartService()
    assert exited.value.code == 1
    assert capfd.readouterr().err == "xenmig: cannot listen on *:1: nope\n"


def test_optionDefaultsAreTheConfigs() -> None:
    """twistd xenmig's defaults are those of the target's configuration."""
    options = tap.Options()
    options.parseOptions(["--insecure-plaintext"])
    config = tap._config(options)
    assert config.timeouts == Timeouts()
    assert config.maxSessions == TargetConfig(config.stateDir).maxSessions
    assert config.maxDevices == TargetConfig(config.stateDir).maxDevices
    assert config.installAs == InstallAs()  # the daemon's user; the source's mode


def test_imageOwnerAndMode() -> None:
    """--image-owner and --image-mode become the installs' defaults, as numbers."""
    options = tap.Options()
    options.parseOptions(
        ["--insecure-plaintext", "--image-owner", "nobody:0", "--image-mode", "0640"]
    )
    config = tap._config(options)
    assert config.installAs == InstallAs(pwd.getpwnam("nobody").pw_uid, 0, 0o640)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--image-owner", "no-such-user-xm", "no user 'no-such-user-xm' on this host"),
        ("--image-owner", "a:b:c", "is not USER, USER:GROUP or :GROUP"),
        ("--image-mode", "4755", "a mode has permission bits only"),
        ("--image-mode", "rw", "is not an octal mode"),
    ],
)
def test_badImageOwnerOrMode(option: str, value: str, message: str) -> None:
    """A bad --image-owner or --image-mode stops the daemon, saying what is wrong."""
    options = tap.Options()
    options.parseOptions(["--insecure-plaintext", option, value])
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        tap._config(options)
