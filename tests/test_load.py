"""
Many migrations and many devices at once into real daemons with their default
limits (real TLS on 127.0.0.1): everything the documentation advertises
commits, and a refusal for load reads as such (BUSY), is retried, and ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from daemons import PKI, Daemon, MiB, denseFile, eventually, settled
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread

from xenmig import amp_commands as commands
from xenmig.errors import Busy
from xenmig.limits import INLINE_OFFER
from xenmig.model import DeviceSpec
from xenmig.source.connection import ClientTimeouts
from xenmig.source.inlinestream import InlineStream

#: Bounds on each test's own waiting (they take a fraction of this).
BOUND = 120.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def smallFiles(where: Path, count: int, size: int = 4096) -> list[Path]:
    where.mkdir(parents=True, exist_ok=True)
    files = []
    for n in range(count):
        path = where / f"s{n}.bin"
        path.write_bytes(os.urandom(size))
        files.append(path)
    return files


def migrateArgv(
    daemon: Daemon, domain: str, devices: list[str], *extra: str
) -> list[str]:
    """``xenmig migrate`` into ``daemon`` as ``source.test``."""
    argv = [
        sys.executable,
        "-m",
        "xenmig.cli.main",
        "migrate",
        *daemon.targetArgs(),
        "--domain",
        domain,
        *extra,
    ]
    for device in devices:
        argv += ["--device", device]
    return argv


def finish(process: subprocess.Popen[str], timeout: float = BOUND) -> tuple[int, str]:
    """Blocking: wait for ``process``; its exit status and standard error."""
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def collectLines(process: subprocess.Popen[str], into: list[str]) -> None:
    """Blocking: append each line ``process`` writes on stderr to ``into``."""
    assert process.stderr is not None
    for line in process.stderr:
        into.append(line)


# -- one migration of 64 devices -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sixtyFourDevicesCommit(certs: PKI, tmp_path: Path) -> None:
    """
    A migration of 64 devices (the documented --max-devices) commits by default,
    each on a stream connection of its own (too large to ride the control
    connection), opened within the handshakes the target announced.
    """
    daemon = await Daemon(tmp_path / "daemon", certs).launch(reactor)
    try:
        files = smallFiles(tmp_path / "src", 64, INLINE_OFFER + 4096)
        specs = [
            DeviceSpec.parse(f"file:d{n}:path={path},target=d{n}.bin")
            for n, path in enumerate(files)
        ]
        client = daemon.client(reactor)
        started = time.monotonic()
        migration = await client.prepare("vm64", specs)
        assert client.limits.handshakesPerAddress == 64
        assert client.handshakes.size == 4
        await migration.transfer()
        runs = migration.devices.values()
        assert not any(isinstance(run.sender, InlineStream) for run in runs)
        assert len(await migration.commit()) == 64
        print(f"64 devices: committed in {time.monotonic() - started:.2f} s")
        for n, path in enumerate(files):
            assert (daemon.dest / f"d{n}.bin").read_bytes() == path.read_bytes()
        log = daemon.logPath.read_text()
        assert "refused" not in log and "BUSY" not in log
    finally:
        daemon.stop()
    await settled(reactor)


# -- fifty ``xenmig migrate`` processes at once ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_fiftyMigrateProcessesCommit(certs: PKI, tmp_path: Path) -> None:
    """50 concurrent ``xenmig migrate`` processes into one default daemon all commit."""
    daemon = await Daemon(tmp_path / "daemon", certs).launch(reactor)
    files = smallFiles(tmp_path / "src", 50)
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            migrateArgv(daemon, f"vm{n}", [f"file:blob:path={path},target=p{n}.bin"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, path in enumerate(files)
    ]
    try:
        outcomes = await gatherResults(
            [deferToThread(finish, process) for process in processes]
        )
        elapsed = time.monotonic() - started
        peak = daemon.peakRSS()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        daemon.stop()
    failed = [(n, err) for n, (code, err) in enumerate(outcomes) if code != 0]
    assert not failed, failed[:3]
    for n, path in enumerate(files):
        assert (daemon.dest / f"p{n}.bin").read_bytes() == path.read_bytes()
    errors = "".join(err for _, err in outcomes)
    assert "Connection reset" not in errors and "non-clean" not in errors
    busy = sum("the target is busy" in err for _, err in outcomes)
    reset = sum("reset the connection" in err for _, err in outcomes)
    print(
        f"50 processes: all committed in {elapsed:.1f} s; {busy} answered BUSY, "
        f"{reset} reset while connecting; daemon peak RSS {peak / MiB:.0f} MiB"
    )
    await settled(reactor)


# -- a refusal for load is BUSY, retried -----------------------------------------------


async def heldMigration(daemon: Daemon, tmp_path: Path) -> Any:
    """A migration prepared (holding the daemon's one session), not transferred."""
    [source] = smallFiles(tmp_path / "held", 1)
    client = daemon.client(reactor)
    spec = DeviceSpec.parse(f"file:held:path={source},target=held.bin")
    return await client.prepare("vm-held", [spec])


@pytest_twisted.ensureDeferred
async def test_busyIsRetriedUntilTheSessionIsFree(certs: PKI, tmp_path: Path) -> None:
    """At --max-sessions 1 a second migration says busy, retries, then commits."""
    daemon = await Daemon(tmp_path / "daemon", certs, "--max-sessions", "1").launch(
        reactor
    )
    process: subprocess.Popen[str] | None = None
    try:
        held = await heldMigration(daemon, tmp_path)
        [source] = smallFiles(tmp_path / "second", 1)
        process = subprocess.Popen(
            migrateArgv(daemon, "vm-second", [f"file:b:path={source},target=b.bin"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        reader = deferToThread(collectLines, process, lines)
        await eventually(
            reactor,
            lambda: any("retrying in" in line for line in lines),
            timeout=30,
            what="the second migration's retry",
        )
        assert not (daemon.dest / "b.bin").exists()
        await held.transfer()
        await held.commit()
        code = await deferToThread(process.wait, BOUND)
        await reader
        text = "".join(lines)
        assert code == 0, text
        assert "the target is busy (--max-sessions): retrying in " in text
        assert (daemon.dest / "b.bin").read_bytes() == source.read_bytes()
        log = daemon.logPath.read_text()
        assert "of vm-second from source.test not admitted yet: BUSY" in log
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        daemon.stop()
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_busyGivesUpNamingTheLimit(certs: PKI, tmp_path: Path) -> None:
    """A migration still refused at its busy time-out exits 1 naming the limit."""
    daemon = await Daemon(tmp_path / "daemon", certs, "--max-sessions", "1").launch(
        reactor
    )
    try:
        held = await heldMigration(daemon, tmp_path)
        client = daemon.client(reactor, timeouts=ClientTimeouts(busy=1.0))
        [source] = smallFiles(tmp_path / "api", 1)
        spec = DeviceSpec.parse(f"file:a:path={source},target=a.bin")
        with pytest.raises(Busy, match=r"^target busy: --max-sessions: .*gave up"):
            await client.prepare("vm-api", [spec])
        process = subprocess.Popen(
            migrateArgv(
                daemon,
                "vm-cli",
                [f"file:c:path={source},target=c.bin"],
                "--busy-timeout",
                "1",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        code, err = await deferToThread(finish, process)
        assert code == 1, err
        assert (
            "aborted: target busy: --max-sessions: the target host already runs" in err
        )
        await held.abort("test over")
    finally:
        daemon.stop()
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_streamsBeyondMaxConnectionsWaitTheirTurn(
    certs: PKI, tmp_path: Path
) -> None:
    """Streams beyond --max-connections are answered BUSY, retried, and commit."""
    daemon = await Daemon(tmp_path / "daemon", certs, "--max-connections", "2").launch(
        reactor
    )
    try:
        files = smallFiles(tmp_path / "src", 4)
        specs = [
            DeviceSpec.parse(f"file:d{n}:path={path},target=d{n}.bin")
            for n, path in enumerate(files)
        ]
        lines: list[str] = []
        # Each small file on a stream connection of its own (not inline).
        client = daemon.client(reactor, onRetry=lines.append, inline=False)
        migration = await client.prepare("vm-conn", specs)
        await migration.transfer()
        await migration.commit()
        for n, path in enumerate(files):
            assert (daemon.dest / f"d{n}.bin").read_bytes() == path.read_bytes()
        waits = [
            line
            for line in lines
            if line.startswith(
                "the target is busy (--max-connections): retrying the stream of d"
            )
        ]
        assert waits, lines
        assert migration.report()["retries"] == len(lines) >= len(waits)
        log = daemon.logPath.read_text()
        assert "connection(s) BUSY, the last from 127.0.0.1: --max-connections" in log
    finally:
        daemon.stop()
    await settled(reactor)


# -- the control connection stays responsive under bulk streams -----------------------


SIZE = 48 * MiB


@pytest_twisted.ensureDeferred
async def test_controlAnswersDuringBulkStreams(certs: PKI, tmp_path: Path) -> None:
    """While several bulk streams run, QueryMigration on control connections answers."""
    daemon = await Daemon(tmp_path / "daemon", certs).launch(reactor)
    try:
        client = daemon.client(reactor)
        migrations = []
        for n in range(3):
            source = denseFile(tmp_path / f"bulk{n}.bin", SIZE)
            specs = [DeviceSpec.parse(f"file:bulk:path={source},target=bulk{n}.bin")]
            migrations.append(await client.prepare(f"vm-bulk{n}", specs))
        transfers: list[Deferred[Any]] = [
            Deferred.fromCoroutine(m.transfer()) for m in migrations
        ]
        await daemon.waitBytes(reactor, migrations[0].migrationId, 4 * MiB)
        latencies: list[float] = []
        atFirstEnd: list[int] | None = None
        while not all(t.called for t in transfers):
            received = []
            for migration in migrations:
                asked = time.monotonic()
                answer = await client.callWithin(
                    30.0,
                    "query",
                    migration.control,
                    commands.QueryMigration,
                    migration_id=migration.migrationId,
                )
                latencies.append(time.monotonic() - asked)
                received.append(answer["status"]["devices"][0]["bytes_done"])
            if atFirstEnd is None and max(received) >= SIZE:
                atFirstEnd = received
        await gatherResults(transfers)
        for migration in migrations:
            await migration.commit()
        print(
            f"QueryMigration during 3 bulk streams: {len(latencies)} answers, "
            f"slowest {max(latencies) * 1000:.0f} ms"
        )
        print(f"received when the first stream was whole: {atFirstEnd}")
        assert len(latencies) >= 3
        assert max(latencies) < 10.0
        # No stream starved while another ran to its end.
        assert atFirstEnd is None or min(atFirstEnd) >= 4 * MiB
    finally:
        daemon.stop()
    await settled(reactor)
