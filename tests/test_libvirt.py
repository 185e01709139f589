"""
Domain control through libvirt: a real, private libvirtd with TCG domains
(``tests/libvirtd.py``), ``virsh``, and ``xenmig migrate``/``await`` with
``--domain-control libvirt:URI``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from daemons import CLIENT, PKI, Daemon, MiB, sparseFile
from libvirtd import Libvirtd, LibvirtdUnavailable
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from xenmig.clients.processes import freePort
from xenmig.errors import BadSpec
from xenmig.interfaces import IDomainControl
from xenmig.toolstack.domains import DomainControlError, parseDomainControl
from xenmig.toolstack.virsh import LibvirtDomainControl


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    """One private libvirtd for the module; skips without it (fails under CI)."""
    daemon = Libvirtd()
    try:
        daemon.start()
    except LibvirtdUnavailable as e:
        shutil.rmtree(daemon.root, ignore_errors=True)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run libvirtd: {e}")
        pytest.skip(f"no libvirtd here: {e}")
    yield daemon
    daemon.stop()


class Lifecycle:
    """``virsh event --loop``: one domain's lifecycle events, as libvirt sends them."""

    def __init__(self, libvirtd: Libvirtd, domain: str) -> None:
        self.path = libvirtd.root / f"{domain}.events"
        with open(self.path, "w") as out:
            self.process = subprocess.Popen(
                ["virsh", "--connect", libvirtd.uri, "event", "--domain", domain,
                 "--event", "lifecycle", "--loop"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    #: The events a start sends (in either order).
    START = ("Started Booted", "Resumed Unpaused")

    def events(self) -> list[str]:
        """``Suspended Paused``, ``Resumed Unpaused``, ``Stopped Destroyed``..."""
        lines = self.path.read_text().splitlines()
        return [line.split(": ", 1)[1] for line in lines if ": " in line]

    def since(self) -> list[str]:
        """The events after the start's."""
        return self.events()[len(self.START) :]

    def waitFor(self, event: str, timeout: float = 10.0) -> list[str]:
        """Wait until ``event`` came after the start; the events since the start."""
        deadline = time.monotonic() + timeout
        while event not in self.since():
            assert time.monotonic() < deadline, f"no {event!r}: {self.events()}"
            time.sleep(0.05)
        return self.since()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


def runningDomain(libvirtd: Libvirtd, name: str) -> Lifecycle:
    """Define and start a domain, its events watched from before its start."""
    libvirtd.defineDomain(name, start=False)
    watched = Lifecycle(libvirtd, name)
    deadline = time.monotonic() + 10
    libvirtd.check("start", "--domain", name)
    # The watcher has seen the start: it sees everything after it.
    while sorted(watched.events()) != sorted(Lifecycle.START):
        if time.monotonic() > deadline:
            watched.stop()
            raise AssertionError(f"virsh event saw no start: {watched.events()}")
        libvirtd.check("domstate", "--domain", name)
        time.sleep(0.05)
    return watched


# -- the control against libvirtd ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_suspendResumeDestroy(libvirtd: Libvirtd) -> None:
    """The control suspends, resumes and destroys a domain; its definition stays."""
    name = libvirtd.defineDomain("xm-ctl")
    control = LibvirtDomainControl(reactor, libvirtd.uri, name)
    assert verifyObject(IDomainControl, control)
    assert control.description == f"libvirt domain xm-ctl at {libvirtd.uri}"
    await control.pause()
    assert libvirtd.state(name) == "paused (user)"
    await control.pause()  # paused already: still paused
    assert await control.state() == "paused"
    await control.resume()
    assert libvirtd.state(name) == "running (unpaused)"
    await control.resume()  # running already (a pause that never happened)
    await control.release()
    assert libvirtd.state(name) == "shut off (destroyed)"
    assert name in libvirtd.check("list", "--all", "--name").split()
    await control.release()  # shut off: released already
    libvirtd.check("undefine", "--domain", name)
    await control.release()  # unknown to libvirt: released already


@pytest_twisted.ensureDeferred
async def test_errorsSayDomainURIAndVirshsWords(libvirtd: Libvirtd) -> None:
    """A failing virsh names the domain, the URI, the command and virsh's message."""
    control = LibvirtDomainControl(reactor, libvirtd.uri, "xm-nosuch")
    with pytest.raises(DomainControlError) as caught:
        await control.pause()
    assert str(caught.value) == (
        f"libvirt domain xm-nosuch at {libvirtd.uri}: 'virsh suspend xm-nosuch' "
        f"failed (exit status 1): error: failed to get domain 'xm-nosuch'"
    )
    name = libvirtd.defineDomain("xm-off", start=False)
    with pytest.raises(DomainControlError, match="domain is not running"):
        await LibvirtDomainControl(reactor, libvirtd.uri, name).resume()
    libvirtd.check("undefine", "--domain", name)


@pytest_twisted.ensureDeferred
async def test_unreachableLibvirtIsNotReleased(libvirtd: Libvirtd) -> None:
    """Without an answer from libvirt, release fails: the domain is not 'gone'."""
    uri = f"qemu+unix:///session?socket={libvirtd.root}/no-such-sock"
    control = LibvirtDomainControl(reactor, uri, "xm-any")
    with pytest.raises(DomainControlError) as caught:
        await control.release()
    message = str(caught.value)
    assert message.startswith(f"libvirt domain xm-any at {uri}: ")
    assert "'virsh destroy xm-any' failed (exit status 1)" in message
    assert "failed to connect to the hypervisor" in message
    with pytest.raises(DomainControlError, match="failed to connect to the hyperv"):
        await control.pause()


# -- the command line against libvirtd -------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    certs = PKI(tmp_path_factory.mktemp("pki"))
    running = Daemon(tmp_path_factory.mktemp("daemon"), certs).start()
    yield running
    running.stop()


def xenmig(daemon: Daemon, *args: str, env: dict[str, str] | None = None) -> Any:
    where = daemon.pki.ca
    return subprocess.run(
        [sys.executable, "-m", "xenmig.cli.main", *args[:1],
         "--target", f"127.0.0.1:{daemon.port}",
         "--ca", str(where / "ca.pem"),
         "--cert", str(where / f"{CLIENT}.pem"),
         "--key", str(where / f"{CLIENT}.key"), *args[1:]],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_migratePausesThenDestroys(
    libvirtd: Libvirtd, daemon: Daemon, tmp_path: Path
) -> None:
    """migrate --domain-control libvirt:URI suspends the domain, commits, destroys."""
    watched = runningDomain(libvirtd, "xm-mig")
    try:
        source = sparseFile(tmp_path / "state", 2 * MiB, [(0, MiB)])
        destination = daemon.dest / "xm-mig.state"
        result = xenmig(
            daemon, "migrate", "--domain", "xm-mig",
            "--device", f"file:state:path={source},target={destination}",
            "--domain-control", f"libvirt:{libvirtd.uri}", "--json",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        control = f"libvirt domain xm-mig at {libvirtd.uri}"
        assert report["phase"] == "COMMITTED"
        assert report["live"]["pause"]["command"] == control
        assert report["domain_control"] == {"control": control, "released": True}
        assert destination.read_bytes() == source.read_bytes()
        # Paused from before the transfer until the release: never resumed.
        assert watched.waitFor("Stopped Destroyed") == [
            "Suspended Paused",
            "Shutdown Finished after host request",
            "Stopped Destroyed",
        ]
        assert libvirtd.state("xm-mig") == "shut off (destroyed)"
    finally:
        watched.stop()


#: The real virsh, and after a ``suspend`` the source state vanishes (as if the
#: paused VM's device had failed): the migration aborts after the pause.
VANISHING_VIRSH = """#!/bin/sh
{virsh} "$@"; status=$?
for word in "$@"; do [ "$word" = suspend ] && rm -f {state}; done
exit $status
"""


def test_failureAfterThePauseResumes(
    libvirtd: Libvirtd, daemon: Daemon, tmp_path: Path
) -> None:
    """A failure after the suspend aborts the migration and resumes the domain."""
    watched = runningDomain(libvirtd, "xm-fail")
    try:
        source = sparseFile(tmp_path / "state", MiB, [(0, MiB)])
        bindir = tmp_path / "bin"
        bindir.mkdir()
        wrapper = bindir / "virsh"
        virsh = shutil.which("virsh")
        assert virsh is not None
        wrapper.write_text(VANISHING_VIRSH.format(virsh=virsh, state=source))
        wrapper.chmod(0o755)
        destination = daemon.dest / "xm-fail.state"
        result = xenmig(
            daemon, "migrate", "--domain", "xm-fail",
            "--device", f"file:state:path={source},target={destination}",
            "--domain-control", f"libvirt:{libvirtd.uri}",
            env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}"),
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert "aborted" in result.stderr and "the VM was resumed here" in result.stderr
        assert not destination.exists()
        events = watched.waitFor("Resumed Unpaused")
        assert events == ["Suspended Paused", "Resumed Unpaused"]
        assert libvirtd.state("xm-fail") == "running (unpaused)"
    finally:
        watched.stop()
        libvirtd.virsh("destroy", "--domain", "xm-fail")


def test_refusedDeviceLeavesTheDomainRunning(
    libvirtd: Libvirtd, daemon: Daemon, tmp_path: Path
) -> None:
    """A device the target refuses at Prepare never suspends the domain."""
    watched = runningDomain(libvirtd, "xm-refused")
    try:
        source = sparseFile(tmp_path / "state", MiB, [(0, MiB)])
        outside = tmp_path / "not-an-allowed-root" / "state"
        result = xenmig(
            daemon, "migrate", "--domain", "xm-refused",
            "--device", f"file:state:path={source},target={outside}",
            "--domain-control", f"libvirt:{libvirtd.uri}",
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert "aborted" in result.stderr and str(outside) in result.stderr
        time.sleep(0.2)  # an event would have come by now
        assert watched.since() == []
        assert libvirtd.state("xm-refused") == "running (booted)"
    finally:
        watched.stop()
        libvirtd.virsh("destroy", "--domain", "xm-refused")


def test_awaitResumesThePausedDomain(
    libvirtd: Libvirtd, daemon: Daemon, tmp_path: Path
) -> None:
    """await --resume --domain-control libvirt:URI resumes the domain once committed."""
    name = libvirtd.defineDomain("xm-await")
    libvirtd.check("suspend", "--domain", name)  # as it arrives, paused
    source = sparseFile(tmp_path / "state", MiB, [(0, MiB)])
    waiting = subprocess.Popen(
        [sys.executable, "-m", "xenmig.cli.main", "await", "--domain", name,
         "--state-dir", str(daemon.stateDir), "--timeout", "60", "--resume",
         "--domain-control", f"libvirt:{libvirtd.uri}", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert libvirtd.state(name) == "paused (user)"
        result = xenmig(
            daemon, "migrate", "--domain", name,
            "--device", f"file:state:path={source},target={daemon.dest / 'aw'}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
        answer = json.loads(out)
        assert answer["committed"] is True and answer["resumed"] is True
        assert libvirtd.state(name) == "running (unpaused)"
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
        libvirtd.virsh("destroy", "--domain", name)


# -- without libvirtd ------------------------------------------------------------------


def test_parseLibvirtControl() -> None:
    """libvirt:URI names a libvirt domain control; a bare or bad URI is a bad spec."""
    control = parseDomainControl("libvirt:qemu:///system", reactor, "vm1")
    assert isinstance(control, LibvirtDomainControl)
    assert control.uri == "qemu:///system" and control.domain == "vm1"
    assert control.description == "libvirt domain vm1 at qemu:///system"
    for bad in ("libvirt", "libvirt:"):
        with pytest.raises(BadSpec, match="xl, qmp:PATH, libvirt:URI or none"):
            parseDomainControl(bad, reactor, "vm1")
    for uri in ("-c", "qemu:///sys tem", "qemu:///system\n"):
        with pytest.raises(BadSpec, match="libvirt URI .* is invalid"):
            parseDomainControl(f"libvirt:{uri}", reactor, "vm1")
    with pytest.raises(BadSpec, match="domain 'vm 1' is invalid"):
        parseDomainControl("libvirt:qemu:///system", reactor, "vm 1")


#: A virsh that never answers (a hung libvirtd), and records that it was called.
HANGING_VIRSH = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls"
exec sleep 30
"""


@pytest_twisted.ensureDeferred
async def test_hangingVirshIsKilled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A virsh that does not finish in time is killed and reported."""
    script = tmp_path / "virsh"
    script.write_text(HANGING_VIRSH)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    control = LibvirtDomainControl(reactor, "qemu:///system", "vm1", timeout=0.3)
    with pytest.raises(DomainControlError, match=r"did not finish within 0.3 s"):
        await control.pause()
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["--connect qemu:///system suspend --domain vm1"]


@pytest_twisted.ensureDeferred
async def test_virshMissing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without virsh on PATH the control says so."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DomainControlError, match="'virsh' is not installed"):
        await LibvirtDomainControl(reactor, "qemu:///system", "vm1").pause()


# -- libvirt moves the domain, xenmig its local disk (doc/toolstacks.md) --------------


#: How doc/toolstacks.md has libvirt migrate the paused domain, and this test too.
VIRSH_MIGRATE = ("--persistent", "--undefinesource", "--unsafe")


def docSequence() -> list[list[str]]:
    """The commands of doc/toolstacks.md's libvirt sequence, split into words."""
    text = (Path(__file__).parent.parent / "doc" / "toolstacks.md").read_text()
    found = re.search(r"<!-- libvirt sequence -->\n```\n(.*?)```", text, re.S)
    assert found, "doc/toolstacks.md lost its libvirt sequence"
    lines = [
        line for line in found.group(1).replace("\\\n", " ").splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    return [shlex.split(line) for line in lines]


def test_docSequenceIsTheTestedOne() -> None:
    """The documented sequence runs the commands, with the options, tested below."""
    from xenmig.cli.main import parser

    migrate, virshMigrate, resume = docSequence()
    args = parser().parse_args(migrate[1:])
    assert args.command == "migrate" and args.live and args.domain_control is None
    assert [spec.kind for spec in args.device] == ["disk"]
    assert args.pause_command.endswith(f"suspend {args.domain}")
    assert args.resume_command.endswith(f"resume {args.domain}")
    assert virshMigrate[:4] == ["virsh", "-c", "qemu:///system", "migrate"]
    assert set(VIRSH_MIGRATE) <= set(virshMigrate)
    assert resume == ["virsh", "-c", "qemu:///system", "resume", args.domain]


@pytest.fixture(scope="module")
def hostB(libvirtd: Libvirtd) -> Iterator[Libvirtd]:
    """A second private libvirtd: another host to ``virsh migrate``."""
    daemon = Libvirtd(seed=libvirtd).start()
    yield daemon
    daemon.stop()


def test_libvirtMovesTheDomainXenmigItsDisk(
    libvirtd: Libvirtd, hostB: Libvirtd, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """
    doc/toolstacks.md's sequence: xenmig moves a local disk libvirt does not
    copy, the domain paused by virsh; then libvirt migrates the paused domain,
    which resumes on B with the disk xenmig installed.
    """
    a, b = libvirtd, hostB
    disk = a.root / "xm-move.raw"
    sparseFile(disk, 8 * MiB, [(0, MiB), (5 * MiB, 6 * MiB)])
    images = b.root / "images"
    images.mkdir()
    a.own(disk)  # the session daemons' QEMUs run as their user
    b.own(images)
    name = a.defineDomain("xm-move", disk=str(disk))
    # The guest writes (QEMU's own block layer, in its place) while it runs.
    device = "/machine/peripheral/virtio-disk0/virtio-backend"
    wrote = a.check("qemu-monitor-command", "--domain", name, "--hmp",
                    f'qemu-io -d {device} "write -P 0x5a 2M 64k"')  # fmt: skip
    assert wrote == ""  # HMP's errors are its output
    certs = PKI(tmp_path_factory.mktemp("pki-move"))
    target = Daemon(tmp_path_factory.mktemp("daemon-move"), certs,
                    "--allow-root", str(images)).start()  # fmt: skip
    try:
        installed = images / "xm-move.raw"
        moved = xenmig(
            target, "migrate", "--domain", name, "--live",
            "--device", f"disk:vda:path={disk},target={installed}",
            "--pause-command", f"virsh --connect '{a.uri}' suspend {name}",
            "--resume-command", f"virsh --connect '{a.uri}' resume {name}",
        )  # fmt: skip
        assert moved.returncode == 0, moved.stderr
        assert a.state(name) == "paused (user)"  # paused here, its disk installed there
        assert installed.read_bytes() == disk.read_bytes()
        assert installed.read_bytes()[2 * MiB : 2 * MiB + 4] == b"\x5a" * 4
        b.own(installed)  # what qemu:///system's dynamic_ownership does
        xml = a.check("dumpxml", "--migratable", "--domain", name)
        destXML = b.root / "xm-move-dest.xml"
        destXML.write_text(xml.replace(str(disk), str(installed)))
        port = freePort()
        a.check("migrate", "--domain", name, "--desturi", b.uri, *VIRSH_MIGRATE,
                "--xml", str(destXML), "--listen-address", "127.0.0.1",
                "--migrateuri", f"tcp://127.0.0.1:{port}")  # fmt: skip
        assert b.state(name) == "paused (user)"  # it arrives as it left
        b.check("resume", "--domain", name)
        assert b.state(name) == "running (unpaused)"
        assert str(installed) in b.check("domblklist", "--domain", name)
        assert name not in a.check("list", "--all", "--name").split()
    finally:
        target.stop()
        for host in (a, b):
            host.virsh("destroy", "--domain", name)
            host.virsh("undefine", "--domain", name)
