"""A whole VM (QEMU, swtpm, disk) migrated behind one resume gate, and its failures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from daemons import PKI, Daemon, settled
from twisted.internet import reactor

from xenmig.demo import linuxguest
from xenmig.demo.wholevm import PROGRAMS, WholeVM
from xenmig.testing import requirePrograms


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The target host's daemon; its allowed root holds the target's QEMU sockets."""
    requirePrograms(*PROGRAMS)
    certs = PKI(tmp_path_factory.mktemp("pki"))
    running = Daemon(tmp_path_factory.mktemp("target"), certs).start()
    yield running
    running.stop()


@pytest_twisted.async_yield_fixture
async def home() -> Any:
    """The source host's directory (short: it holds unix sockets)."""
    path = tempfile.mkdtemp(prefix="xm-vm-")
    yield path
    await settled(reactor)
    shutil.rmtree(path, ignore_errors=True)


async def migrateVM(daemon: Daemon, home: str, domain: str, failure: Any = None) -> Any:
    """Set up the VM, migrate it, check every guarantee; the outcome and checks."""
    vm = WholeVM(
        reactor,
        daemon.client(reactor),
        home,
        str(daemon.dest),
        str(daemon.stateDir),
        domain,
        failure,
    )
    try:
        await vm.setUp()
        outcome = await vm.migrate()
        vm.verify(outcome)  # raises ScenarioFailed naming what broke
    finally:
        await vm.tearDown()
    return outcome


@pytest_twisted.ensureDeferred
async def test_wholeVMMoves(daemon: Daemon, home: str) -> None:
    """QEMU, TPM and disk move together; the target runs the VM only after commit."""
    outcome = await migrateVM(daemon, home, "vm-whole")
    assert outcome.committed
    assert outcome.counterLoaded == outcome.counterAtPause < outcome.counterAfter
    assert outcome.pcrAfter == outcome.pcr and "sha256" in outcome.pcr
    assert outcome.diskInstalled == outcome.diskAtPause != outcome.diskBefore
    # The target QEMU runs on the installed image, and its writes land there.
    assert outcome.diskAttached.endswith("vm-whole-disk0.raw")
    assert outcome.writeAfterLanded
    report = outcome.report
    assert {d["name"]: d["kind"] for d in report["devices"]} == {
        "qemu": "devmodel",
        "tpm0": "vtpm",
        "disk0": "disk",
    }
    disk = next(d for d in report["devices"] if d["name"] == "disk0")
    assert len(disk["rounds"]) >= 1  # pre-copied while the writer wrote
    assert 0 < report["paused_window"] < report["durations"]["total"]
    status = await daemon.status(reactor, outcome.migrationId)
    assert status["phase"] == "COMMITTED"
    assert outcome.awaited["migration_id"] == outcome.migrationId


@pytest_twisted.ensureDeferred
async def test_targetQEMURefusesTheState(daemon: Daemon, home: str) -> None:
    """The target QEMU refuses the state: QEMU's words reach the source; it resumes."""
    outcome = await migrateVM(daemon, home, "vm-refused", "refuse")
    assert not outcome.committed
    assert (
        "refused the state: qemu-system-x86_64: Size mismatch: pc.bios: 0x10000 != "
        "0x20000: Invalid argument" in outcome.reason
    )
    assert outcome.counterAfter > outcome.counterAtPause
    status = await daemon.status(reactor, outcome.migrationId)
    assert status["phase"] == "ABORTED"
    assert "Size mismatch: pc.bios" in status["reason"]


@pytest_twisted.ensureDeferred
async def test_connectionDropsBeforeCommit(daemon: Daemon, home: str) -> None:
    """The control connection drops before the commit: the source VM runs on."""
    outcome = await migrateVM(daemon, home, "vm-dropped", "drop")
    assert not outcome.committed
    assert outcome.counterLoaded == outcome.counterAtPause  # the target had it all
    assert "control connection was lost" in outcome.reason
    assert outcome.counterAfter > outcome.counterAtPause
    assert outcome.awaited["committed"] is False


def test_demoRunsTheWholeVM() -> None:
    """``xenmig demo`` migrates the whole VM and the real guest, all verified."""
    requirePrograms(*PROGRAMS)
    result = subprocess.run(
        [sys.executable, "-m", "xenmig.cli.main", "demo", "--size-mib", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "verified exactly one copy ran: the target resumed after" in out
    assert "verified the target's TPM has the source's PCR 16" in out
    assert "verified the target's disk is the source's disk at its pause" in out
    assert re.search(
        r"whole VM \(devmodel:qemu, vtpm:tpm0, disk:disk0\): paused window [\d.]+ ",
        out,
    )
    if linuxguest.missing() and os.environ.get("CI", "").lower() != "true":
        assert "leaving out the real guest: needs" in out
        return
    assert "verified the guest goes on at the target from where it was" in out
    assert "verified e2fsck -fn finds the filesystem clean" in out
    assert re.search(r"real guest \(devmodel:qemu, disk:vda\): paused window", out)
