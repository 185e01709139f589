"""
``xenmig demo``: two real daemons on loopback, real state migrated both ways.

It makes a throwaway CA and two host identities, starts ``twistd -n xenmig`` for
hosta.test and hostb.test on free loopback ports, migrates every demo device A->B
(as host A) and back B->A (as host B) over mutual TLS, verifies each result
(digests, the target daemon's own status on its local socket, the resume gate
firing), prints a summary, and stops the daemons.

Each kind of state is one L{DemoDevice} in L{DEMO_DEVICES}: it makes the source
state, gives the device spec, and verifies what the target installed.  A kind
joins the demo by adding an entry; an entry runs only where its kind is
installed (L{xenmig.plugins.deviceKinds}) and its programs exist.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from xenmig import tls
from xenmig.cli import pki
from xenmig.cli.progress import (
    ProgressDisplay,
    formatBytes,
    formatRate,
    formatSeconds,
    statusTable,
)
from xenmig.clients.processes import Daemon, freePort
from xenmig.digest import hashFile
from xenmig.model import DeviceSpec, MigrationStatus
from xenmig.plugins import deviceKinds
from xenmig.source.client import ClientTimeouts, MigrationClient
from xenmig.source.migration import SourceMigration
from xenmig.source.threadedstream import sslContext

MiB = 1024 * 1024
DOMAIN = "demo-vm"


class DemoFailed(Exception):
    """A step of the demo failed or a result did not verify."""


@dataclass
class DemoHost:
    """One of the two hosts: its identity, daemon and directories."""

    name: str
    home: str
    pkiDir: str
    port: int = 0
    daemon: Daemon | None = None

    @property
    def stateDir(self) -> str:
        return os.path.join(self.home, "state")

    @property
    def root(self) -> str:
        """The allowed root: state received by this host is installed here."""
        return os.path.join(self.home, "vm")

    @property
    def cert(self) -> str:
        return os.path.join(self.pkiDir, self.name + ".pem")

    @property
    def key(self) -> str:
        return os.path.join(self.pkiDir, self.name + ".key")

    def clientTo(self, reactor: Any, target: DemoHost, **kw: Any) -> MigrationClient:
        """A client with this host's identity, verifying ``target``'s name."""
        identity = tls.loadIdentity(self.cert, self.key)
        authorities = tls.loadAuthority(os.path.join(self.pkiDir, pki.CA_CERTIFICATE))
        options = tls.clientOptions(target.name, identity, authorities)
        return MigrationClient(
            reactor,
            "127.0.0.1",
            target.port,
            tls=options,
            sslContext=sslContext(identity, authorities),
            serverName=target.name,
            **kw,
        )


@dataclass
class Leg:
    """One migration of the demo: from ``source`` to ``target``."""

    number: int
    source: DemoHost
    target: DemoHost
    migrationId: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)


class DemoDevice:
    """
    One kind of state in the demo.  Subclasses make the source state on the
    source host (``setup``, per leg), name the device (``spec``), and check what
    the target installed (``verify``, raising L{DemoFailed}).
    """

    kind = ""
    name = ""
    #: External programs this entry needs; without one, it is left out.
    programs: tuple[str, ...] = ()
    #: One line for the introduction.
    description = ""

    def available(self, kinds: dict[str, Any]) -> str | None:
        """None if the entry can run here, else why not."""
        if self.kind not in kinds:
            return f"device kind {self.kind!r} is not installed"
        missing = [p for p in self.programs if shutil.which(p) is None]
        if missing:
            return f"needs {', '.join(missing)}"
        return None

    async def setup(self, run: DemoRun, leg: Leg) -> DeviceSpec:
        """Make the source state of ``leg``; the device spec to migrate it."""
        raise NotImplementedError

    async def verify(self, run: DemoRun, leg: Leg, installed: list[str]) -> str:
        """Check the target's state; one line saying what was verified."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        """Stop whatever the entry started (its processes), success or not."""


class FileDemo(DemoDevice):
    """
    The ``file`` kind: a state file with data, a hole in the middle, data; sent
    A->B, then B's copy sent back to A; every copy must have the original digest.
    """

    kind = "file"
    name = "blob"

    def __init__(self, sizeMiB: int = 64) -> None:
        self.size = sizeMiB * MiB
        self.description = (
            f"a {formatBytes(self.size)} state file with a "
            f"{formatBytes(self._hole()[1] - self._hole()[0])} hole in the middle"
        )
        self.digest: Any = None
        self.current = ""
        self.sparse = False

    def _hole(self) -> tuple[int, int]:
        start = (self.size * 3 // 8) & ~0xFFFF
        return start, max(start, (self.size * 5 // 8) & ~0xFFFF)

    async def setup(self, run: DemoRun, leg: Leg) -> DeviceSpec:
        if leg.number == 1:
            self.current = os.path.join(leg.source.home, "blob.img")
            await run.inThread(_writeSparse, self.current, self.size, self._hole())
            self.digest = await run.inThread(hashFile, self.current)
            self.sparse = await run.inThread(_allocated, self.current) < self.size
        destination = os.path.join(leg.target.root, f"blob-from-{leg.source.name}.img")
        return DeviceSpec.parse(
            f"file:{self.name}:path={self.current},target={destination}"
        )

    async def verify(self, run: DemoRun, leg: Leg, installed: list[str]) -> str:
        path = next((p for p in installed if "blob-from-" in p), None)
        if path is None:
            raise DemoFailed(f"the target installed no blob file: {installed}")
        digest = await run.inThread(hashFile, path)
        if digest != self.digest:
            raise DemoFailed(
                f"{path} has digest {digest.hex}, the original {self.digest.hex}"
            )
        allocated = await run.inThread(_allocated, path)
        if self.sparse and allocated >= self.size:
            raise DemoFailed(f"{path} lost its hole: {allocated} bytes allocated")
        self.current = path
        return (
            f"{self.name}: {path} has the original digest ({formatBytes(digest.size)},"
            f" {formatBytes(allocated)} allocated)"
        )


def _allocated(path: str) -> int:
    """Blocking: the bytes a file really occupies on disk."""
    return os.stat(path).st_blocks * 512


def _sizes(counts: list[int]) -> str:
    return ", ".join(formatBytes(c) for c in counts) or "nothing"


def _writeSparse(path: str, size: int, hole: tuple[int, int]) -> None:
    """Blocking: random data, then a hole over ``hole``, then random data."""
    with open(path, "wb") as f:
        for start, end in ((0, hole[0]), (hole[1], size)):
            f.seek(start)
            position = start
            while position < end:
                chunk = min(MiB, end - position)
                f.write(os.urandom(chunk))
                position += chunk
        f.truncate(size)


class DiskDemo(FileDemo):
    """
    The ``disk`` kind: a sparse raw image, with pre-copy rounds while the "VM"
    runs; sent A->B and back like the file, every copy with the original digest.
    """

    kind = "disk"
    name = "disk0"

    def __init__(self, sizeMiB: int = 64) -> None:
        super().__init__(sizeMiB)
        self.description = f"a {formatBytes(self.size)} sparse raw disk image"

    async def setup(self, run: DemoRun, leg: Leg) -> DeviceSpec:
        if leg.number == 1:
            self.current = os.path.join(leg.source.home, "disk0.raw")
            await run.inThread(_writeSparse, self.current, self.size, self._hole())
            self.digest = await run.inThread(hashFile, self.current)
        destination = os.path.join(leg.target.root, f"disk0-from-{leg.source.name}.raw")
        return DeviceSpec.parse(
            f"disk:{self.name}:path={self.current},target={destination},format=raw"
        )

    async def verify(self, run: DemoRun, leg: Leg, installed: list[str]) -> str:
        path = next((p for p in installed if "disk0-from-" in p), None)
        if path is None:
            raise DemoFailed(f"the target installed no disk image: {installed}")
        digest = await run.inThread(hashFile, path)
        if digest != self.digest:
            raise DemoFailed(
                f"{path} has digest {digest.hex}, the original {self.digest.hex}"
            )
        self.current = path
        return f"{self.name}: {path} has the original digest"


class VTPMDemo(DemoDevice):
    """
    The ``vtpm`` kind: a running swtpm with an extended PCR on host A; its state is
    installed as a swtpm state directory on B, where a swtpm resumes it (no
    TPM2_Startup, same PCR); that swtpm is then migrated back to A.
    """

    kind = "vtpm"
    name = "tpm0"
    programs = ("swtpm", "tpm2_startup", "tpm2_pcrextend", "tpm2_pcrread")
    description = "a running swtpm TPM 2 with PCR 16 extended"

    def __init__(self) -> None:
        self.running: Any = None
        self.started: list[Any] = []
        self.pcrs = ""

    async def setup(self, run: DemoRun, leg: Leg) -> DeviceSpec:
        if leg.number == 1:
            self.running = await self._swtpm(run, leg.source.home, "vtpm-source")
            await self.running.control.init()
            await self._tpm2(run, "tpm2_startup", "-c")
            extend = "16:sha256=" + os.urandom(32).hex()
            await self._tpm2(run, "tpm2_pcrextend", extend)
            self.pcrs = await self._tpm2(run, "tpm2_pcrread", "sha256:16")
        statedir = os.path.join(leg.target.root, f"vtpm-from-{leg.source.name}")
        return DeviceSpec.parse(
            f"vtpm:{self.name}:ctrl={self.running.ctrlPath},target-statedir={statedir}"
        )

    async def verify(self, run: DemoRun, leg: Leg, installed: list[str]) -> str:
        from xenmig.clients.swtpmprocess import (
            TPM2_STARTUP_CLEAR,
            TPM_RC_INITIALIZE,
            responseCode,
            tpmCommand,
        )

        source = self.running
        await _bounded(run.reactor, source.whenEnded(), 10.0)
        if source.running:
            raise DemoFailed(f"the source swtpm on {leg.source.name} still runs")
        statedir = os.path.join(leg.target.root, f"vtpm-from-{leg.source.name}")
        if statedir not in installed:
            raise DemoFailed(f"the target installed no vTPM state dir: {installed}")
        self.running = await self._swtpm(run, statedir)
        await self.running.control.init(1)  # resume; delete the volatile state
        startup = await tpmCommand(
            run.reactor, self.running.serverPath, TPM2_STARTUP_CLEAR
        )
        if responseCode(startup) != TPM_RC_INITIALIZE:
            raise DemoFailed("the TPM on the target did not resume (it took Startup)")
        pcrs = await self._tpm2(run, "tpm2_pcrread", "sha256:16")
        if pcrs != self.pcrs:
            raise DemoFailed(
                f"PCR 16 on {leg.target.name} is {pcrs!r}, not {self.pcrs!r}"
            )
        value = pcrs.split(":")[-1].strip()[:18]
        return (
            f"{self.name}: a swtpm on {leg.target.name} resumed the state (no "
            f"Startup, PCR 16 = {value}...); the source swtpm exited"
        )

    async def cleanup(self) -> None:
        for process in self.started:
            await process.stop()

    async def _swtpm(self, run: DemoRun, home: str, name: str = "") -> Any:
        from xenmig.clients.swtpmprocess import SwtpmProcess

        state = os.path.join(home, name) if name else home
        os.makedirs(state, exist_ok=True)
        process = SwtpmProcess(run.reactor, state)
        self.started.append(process)
        await process.start()
        return process

    async def _tpm2(self, run: DemoRun, tool: str, *args: str) -> str:
        from twisted.internet.utils import getProcessOutputAndValue

        env = dict(os.environ, TPM2TOOLS_TCTI=f"swtpm:path={self.running.serverPath}")
        out, err, code = await getProcessOutputAndValue(
            tool, args, env=env, reactor=run.reactor
        )
        if code != 0:
            raise DemoFailed(f"{tool} {' '.join(args)} exited {code}: {err.decode()}")
        return out.decode()


async def _bounded(reactor: Any, d: Deferred[Any], seconds: float) -> None:
    """Wait for ``d`` at most ``seconds`` (then go on: the caller checks)."""
    from xenmig.clients.processes import fireOnce

    waiter: Deferred[None] = Deferred()
    d.addBoth(lambda _: fireOnce(waiter, None))
    call = reactor.callLater(seconds, fireOnce, waiter, None)
    await waiter
    if call.active():
        call.cancel()


def demoDevices(sizeMiB: int) -> list[DemoDevice]:
    """Every entry of the demo (some may not be available here)."""
    return [FileDemo(sizeMiB), VTPMDemo(), DiskDemo(sizeMiB)]


class DemoRun:
    """The whole demo, step by step, printing to ``out``."""

    def __init__(
        self,
        reactor: Any,
        out: TextIO,
        sizeMiB: int = 64,
        keep: bool = False,
        devices: list[DemoDevice] | None = None,
        wholeVM: bool = True,
    ) -> None:
        self.reactor = reactor
        self.out = out
        self.keep = keep
        self.devices = devices if devices is not None else demoDevices(sizeMiB)
        self.work = ""
        self.hosts: list[DemoHost] = []
        self.legs: list[Leg] = []
        self.wholeVM = wholeVM
        self.wholeVMReport: dict[str, Any] | None = None
        self.display = ProgressDisplay(reactor, out, out.isatty(), prefix="demo")

    def say(self, text: str) -> None:
        self.display.phase(text)

    def inThread(self, function: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), function, *args
        )

    async def run(self) -> int:
        """The demo; 0 if every migration committed and verified, else 1."""
        ok = False
        try:
            await self._run()
            ok = True
        except DemoFailed as e:
            self.say(f"FAILED: {e}")
        except Exception as e:
            self.say(f"FAILED: {type(e).__name__}: {e}")
        finally:
            self.display.stop()
            for device in self.devices:
                await device.cleanup()
            await self._stopDaemons()
            self._cleanUp(ok)
        return 0 if ok else 1

    async def _run(self) -> None:
        kinds = deviceKinds()
        chosen = []
        for device in self.devices:
            why = device.available(kinds)
            if why is None:
                chosen.append(device)
            else:
                self.say(f"leaving out {device.kind}: {why}")
        if not chosen:
            raise DemoFailed("no demo device can run on this machine")
        self.devices = chosen
        self.work = tempfile.mkdtemp(prefix="xenmig-demo-")
        self.say(f"workspace {self.work}")
        await self._makeHosts()
        for device in self.devices:
            self.say(f"device {device.kind}:{device.name}: {device.description}")
        first, second = self.hosts
        for leg in (Leg(1, first, second), Leg(2, second, first)):
            self.legs.append(leg)
            await self._migrate(leg)
        if self.wholeVM:
            await self._migrateWholeVM(kinds)
        await self._daemonViews()
        self._summary()

    async def _migrateWholeVM(self, kinds: dict[str, Any]) -> None:
        """
        One VM with a QEMU, a vTPM and a disk, A->B as a toolstack drives it
        (L{xenmig.demo.wholevm}): pause through QMP, transfer, commit, resume on B.
        """
        from xenmig.demo.wholevm import missingPrograms, runScenario

        absent = [k for k in ("devmodel", "vtpm", "disk") if k not in kinds]
        missing = missingPrograms()
        if absent or missing:
            why = ", ".join([f"kind {k}" for k in absent] + missing)
            self.say(f"leaving out the whole VM: needs {why}")
            return
        source, target = self.hosts
        self.say(
            f"whole VM {source.name} -> {target.name}: a QEMU guest counting in "
            f"memory, a swtpm (PCR 16 extended), a 16 MiB disk written during "
            f"pre-copy; paused through QMP, resumed on {target.name} by "
            f"'xenmig await --resume'"
        )
        outcome, seconds = await runScenario(
            self.reactor,
            source.clientTo(self.reactor, target),
            os.path.join(source.home, "wholevm"),
            target.root,
            target.stateDir,
            domain="demo-wholevm",
        )
        for line in outcome.checks:
            self.say(f"  verified {line}")
        self.wholeVMReport = outcome.report

    async def _makeHosts(self) -> None:
        pkiDir = os.path.join(self.work, "pki")
        await self.inThread(pki.initCA, pkiDir, "xenmig demo CA", 2)
        for name in ("hosta.test", "hostb.test"):
            await self.inThread(pki.issueHost, pkiDir, name, ["127.0.0.1"], 2)
            host = DemoHost(name, os.path.join(self.work, name), pkiDir)
            os.makedirs(host.root)
            self.hosts.append(host)
        self.say("made a throwaway CA and identities for hosta.test, hostb.test")
        for host, peer in zip(self.hosts, self.hosts[::-1], strict=True):
            await self._startDaemon(host, peer)

    async def _startDaemon(self, host: DemoHost, peer: DemoHost) -> None:
        host.port = freePort()
        options = [
            "--port",
            str(host.port),
            "--interface",
            "127.0.0.1",
            "--state-dir",
            host.stateDir,
            "--ca",
            os.path.join(host.pkiDir, pki.CA_CERTIFICATE),
            "--cert",
            host.cert,
            "--key",
            host.key,
            "--allow-root",
            host.root,
        ]
        log = os.path.join(host.home, "daemon.log")
        host.daemon = Daemon(self.reactor, f"daemon of {host.name}", options, log)
        probe = peer.clientTo(self.reactor, host, timeouts=ClientTimeouts(2, 2))
        await host.daemon.start(lambda: probe.listMigrations(1))
        self.say(
            f"twistd xenmig for {host.name} on 127.0.0.1:{host.port} "
            f"(pid {host.daemon.pid}) answers over mutual TLS"
        )

    async def _migrate(self, leg: Leg) -> None:
        source, target = leg.source, leg.target
        specs = [await device.setup(self, leg) for device in self.devices]
        client = source.clientTo(self.reactor, target)
        migration = SourceMigration(client, DOMAIN, f"demo-{leg.number}-{os.getpid()}")
        leg.migrationId = migration.migrationId
        self.say(f"leg {leg.number}: {source.name} -> {target.name}, {DOMAIN}")
        restored = Deferred.fromCoroutine(self._awaitRestored(target))
        try:
            await migration.prepare(specs)
            self.display.start(migration.progress)
            rounds = await migration.precopy()  # devices that can, "VM" running
            self.display.stop()
            for name, sent in rounds.items():
                self.say(f"  {name}: pre-copy rounds of {_sizes(sent)}")
            migration.paused()  # a real toolstack pauses the VM here
            self.display.start(migration.progress)
            await migration.transfer()
            self.display.stop()
            installed = await migration.commit()
        except Exception:
            self.display.stop()
            restored.cancel()
            raise
        leg.report = migration.report()
        self.say(f"leg {leg.number}: committed {leg.migrationId}")
        await self._checkTarget(leg, installed, await restored)
        for device in self.devices:
            leg.checks.append(await device.verify(self, leg, installed))
            self.say(f"  verified {leg.checks[-1]}")

    async def _awaitRestored(self, host: DemoHost) -> dict[str, Any]:
        from xenmig.toolstack.localcontrol import LocalControl

        return await LocalControl(self.reactor, host.stateDir).awaitRestored(
            DOMAIN, 120.0
        )

    async def _checkTarget(
        self, leg: Leg, installed: list[str], restored: dict[str, Any]
    ) -> None:
        """The target's own view: the resume gate fired, its status agrees."""
        from xenmig.toolstack.localcontrol import LocalControl

        target = leg.target
        if restored["migration_id"] != leg.migrationId or sorted(
            restored["installed"]
        ) != sorted(installed):
            raise DemoFailed(f"AwaitRestored on {target.name} answered {restored}")
        status = await LocalControl(self.reactor, target.stateDir).query(
            leg.migrationId
        )
        digests = {d["name"]: d["digest"] for d in status["devices"]}
        sent = {d["name"]: d["digest"] for d in leg.report["devices"]}
        if status["phase"] != "COMMITTED" or digests != sent:
            raise DemoFailed(
                f"{target.name} reports {status['phase']} with digests {digests}; "
                f"the source sent {sent}"
            )
        leg.checks.append(
            f"{target.name}: AwaitRestored fired, status COMMITTED, digests agree"
        )
        self.say(f"  verified {leg.checks[-1]}")

    def _summary(self) -> None:
        rows = [("leg", "device", "bytes", "data", "time", "rate", "digest")]
        for leg in self.legs:
            for device in leg.report["devices"]:
                seconds = device["seconds"] or 0.0
                rows.append(
                    (
                        f"{leg.number} {leg.source.name}->{leg.target.name}",
                        f"{device['kind']}:{device['name']}",
                        formatBytes(device["bytes"]),
                        formatBytes(device["data_bytes"]),
                        formatSeconds(seconds),
                        formatRate(device["bytes"] / seconds if seconds else 0.0),
                        (device["digest"] or "-")[:23] + "...",
                    )
                )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        self.out.write("\nsummary\n")
        for row in rows:
            cells = (c.ljust(w) for c, w in zip(row, widths, strict=True))
            self.out.write("  " + "  ".join(cells).rstrip() + "\n")
        for leg in self.legs:
            self.out.write(
                f"  leg {leg.number}: paused window "
                f"{formatSeconds(leg.report['paused_window'])}, total "
                f"{formatSeconds(leg.report['durations']['total'])}\n"
            )
        if self.wholeVMReport is not None:
            report = self.wholeVMReport
            devices = ", ".join(f"{d['kind']}:{d['name']}" for d in report["devices"])
            self.out.write(
                f"  whole VM ({devices}): paused window "
                f"{formatSeconds(report['paused_window'])}, total "
                f"{formatSeconds(report['durations']['total'])}\n"
            )
        self.out.write("all migrations committed and verified\n")
        self.out.flush()

    async def _daemonViews(self) -> None:
        """Each daemon's own list of what it received (``xenmig status``)."""
        from xenmig.toolstack.localcontrol import LocalControl

        for host in self.hosts:
            records = await LocalControl(self.reactor, host.stateDir).listMigrations()
            table = statusTable([MigrationStatus.fromJSON(r) for r in records])
            self.out.write(
                f"\n{host.name}: xenmig status --state-dir {host.stateDir}\n"
            )
            self.out.write("".join(f"  {line}\n" for line in table.splitlines()))
        self.out.flush()

    async def _stopDaemons(self) -> None:
        for host in self.hosts:
            if host.daemon is not None and host.daemon.child is not None:
                status = await host.daemon.stop(grace=5.0)
                how = {-15: "on SIGTERM", -9: "KILLED after the grace period"}
                ending = how.get(status, f"with status {status}")
                self.say(f"the daemon of {host.name} stopped {ending}")

    def _cleanUp(self, ok: bool) -> None:
        if not self.work:
            return
        if self.keep or not ok:
            self.say(f"kept {self.work} (daemon logs in each host's directory)")
            return
        shutil.rmtree(self.work, ignore_errors=True)
        self.say(f"removed {self.work}")


async def runDemo(
    reactor: Any, sizeMiB: int = 64, keep: bool = False, out: TextIO | None = None
) -> int:
    """``xenmig demo``: the exit status (0 only if everything verified)."""
    started = time.monotonic()
    demo = DemoRun(reactor, out or sys.stdout, sizeMiB, keep)
    code = await demo.run()
    demo.say(f"done in {formatSeconds(time.monotonic() - started)}")
    return code
