"""
A real Linux guest moves whole between two daemons over mutual TLS: Debian's
kernel and a busybox initramfs under TCG, ext4 on virtio-blk with an fsync
workload, RAM rewritten as it runs, QEMU's tpm-tis on a swtpm.  And when the
target daemon dies during pre-copy, or the incoming QEMU before the commit,
the guest runs on at the source and loses nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import pytest
import pytest_twisted
from daemons import PKI, Daemon, settled
from twisted.internet import reactor
from twisted.internet.testing import StringTransport

from xenmig.demo import linuxguest, realchecks
from xenmig.demo.console import Console
from xenmig.demo.realchecks import runsOn
from xenmig.demo.realvm import KillDuringPrecopy, LinuxQEMU, RealVM


def requireGuest() -> None:
    """Skip without the packages the guest needs; under CI=true, fail."""
    lacking = linuxguest.missing()
    if not lacking:
        return
    message = f"the real guest needs {', '.join(lacking)} (see scripts/bootstrap)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI must have every package: " + message)
    pytest.skip(message)


@pytest.fixture
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    requireGuest()
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest_twisted.async_yield_fixture
async def home() -> Any:
    """The source host's directory (short: it holds unix sockets)."""
    path = tempfile.mkdtemp(prefix="xm-real-")
    yield path
    await settled(reactor)
    shutil.rmtree(path, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def daemon(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The target host's daemon, its allowed root for the incoming QEMUs."""
    running = await Daemon(tmp_path_factory.mktemp("target"), pki).launch(reactor)
    yield running
    running.stop()


def realVM(daemon: Daemon, home: str, domain: str) -> RealVM:
    return RealVM(
        reactor,
        daemon.client(reactor),
        home,
        str(daemon.dest),
        str(daemon.stateDir),
        domain,
    )


async def checkDisk(image: str, last: int) -> None:
    """Every record up to ``last`` is on ``image``, in order; e2fsck finds it clean."""
    await realchecks.checkDisk(reactor, realchecks.Checks(), image, last)


@pytest_twisted.ensureDeferred
async def test_realGuestMovesWhole(daemon: Daemon, home: str) -> None:
    """The guest goes on at the target from where it was; nothing fsynced is lost."""
    vm = realVM(daemon, home, "real-ok")
    try:
        source = await vm.setUp()
        await runsOn(source, 30)
        move = await vm.move("ok")
        assert move.committed, move.reason
        target = move.target
        assert target is not None
        checks = await realchecks.verifyMoved(vm, move)  # raises what broke
        assert len(checks) == 7, checks
        # the next record; or the one after, when the VM paused in the middle of
        # the line of the next (begun on the source's console, ended on the target's)
        across = source.console.continuedOn(target.console)
        assert across in (None, move.syncAtPause + 1)
        assert target.console.syncs[0] == (across or move.syncAtPause) + 1
        assert target.console.said("PCR16")[0] == move.pcrBefore
        assert source.console.said("EXTEND") == ["80020000001300000000"]
        assert 0 < move.report["paused_window"] < move.report["durations"]["total"]
        sizes = {d["name"]: d.get("bytes") for d in move.report["devices"]}
        print(f"paused window {move.report['paused_window']:.2f} s, sent {sizes}")
    finally:
        await vm.tearDown()


@pytest_twisted.ensureDeferred
async def test_targetDaemonKilledDuringPrecopy(daemon: Daemon, home: str) -> None:
    """The target daemon dies during pre-copy: the guest never pauses, runs on."""
    vm = realVM(daemon, home, "real-killed")
    try:
        source = await vm.setUp()
        await runsOn(source, 10)
        move = await vm.move("killed", policy=KillDuringPrecopy(daemon.kill))
        assert not move.committed and move.reason
        assert source.first("STOP") is None  # never paused
        assert move.target is not None and move.target.first("RESUME") is None
        await runsOn(source)
        last = await vm.shutDown(source)
        await checkDisk(vm.image, last)
        assert not os.path.exists(vm.targetImage("killed"))
    finally:
        await vm.tearDown()


@pytest_twisted.ensureDeferred
async def test_incomingQEMUKilledBeforeCommit(daemon: Daemon, home: str) -> None:
    """The incoming QEMU dies before the commit: the source resumes, loses nothing."""

    async def kill(target: LinuxQEMU) -> None:
        target.process.transport.signalProcess("KILL")  # type: ignore[union-attr]
        await target.whenEnded()

    vm = realVM(daemon, home, "real-gone")
    try:
        source = await vm.setUp()
        await runsOn(source, 10)
        move = await vm.move("gone", beforeCommit=kill)
        assert not move.committed
        assert "did not commit" in move.reason, move.reason
        stopped = source.first("STOP")
        assert stopped is not None and source.first("RESUME", stopped) is not None
        assert move.target is not None and move.target.first("RESUME") is None
        assert await runsOn(source) > move.syncAtPause
        assert move.awaited["committed"] is False
        last = await vm.shutDown(source)
        await checkDisk(vm.image, last)
        assert not os.path.exists(vm.targetImage("gone"))
    finally:
        await vm.tearDown()


@pytest.mark.parametrize(
    "source, target, spanned",
    [
        ([b"XM SYNC 66\nXM SY", b"NC 67\n"], [b"\nXM SYNC 68\n"], None),
        ([b"XM SYNC 67\nXM SYNC 6"], [b"8\nXM SYNC 69\n"], 68),
        ([b"XM SYNC 67\n", b"XM SYN"], [b"C 68\r\nXM SYNC 69\n"], 68),
        ([b"XM SYNC 67\n"], [b"XM SYNC 68\n"], None),
        ([b"XM SYNC 67\nXM DIR"], [b"TY 4\nXM SYNC 68\n"], None),
    ],
)
def test_aLineSaidAcrossTheMove(
    source: list[bytes], target: list[bytes], spanned: int | None
) -> None:
    """
    A record's line the guest began on the source's console and ended on the
    target's (the VM paused in the middle of it) is found, whole; and only that.
    """
    consoles = Console(), Console()
    for console, chunks in zip(consoles, (source, target), strict=True):
        console.makeConnection(StringTransport())
        for chunk in chunks:
            console.dataReceived(chunk)
    assert consoles[0].continuedOn(consoles[1]) == spanned
    assert consoles[0].syncs[-1] == 67
