"""
Migrations that survive broken connections: streams reopened where the target
left off, a control connection re-attached within the grace period, and what
happens past it; through the fault proxy, on 127.0.0.1 and between namespaced
hosts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

sys.path.insert(0, os.path.dirname(__file__))

from daemons import CLIENT, PKI, Daemon, MiB, denseFile, eventually, settled  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from nethosts import HostPKI, NetDaemon, Network, hostPort  # noqa: E402

from xenmig.digest import hashFile  # noqa: E402
from xenmig.errors import CommitInDoubt, MigrationAborted, StreamLost  # noqa: E402
from xenmig.model import DeviceSpec  # noqa: E402
from xenmig.source.client import MigrationClient  # noqa: E402
from xenmig.source.connection import ClientTimeouts  # noqa: E402
from xenmig.source.convergence import ConvergencePolicy  # noqa: E402
from xenmig.source.resumable import ResumePolicy  # noqa: E402
from xenmig.toolstack.progress import summary  # noqa: E402

#: The records a resumable stream keeps in these tests (the bound on what one
#: break sends again is this plus one record: a 1 MiB DATA record's frame).
WINDOW = 8 * MiB
RECORD = MiB + 64


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def clientThrough(
    daemon: Daemon, proxy: FaultProxy, seconds: float = 20.0, **kw: Any
) -> MigrationClient:
    """A resumable client of ``daemon`` that reaches it through ``proxy``."""
    kw.setdefault("timeouts", ClientTimeouts(connect=1.0, call=5.0, commit=5.0))
    policy = ResumePolicy(seconds=seconds, maximum=1.0, window=WINDOW)
    return daemon.client(
        reactor, port=proxy.port, resume=True, resumePolicy=policy, **kw
    )


def steer(proxy: FaultProxy, **request: Any) -> Any:
    """A proxy command, off the reactor thread."""
    return deferToThread(proxy.call, **request)


@pytest_twisted.ensureDeferred
async def test_stream_cut_three_times_commits_with_bounded_resend(
    daemons: Callable[..., Daemon],
    proxies: Callable[[Daemon], FaultProxy],
    tmp_path: Path,
) -> None:
    """A file whose stream is cut three times commits with the right digest, and
    each cut sends again at most the kept window plus one record."""
    daemon = await daemons().launch(reactor)
    proxy = proxies(daemon)
    size = 1024 * MiB
    state = denseFile(tmp_path / "state.bin", size)
    destination = daemon.dest / "state.bin"
    # bounded, so that each cut lands in the middle of the transfer
    await steer(proxy, op="set", rate=256 * MiB, directions=["up"])
    client = clientThrough(daemon, proxy)
    migration = await client.prepare(
        "vm1", [DeviceSpec.parse(f"file:blob:path={state},target={destination}")]
    )
    assert migration.link.resumable
    transfer = Deferred.fromCoroutine(migration.transfer())
    for fraction in (0.25, 0.5, 0.75):
        await eventually(
            reactor,
            lambda f=fraction: migration.devices["blob"].bytesSent > f * size,
            timeout=30,
            what=f"{fraction:.0%} sent",
        )
        await steer(proxy, op="reset", min_bytes=MiB)  # the stream, not control
    digests = await transfer
    await migration.commit()

    assert hashFile(str(destination)) == hashFile(str(state)) == digests["blob"]
    report = migration.report()
    assert report["phase"] == "COMMITTED"
    assert report["reconnections"]["streams"] == 3
    assert report["reconnections"]["control"] == 0
    resent = report["reconnections"]["resent_bytes"]
    print(f"resent {resent} bytes over 3 cuts (bound {3 * (WINDOW + RECORD)})")
    assert 0 < resent <= 3 * (WINDOW + RECORD), resent
    assert report["devices"][0]["bytes"] == size  # the content counted once
    lines = summary({**report, "target": proxy.listen})
    assert "survived 3 broken stream(s) and 0 lost control connection(s)" in lines
    status = await daemon.status(reactor, migration.migrationId)
    assert status["phase"] == "COMMITTED"
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_a_stalled_stream_is_opened_again(
    daemons: Callable[..., Daemon],
    proxies: Callable[[Daemon], FaultProxy],
    tmp_path: Path,
) -> None:
    """A stream whose path goes silent (bytes held, no reset) is noticed within
    half the progress time-out (the target takes no record) and opened again,
    as often as it stalls; the migration commits with the digest."""
    daemon = await daemons().launch(reactor)
    proxy = proxies(daemon)
    size = 16 * MiB
    state = denseFile(tmp_path / "state.bin", size)
    destination = daemon.dest / "state.bin"
    # Each connection carries 6 MiB up, then holds everything: the stream's
    # connections stall, the control connection never gets that far.
    await steer(proxy, op="set", stall_after=6 * MiB, directions=["up"])
    timeouts = ClientTimeouts(connect=1.0, call=5.0, commit=5.0, stall=1.0)
    client = clientThrough(daemon, proxy, timeouts=timeouts)
    client.resumePolicy = ResumePolicy(seconds=20.0, maximum=1.0, window=2 * MiB)
    migration = await client.prepare(
        "vm7", [DeviceSpec.parse(f"file:blob:path={state},target={destination}")]
    )
    digests = await migration.transfer()
    await migration.commit()

    assert hashFile(str(destination)) == hashFile(str(state)) == digests["blob"]
    again = migration.report()["reconnections"]
    print(f"stalled stream: {again}")
    assert 2 <= again["streams"] <= 8, again
    assert again["resent_bytes"] <= again["streams"] * (2 * MiB + RECORD)
    await settled(reactor)


def precopyDisk(tmp_path: Path, daemon: Daemon, size: int) -> tuple[Path, Path]:
    image = denseFile(tmp_path / "vm.img", size)
    return image, daemon.dest / "vm.img"


@pytest_twisted.ensureDeferred
async def test_control_dropped_within_grace_does_not_abort(
    daemons: Callable[..., Daemon],
    proxies: Callable[[Daemon], FaultProxy],
    tmp_path: Path,
) -> None:
    """Every connection cut and the target unreachable for a second during
    pre-copy, well within --reconnect-grace: the migration goes on and commits."""
    daemon = await daemons("--reconnect-grace", "10").launch(reactor)
    proxy = proxies(daemon)
    image, destination = precopyDisk(tmp_path, daemon, 48 * MiB)
    await steer(proxy, op="set", rate=48 * MiB, directions=["up"])
    client = clientThrough(daemon, proxy)
    migration = await client.prepare(
        "vm2", [DeviceSpec.parse(f"disk:d0:path={image},target={destination}")]
    )
    precopy = Deferred.fromCoroutine(migration.precopy(ConvergencePolicy(maxRounds=2)))
    await eventually(
        reactor,
        lambda: migration.devices["d0"].bytesSent > 8 * MiB,
        timeout=30,
        what="pre-copy under way",
    )
    await steer(proxy, op="set", blackhole=True)
    await steer(proxy, op="reset")
    await eventually(
        reactor,
        lambda: migration.control is None or migration.control.lost,
        what="the control connection lost",
    )
    status = await daemon.status(reactor, migration.migrationId)
    assert status["phase"] == "RECEIVING"
    await steer(proxy, op="clear")
    await precopy
    digests = await migration.transfer()
    await migration.commit()

    assert hashFile(str(destination)) == hashFile(str(image))
    assert digests["d0"].size == 48 * MiB
    report = migration.report()
    assert report["reconnections"]["control"] >= 1
    assert report["reconnections"]["streams"] >= 1
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_control_lost_beyond_grace_aborts_cleanly(
    daemons: Callable[..., Daemon],
    proxies: Callable[[Daemon], FaultProxy],
    tmp_path: Path,
) -> None:
    """The target unreachable for longer than --reconnect-grace during pre-copy:
    the target aborts and cleans up, and the source, back in touch, learns why
    and ends ABORTED with its devices rolled back (the VM may resume there)."""
    daemon = await daemons("--reconnect-grace", "1").launch(reactor)
    proxy = proxies(daemon)
    image, destination = precopyDisk(tmp_path, daemon, 48 * MiB)
    before = hashFile(str(image))
    await steer(proxy, op="set", rate=32 * MiB, directions=["up"])
    client = clientThrough(daemon, proxy)
    migration = await client.prepare(
        "vm3", [DeviceSpec.parse(f"disk:d0:path={image},target={destination}")]
    )
    precopy = Deferred.fromCoroutine(migration.precopy(ConvergencePolicy(maxRounds=2)))
    await eventually(
        reactor,
        lambda: migration.devices["d0"].bytesSent > 4 * MiB,
        timeout=30,
        what="pre-copy under way",
    )
    await steer(proxy, op="set", blackhole=True)
    await steer(proxy, op="reset")
    status = await daemon.waitPhase(reactor, migration.migrationId, "ABORTED")
    assert "within 1 s" in status["reason"], status["reason"]
    await eventually(reactor, lambda: not daemon.leftovers(), what="staging removed")
    await steer(proxy, op="clear")
    with pytest.raises(MigrationAborted) as aborted:
        await precopy
    assert "within 1 s" in str(aborted.value) or "aborted" in str(aborted.value)
    assert migration.phase == "ABORTED"
    assert not destination.exists()
    assert hashFile(str(image)) == before
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_partition_after_commit_sent_is_in_doubt_not_guessed(
    daemons: Callable[..., Daemon],
    proxies: Callable[[Daemon], FaultProxy],
    tmp_path: Path,
) -> None:
    """The answer to Commit lost in a partition: the source does not guess nor
    re-send; it asks, cannot be told, and says IN-DOUBT; the target committed,
    and asking once the partition heals says so."""
    daemon = await daemons().launch(reactor)
    proxy = proxies(daemon)
    state = denseFile(tmp_path / "state.bin", 4 * MiB)
    destination = daemon.dest / "state.bin"
    timeouts = ClientTimeouts(connect=1.0, call=5.0, commit=2.0)
    client = clientThrough(daemon, proxy, timeouts=timeouts)
    migration = await client.prepare(
        "vm4", [DeviceSpec.parse(f"file:blob:path={state},target={destination}")]
    )
    await migration.transfer()
    # Commit goes up; nothing comes back, and no new connection gets through.
    await steer(proxy, op="set", blackhole=True, directions=["down"])
    with pytest.raises(CommitInDoubt):
        await migration.commit()
    assert migration.phase == "IN-DOUBT"
    status = await daemon.waitPhase(reactor, migration.migrationId, "COMMITTED")
    assert status["phase"] == "COMMITTED"
    assert hashFile(str(destination)) == hashFile(str(state))
    await steer(proxy, op="clear")
    asked = await client.query(migration.migrationId)
    assert asked["phase"] == "COMMITTED"
    assert migration.link.reconnections == 0  # never re-attached to re-send
    migration.link.close()
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_a_target_that_does_not_resume_aborts_as_before(
    daemons: Callable[..., Daemon],
    proxies: Callable[[Daemon], FaultProxy],
    tmp_path: Path,
) -> None:
    """A target run with --reconnect-grace 0 (as an older one) does not grant
    resume: a cut stream aborts the migration, with the target's reason."""
    daemon = await daemons("--reconnect-grace", "0").launch(reactor)
    proxy = proxies(daemon)
    state = denseFile(tmp_path / "state.bin", 32 * MiB)
    destination = daemon.dest / "state.bin"
    await steer(proxy, op="set", rate=32 * MiB, directions=["up"])
    client = clientThrough(daemon, proxy)
    migration = await client.prepare(
        "vm6", [DeviceSpec.parse(f"file:blob:path={state},target={destination}")]
    )
    assert not migration.link.resumable
    transfer = Deferred.fromCoroutine(migration.transfer())
    await eventually(
        reactor,
        lambda: migration.devices["blob"].bytesSent > 8 * MiB,
        timeout=30,
        what="a quarter sent",
    )
    # Queued is not yet forwarded: wait until the stream's connection carried
    # enough for the reset to pick it (a loaded run once reset nothing).
    while (await steer(proxy, op="stats"))["bytes_up"] < 4 * MiB:
        await deferLater(reactor, 0.02, lambda: None)
    await steer(proxy, op="reset", min_bytes=MiB)
    # The target's reason when it aborted first, else the source's own.
    with pytest.raises((MigrationAborted, StreamLost)):
        await transfer
    assert migration.phase == "ABORTED"
    assert migration.report()["reconnections"]["streams"] == 0
    status = await daemon.waitPhase(reactor, migration.migrationId, "ABORTED")
    assert "the stream of device blob" in status["reason"]
    assert not destination.exists()
    await settled(reactor)


def test_command_line_resumes_the_vm_when_the_target_gave_up(
    daemons: Callable[..., Daemon],
    proxies: Callable[[Daemon], FaultProxy],
    tmp_path: Path,
) -> None:
    """The target unreachable for longer than --reconnect-grace while the VM is
    paused: the target aborts, and `xenmig migrate`, back in touch, learns why,
    runs the resume command (the VM runs here again) and exits 1."""
    daemon = daemons("--reconnect-grace", "1").start()
    proxy = proxies(daemon)
    state = denseFile(tmp_path / "state.bin", 32 * MiB)
    resumed = tmp_path / "resumed"
    proxy.set(rate=16 * MiB, directions=["up"])
    where = daemon.pki.ca
    identity = ["--ca", str(where / "ca.pem"), "--cert", str(where / f"{CLIENT}.pem"),
                "--key", str(where / f"{CLIENT}.key")]  # fmt: skip
    argv = [sys.executable, "-m", "xenmig.cli.main", "migrate", "--target",
            proxy.listen, "--server-name", "127.0.0.1", *identity,
            "--domain", "vm8", "--migration-id", "vm8", "--live",
            "--pause-command", "true", "--resume-command", f"touch {resumed}",
            "--device", f"file:blob:path={state},target={daemon.dest / 'b.bin'}",
            "--json"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while proxy.stats()["bytes_up"] < 8 * MiB:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    # Every connection, old and new, reset at its first byte: the source tries
    # again and again, the target waits its grace out.
    proxy.set(reset_after=1, rate=0, directions=["up", "down"])
    proxy.reset()
    while daemon.journal("vm8")["phase"] != "ABORTED":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proxy.clear()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1, err.decode()
    report = json.loads(out)
    assert report["phase"] == "ABORTED"
    assert report["live"]["resumed"] is True
    assert resumed.exists()
    assert "within 1 s" in report["reason"], report["reason"]
    assert not (daemon.dest / "b.bin").exists()


# -- across namespaced hosts ----------------------------------------------------------


def test_link_down_and_up_mid_stream_between_hosts(
    network: Network, tmp_path: Path
) -> None:
    """Between namespaced hosts, three times during the transfer the source's link
    goes down while the proxy between them loses the stream's connection: each
    time the command line opens its stream again when the link is back, sending
    again at most its window plus a record, and the migration commits with the
    digest."""
    source = network.addHost("source")
    target = network.addHost("target")
    certs = HostPKI(tmp_path / "pki")
    certs.forHost(source)
    daemon = NetDaemon(tmp_path / "target", certs, target).start()
    proxy = FaultProxy.start(
        network,
        hostPort(source.routerIPv4, 9002),
        daemon.target(),
        str(tmp_path / "proxy.sock"),
    )
    try:
        size = 128 * MiB
        state = denseFile(tmp_path / "state.img", size)
        destination = daemon.dest / "state.img"
        proxy.set(rate=64 * MiB, directions=["up"])
        argv = [sys.executable, "-m", "xenmig.cli.main", "migrate", "--target",
                proxy.listen, *certs.tlsArgs("source.test"), "--server-name",
                target.ipv4, "--domain", "vm5", "--device",
                f"file:blob:path={state},target={destination}", "--json"]  # fmt: skip
        process = source.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for quarter in (1, 2, 3):
            deadline = time.monotonic() + 30
            while proxy.stats()["bytes_up"] < quarter * size // 4:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.05)
            source.linkDown()
            proxy.reset(minBytes=MiB)  # the path's state of the stream is gone
            time.sleep(1.0)
            source.linkUp()
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err.decode()
        report = json.loads(out)
        assert report["phase"] == "COMMITTED"
        assert hashFile(str(destination)) == hashFile(str(state))
        again = report["reconnections"]
        print(f"between hosts: {again}")
        assert again["streams"] == 3, err.decode()
        assert again["resent_bytes"] <= 3 * (32 * MiB + RECORD)
        assert err.decode().count("the stream of blob broke") == 3
    finally:
        proxy.stop()
        daemon.stop()
