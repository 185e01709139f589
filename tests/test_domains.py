"""Domain control: ``xl`` (a fake one on PATH) and QMP (a real QEMU), and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from daemons import CLIENT, PKI, Daemon, MiB, sparseFile
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from xenmig.demo import testguest
from xenmig.demo.observedguest import ObservedGuest
from xenmig.errors import BadSpec
from xenmig.interfaces import IDomainControl
from xenmig.testing import requirePrograms
from xenmig.toolstack.domains import (
    DomainControlError,
    QMPDomainControl,
    XLDomainControl,
    parseDomainControl,
)

#: A stand-in for Xen's ``xl``: it logs each call to ``calls`` beside itself and
#: behaves as the files ``VERB.status``, ``VERB.say``, ``VERB.sleep`` and
#: ``VERB.run`` there tell it (exit status, stderr text, delay, a command).
FAKE_XL = """#!/bin/sh
here=$(dirname "$0")
echo "$*" >> "$here/calls"
[ -f "$here/$1.sleep" ] && exec sleep "$(cat "$here/$1.sleep")"
[ -f "$here/$1.run" ] && sh "$here/$1.run"
[ -f "$here/$1.say" ] && cat "$here/$1.say" >&2
[ -f "$here/$1.status" ] && exit "$(cat "$here/$1.status")"
exit 0
"""


class FakeXL:
    """A fake ``xl`` in its own directory, first on PATH for this test."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        script = directory / "xl"
        script.write_text(FAKE_XL)
        script.chmod(0o755)

    def calls(self) -> list[str]:
        path = self.directory / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def behave(self, verb: str, **how: str) -> None:
        for key, value in how.items():
            (self.directory / f"{verb}.{key}").write_text(value)

    def env(self) -> dict[str, str]:
        return dict(os.environ, PATH=f"{self.directory}:{os.environ['PATH']}")


@pytest.fixture
def xl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeXL:
    fake = FakeXL(tmp_path / "fakebin")
    monkeypatch.setenv("PATH", fake.env()["PATH"])
    return fake


# -- xl --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_xlPausesResumesReleases(xl: FakeXL) -> None:
    """The xl control runs xl pause, xl unpause and xl destroy on the domain."""
    control = XLDomainControl(reactor, "vm1")
    assert verifyObject(IDomainControl, control)
    await control.pause()
    await control.resume()
    await control.release()
    assert xl.calls() == ["pause vm1", "unpause vm1", "destroy vm1"]


@pytest_twisted.ensureDeferred
async def test_xlFailureKeepsXlsWords(xl: FakeXL) -> None:
    """A failing xl command fails with its exit status and xl's own message."""
    xl.behave("pause", status="3", say="libxl: error: cannot pause domain 7")
    with pytest.raises(DomainControlError) as caught:
        await XLDomainControl(reactor, "vm1").pause()
    assert str(caught.value) == (
        "xl domain vm1: 'xl pause vm1' failed (exit status 3): libxl: error: "
        "cannot pause domain 7"
    )


@pytest_twisted.ensureDeferred
async def test_xlReleaseOfAGoneDomain(xl: FakeXL) -> None:
    """Releasing a domain xl no longer lists succeeds; a listed one that stays fails."""
    xl.behave("destroy", status="1", say="invalid domain identifier")
    xl.behave("list", status="1")
    await XLDomainControl(reactor, "vm1").release()
    assert xl.calls() == ["destroy vm1", "list vm1"]
    xl.behave("list", status="0")
    with pytest.raises(DomainControlError, match="invalid domain identifier"):
        await XLDomainControl(reactor, "vm1").release()


@pytest_twisted.ensureDeferred
async def test_xlThatHangsIsKilled(xl: FakeXL) -> None:
    """An xl command that does not finish in time is killed and reported."""
    xl.behave("pause", sleep="30")
    control = XLDomainControl(reactor, "vm1", timeout=0.3)
    with pytest.raises(DomainControlError, match=r"did not finish within 0.3 s"):
        await control.pause()


@pytest_twisted.ensureDeferred
async def test_xlMissing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without xl on PATH the control says so."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DomainControlError, match="'xl' is not installed"):
        await XLDomainControl(reactor, "vm1").pause()


def test_parseDomainControl() -> None:
    """--domain-control takes xl, qmp:PATH, libvirt:URI and none; nothing else."""
    assert isinstance(parseDomainControl("xl", reactor, "vm1"), XLDomainControl)
    qmp = parseDomainControl("qmp:/run/vm1.qmp", reactor, "vm1")
    assert isinstance(qmp, QMPDomainControl) and qmp.path == "/run/vm1.qmp"
    assert parseDomainControl("none", reactor, "vm1") is None
    for bad in ("libvirt", "qmp:", "xl:vm1", "virsh:qemu:///system"):
        with pytest.raises(BadSpec, match="xl, qmp:PATH, libvirt:URI or none"):
            parseDomainControl(bad, reactor, "vm1")
    with pytest.raises(BadSpec):
        XLDomainControl(reactor, "vm 1; rm -rf /")


# -- QMP -------------------------------------------------------------------------------


@pytest.fixture
def shortdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="xm-dc-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_qmpPausesResumesReleases(shortdir: str) -> None:
    """The QMP control stops and continues the guest, and quits QEMU at release."""
    requirePrograms(testguest.QEMU)
    image = os.path.join(shortdir, "guest.rom")
    testguest.writeGuestImage(image)
    guest = await ObservedGuest(reactor, shortdir, "vm", image).start()
    try:
        control = QMPDomainControl(reactor, guest.qmpPath)
        assert verifyObject(IDomainControl, control)
        await control.pause()
        assert await guest.status() == "paused"
        held = await guest.readCounter()
        await control.resume()
        assert await guest.countsPast(held) > held
        await control.release()
        assert await guest.whenEnded()
        await control.release()  # gone already: still released
        assert [name for name, _ in guest.events] == [
            "STOP",
            "RESUME",
            "SHUTDOWN",
        ]
    finally:
        await guest.stop()


@pytest_twisted.ensureDeferred
async def test_qmpNeverResumesAnEmptyIncomingQEMU(shortdir: str) -> None:
    """A QEMU still waiting for its state is not resumed ('cont' would arm it)."""
    requirePrograms(testguest.QEMU)
    image = os.path.join(shortdir, "guest.rom")
    testguest.writeGuestImage(image)
    guest = await ObservedGuest(reactor, shortdir, "in", image, incoming=True).start()
    try:
        with pytest.raises(DomainControlError, match="'inmigrate'"):
            await QMPDomainControl(reactor, guest.qmpPath).resume()
        assert await guest.status() == "inmigrate"
    finally:
        await guest.stop()


# -- the command line -----------------------------------------------------------------


def xenmig(*args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "xenmig.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--domain-control", "xl", "--pause-command", "true"],
            "give --domain-control or the pause and resume commands",
        ),
        (["--domain-control", "libvirt"], "xl, qmp:PATH, libvirt:URI or none"),
        (["--live"], "--live needs --pause-command and --resume-command (or"),
    ],
)
def test_migrateUsageErrors(args: list[str], message: str) -> None:
    """Contradictory pause options are usage errors (exit 2) before anything runs."""
    result = xenmig(
        "migrate", "--target", "127.0.0.1:9", "--insecure-plaintext",
        "--domain", "vm1", "--device", "file:f:path=/x,target=/y", *args,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--domain-control", "qmp:/x"], "--domain-control needs --resume"),
        (["--resume", "--domain-control", "none"], "--resume needs a domain control"),
    ],
)
def test_awaitUsageErrors(tmp_path: Path, args: list[str], message: str) -> None:
    """await's --resume and --domain-control go together."""
    result = xenmig("await", "--domain", "vm1", "--state-dir", str(tmp_path), *args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    certs = PKI(tmp_path_factory.mktemp("pki"))
    running = Daemon(tmp_path_factory.mktemp("daemon"), certs).start()
    yield running
    running.stop()


def tlsArgs(daemon: Daemon) -> list[str]:
    where = daemon.pki.ca
    return [
        "--target", f"127.0.0.1:{daemon.port}",
        "--ca", str(where / "ca.pem"),
        "--cert", str(where / f"{CLIENT}.pem"),
        "--key", str(where / f"{CLIENT}.key"),
    ]  # fmt: skip


def test_migrateThroughXl(daemon: Daemon, tmp_path: Path) -> None:
    """migrate --domain-control xl pauses, commits, then destroys the domain."""
    fake = FakeXL(tmp_path / "bin")
    source = sparseFile(tmp_path / "blob", 2 * MiB, [(0, MiB)])
    destination = daemon.dest / "xl-blob"
    result = xenmig(
        "migrate", *tlsArgs(daemon), "--domain", "vm-xl",
        "--device", f"file:blob:path={source},target={destination}",
        "--domain-control", "xl", "--json",
        env=fake.env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert fake.calls() == ["pause vm-xl", "destroy vm-xl"]
    report = json.loads(result.stdout)
    assert report["paused_window"] > 0
    assert report["live"]["pause"] == {
        "command": "xl domain vm-xl",
        "status": 0,
        "seconds": report["live"]["pause"]["seconds"],
    }
    assert report["domain_control"] == {"control": "xl domain vm-xl", "released": True}
    assert destination.exists()


def test_failureAfterThePauseUnpauses(daemon: Daemon, tmp_path: Path) -> None:
    """A failure after xl pause aborts the migration and runs xl unpause."""
    fake = FakeXL(tmp_path / "bin")
    source = sparseFile(tmp_path / "blob", 2 * MiB, [(0, MiB)])
    fake.behave("pause", run=f"rm {source}")  # the state vanishes at the pause
    destination = daemon.dest / "xl-lost"
    result = xenmig(
        "migrate", *tlsArgs(daemon), "--domain", "vm-xl-fail",
        "--device", f"file:blob:path={source},target={destination}",
        "--domain-control", "xl",
        env=fake.env(),
    )  # fmt: skip
    assert result.returncode == 1
    assert fake.calls() == ["pause vm-xl-fail", "unpause vm-xl-fail"]
    assert "the VM was resumed here" in result.stderr
    assert not destination.exists()


def test_awaitResumesAfterTheCommit(daemon: Daemon, tmp_path: Path) -> None:
    """await --resume unpauses the domain once its migration committed, not before."""
    fake = FakeXL(tmp_path / "bin")
    source = sparseFile(tmp_path / "blob", MiB, [(0, MiB)])
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xenmig.cli.main",
            "await",
            "--domain",
            "vm-await",
            "--state-dir",
            str(daemon.stateDir),
            "--timeout",
            "30",
            "--resume",
            "--json",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=fake.env(),
    )
    try:
        result = xenmig(
            "migrate", *tlsArgs(daemon), "--domain", "vm-await",
            "--device", f"file:blob:path={source},target={daemon.dest / 'aw'}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        out, err = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, err
    answer = json.loads(out)
    assert answer["committed"] is True and answer["resumed"] is True
    assert fake.calls() == ["unpause vm-await"]


def test_awaitSaysWhenTheResumeFails(daemon: Daemon, tmp_path: Path) -> None:
    """A failed resume after the commit exits 1 and says the state is installed."""
    fake = FakeXL(tmp_path / "bin")
    fake.behave("unpause", status="1", say="libxl: error: domain vm-stuck gone")
    source = sparseFile(tmp_path / "blob", MiB, [(0, MiB)])
    result = xenmig(
        "migrate", *tlsArgs(daemon), "--domain", "vm-stuck",
        "--device", f"file:blob:path={source},target={daemon.dest / 'stuck'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    waited = xenmig(
        "await", "--domain", "vm-stuck", "--state-dir", str(daemon.stateDir),
        "--timeout", "10", "--resume", "--domain-control", "xl",
        env=fake.env(),
    )  # fmt: skip
    assert waited.returncode == 1
    assert "COMMITTED, BUT RESUMING IT FAILED" in waited.stderr
    assert "libxl: error: domain vm-stuck gone" in waited.stderr
