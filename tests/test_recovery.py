"""End to end: a ``twistd xenmig`` daemon killed with SIGKILL and started again."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

sys.path.insert(0, os.path.dirname(__file__))

from daemons import (  # noqa: E402
    PKI,
    Daemon,
    MiB,
    denseFile,
    eventually,
    settled,
    slowKinds,
    sparseFile,
)
from heldfile import heldFileKind, writeDropin  # noqa: E402

from xenmig.devices.file import FileKind  # noqa: E402
from xenmig.digest import hashFile  # noqa: E402
from xenmig.errors import CommitInDoubt, StreamError  # noqa: E402
from xenmig.model import DeviceSpec  # noqa: E402
from xenmig.target.journal import NOTE_DELAY  # noqa: E402


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path / "daemon", PKI(tmp_path / "pki")).start()
    yield daemon
    daemon.stop()


def fileSpec(source: Path, destination: Path) -> DeviceSpec:
    return DeviceSpec.parse(f"file:blob:path={source},target={destination}")


async def migrate(daemon: Daemon, source: Path, destination: Path, domain: str) -> str:
    """A whole migration of one file; its id."""
    migration = await daemon.client(reactor).prepare(
        domain, [fileSpec(source, destination)]
    )
    await migration.transfer()
    await migration.commit()
    return migration.migrationId


@pytest_twisted.ensureDeferred
async def test_daemon_killed_mid_transfer(daemon: Daemon, tmp_path: Path) -> None:
    """A daemon SIGKILLed mid-transfer restarts with nothing staged or installed."""
    source = denseFile(tmp_path / "source.bin", 32 * MiB)
    destination = daemon.dest / "vm5.bin"
    client = daemon.client(reactor, kinds=slowKinds(0.1))
    migration = await client.prepare("vm5", [fileSpec(source, destination)])
    mid = migration.migrationId
    transfer = Deferred.fromCoroutine(migration.transfer())
    await daemon.waitBytes(reactor, mid, 2 * MiB)
    assert daemon.leftovers(), "the transfer should be staging data"
    # RECEIVING is only noted: on disk within NOTE_DELAY, not at once.
    await eventually(
        reactor,
        lambda: daemon.journal(mid)["phase"] == "RECEIVING",
        timeout=NOTE_DELAY + 2,
        what="RECEIVING on disk",
    )

    assert daemon.kill() == -9
    with pytest.raises(StreamError, match="the stream of device blob was lost"):
        await transfer
    assert migration.phase == "ABORTED"
    await daemon.launch(reactor)

    assert daemon.leftovers() == []
    assert not destination.exists()
    record = daemon.journal(mid)
    assert record["phase"] == "ABORTED"
    assert record["reason"] == (
        "the target daemon restarted while the migration was RECEIVING"
    )
    assert [d["state"] for d in record["devices"]] == ["ABORTED"]
    status = await daemon.status(reactor, mid)
    assert (status["phase"], status["reason"]) == ("ABORTED", record["reason"])

    again = await migrate(daemon, source, destination, "vm5")
    assert hashFile(str(destination)) == hashFile(str(source))
    assert daemon.journal(again)["phase"] == "COMMITTED"
    assert daemon.leftovers() == []
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_committed_migration_survives_kill(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A committed migration stays installed and COMMITTED across a SIGKILL restart."""
    source = sparseFile(tmp_path / "source.img", 16 * MiB, [(2 * MiB, 5 * MiB)])
    destination = daemon.dest / "vm6.img"
    mid = await migrate(daemon, source, destination, "vm6")

    daemon.kill()
    await daemon.launch(reactor)

    assert hashFile(str(destination)) == hashFile(str(source))
    assert daemon.journal(mid)["phase"] == "COMMITTED"
    status = await daemon.status(reactor, mid)
    assert (status["phase"], status["installed"]) == ("COMMITTED", [str(destination)])
    assert daemon.leftovers() == []
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_daemon_killed_between_two_installs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A daemon SIGKILLed after one device installed and while the next installs
    restarts with both files removed and the migration ABORTED; the same
    destinations then take a new migration.
    """
    plugins = writeDropin(tmp_path / "plugins")
    path = os.pathsep.join(filter(None, [plugins, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PYTHONPATH", path)
    daemon = Daemon(tmp_path / "daemon", PKI(tmp_path / "pki")).start()
    try:
        marker = tmp_path / "held"
        sources = [tmp_path / "a.src", tmp_path / "b.src"]
        for source in sources:
            source.write_bytes(os.urandom(65536))
        a, b = daemon.dest / "a.img", daemon.dest / "b.img"
        specs = [
            DeviceSpec.parse(f"file:a:path={sources[0]},target={a}"),
            DeviceSpec.parse(
                f"held-file:b:path={sources[1]},target={b},target-held={marker}"
            ),
        ]
        kinds = {"file": FileKind(), "held-file": heldFileKind}
        migration = await daemon.client(reactor, kinds=kinds).prepare("vm1", specs)
        await migration.transfer()
        committing = Deferred.fromCoroutine(migration.commit())
        await eventually(reactor, marker.exists, what="the held install")
        assert a.exists() and b.exists()

        assert daemon.kill() == -9
        with pytest.raises(CommitInDoubt):
            await committing
        await daemon.launch(reactor)

        assert not a.exists() and not b.exists()
        record = daemon.journal(migration.migrationId)
        assert record["phase"] == "ABORTED"
        assert "the target daemon stopped during the commit" in record["reason"]
        assert f"removed {a}, {b}" in record["reason"]
        status = await daemon.status(reactor, migration.migrationId)
        assert status["phase"] == "ABORTED"

        plain = [
            DeviceSpec.parse(f"file:a:path={sources[0]},target={a}"),
            DeviceSpec.parse(f"file:b:path={sources[1]},target={b}"),
        ]
        again = await daemon.client(reactor).prepare("vm1", plain)
        await again.transfer()
        assert await again.commit() == [str(a), str(b)]
        assert a.read_bytes() == sources[0].read_bytes()
        assert daemon.leftovers() == []
        await settled(reactor)
    finally:
        daemon.stop()
