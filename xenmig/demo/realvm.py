"""
A real Linux guest (L{linuxguest}) migrated whole, as a QEMU toolstack would.

The source QEMU runs the guest on an ext4 disk (virtio-blk) with QEMU's
``tpm-tis`` on a swtpm; each incoming QEMU is started with ``-incoming defer``,
its own fresh swtpm and a ``null-co`` placeholder below the disk's node, which
the disk kind replaces with the installed image at the commit
(``target-qmp``/``target-node``).  The QEMU owns its TPM, so the TPM's state
travels in QEMU's stream: the migration's devices are ``devmodel`` and
``disk``.  What the guest says on its serial console (a socket per QEMU), and
the run-state events of a second QMP monitor on each QEMU, are recorded for
the checks.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool

from xenmig.clients.processes import ChildProcess
from xenmig.demo import linuxguest
from xenmig.demo.console import Console, connectConsole
from xenmig.demo.observedguest import ObservedGuest, ScenarioFailed
from xenmig.demo.testguest import tcgRAM
from xenmig.errors import CommitInDoubt
from xenmig.interfaces import IConvergencePolicy
from xenmig.model import DeviceSpec, RoundResult
from xenmig.source.client import MigrationClient
from xenmig.source.convergence import ConvergencePolicy
from xenmig.source.migration import SourceMigration
from xenmig.toolstack.domains import QMPDomainControl

MEMORY_MIB = 256
DISK_MIB = 64
DISK_NODE = "vda"
PLACEHOLDER = "vda-placeholder"
#: Seconds the guest may take to boot to its workload under TCG.
BOOT_TIMEOUT = 90.0


class LinuxQEMU(ObservedGuest):
    """The Linux guest's QEMU, observed (L{ObservedGuest}), with its console."""

    def __init__(
        self,
        reactor: Any,
        directory: str,
        name: str,
        files: dict[str, str],
        incoming: bool,
        disk: list[str],
        tpmSocket: str,
        memoryMiB: int = MEMORY_MIB,
    ) -> None:
        super().__init__(reactor, directory, name, "", incoming, disk)
        self.memoryMiB = memoryMiB
        self.files = files
        self.tpmSocket = tpmSocket
        self.consolePath = os.path.join(directory, f"{name}.console")
        self.console = Console()

    def command(self) -> list[str]:
        command = [
            "qemu-system-x86_64", "-machine", "pc,accel=tcg",
            "-m", tcgRAM(self.memoryMiB), "-smp", "1", "-nodefaults",
            "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", self.files["kernel"],
            "-initrd", self.files["initrd"],
            "-append", "console=ttyS0 quiet panic=-1",
            "-chardev", f"socket,id=ser0,path={self.consolePath},server=on,"
                        f"wait=off,logfile={self.consolePath}.log",
            "-serial", "chardev:ser0",
            "-chardev", f"socket,id=chrtpm,path={self.tpmSocket}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-tis,tpmdev=tpm0",
            *self.extra, "-device", f"virtio-blk-pci,drive={DISK_NODE},id=vda",
            "-qmp", f"unix:{self.qmpPath},server=on,wait=off",
            "-qmp", f"unix:{self.observerPath},server=on,wait=off",
        ]  # fmt: skip
        if self.incoming:
            command += ["-S", "-incoming", "defer"]
        return command

    async def start(self, timeout: float = 10.0) -> LinuxQEMU:
        await super().start(timeout)
        await connectConsole(self.reactor, self.consolePath, self.console)
        return self

    def type(self, line: str) -> None:
        """Type ``line`` on the guest's console."""
        assert self.console.transport is not None
        self.console.transport.write(line.encode() + b"\n")

    async def says(self, word: str, timeout: float, count: int = 1) -> list[str]:
        """Wait until the guest said ``XM word`` ``count`` times; what it said."""
        deadline = self.reactor.seconds() + timeout
        reread = False
        while len(said := self.console.said(word)) < count:
            if not self.running and not reread:
                # Its last words may still be on the way: read to the end, then
                # take QEMU's own log of the console (its last lines were seen
                # missing from the socket once QEMU had exited).
                await self.console.whenClosed(self.reactor, 2.0)
                self.console.reread(self.consolePath + ".log")
                reread = True
                continue
            if not self.running:
                ended = self.process.ended.value if self.process.ended else None
                raise ScenarioFailed(
                    f"QEMU {self.name} exited ({ended}) while waiting for {word}: "
                    f"{self.log()} (its console's last lines: "
                    f"{' | '.join(self.console.tail)}; QEMU's log of it ends "
                    f"{_tail(self.consolePath + '.log')!r})"
                )
            failed = self.console.said("FAIL")
            if failed:
                raise ScenarioFailed(f"the guest in {self.name} failed: {failed}")
            if self.reactor.seconds() > deadline:
                raise ScenarioFailed(
                    f"the guest in {self.name} did not say {word} within "
                    f"{timeout:g} s (it said {self.console.lines[-5:]})"
                )
            await deferLater(self.reactor, 0.05, lambda: None)
        return said


@dataclass
class Move:
    """What one attempt to move the guest did."""

    migrationId: str
    tag: str = ""
    committed: bool = False
    reason: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    awaited: dict[str, Any] = field(default_factory=dict)
    pcrBefore: str = ""
    #: The last record the source guest said it fsynced before its pause.
    syncAtPause: int = 0
    target: LinuxQEMU | None = None


class KillDuringPrecopy:
    """A convergence policy that calls ``kill`` after the first round."""

    def __init__(self, kill: Any) -> None:
        self.kill = kill
        self.killed = False

    def proceed(self, round: int, result: RoundResult) -> bool:
        if not self.killed:
            self.killed = True
            self.kill()
        return round < 5


class RealVM:
    """
    The Linux guest on a source "host" (``home``), moved into slots inside the
    target daemon's allowed root (``targetRoot``) with ``client``.
    """

    def __init__(
        self,
        reactor: Any,
        client: MigrationClient,
        home: str,
        targetRoot: str,
        targetStateDir: str,
        domain: str = "realvm",
        dirtyMiB: int = 8,
        dirtyPause: float = 0.2,
        memoryMiB: int = MEMORY_MIB,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.home = home
        self.targetRoot = targetRoot
        self.targetStateDir = targetStateDir
        self.domain = domain
        self.dirtyMiB = dirtyMiB
        self.dirtyPause = dirtyPause
        self.memoryMiB = memoryMiB
        self.image = os.path.join(home, "vda.raw")
        self.files: dict[str, str] = {}
        self.sourceDisk: list[str] = []
        self.source: LinuxQEMU | None = None
        self.guests: list[LinuxQEMU] = []
        self.children: list[ChildProcess] = []
        #: QEMU's downtime-limit for the move, in ms (0: QEMU's own setting).
        self.downtime = 0

    def inThread(self, function: Any, *args: Any) -> Deferred[Any]:
        pool = self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, function, *args)

    async def setUp(self) -> LinuxQEMU:
        """Build the guest and boot it on the source, until its workload runs."""
        found = linuxguest.kernel()
        if found is None:
            raise ScenarioFailed("no kernel under /boot: install linux-image-amd64")
        kernel, modules = found
        initrd = os.path.join(self.home, "initrd.gz")
        await self.inThread(
            linuxguest.buildInitramfs, initrd, modules, self.dirtyMiB, self.dirtyPause
        )
        await self.inThread(linuxguest.makeDisk, self.image, DISK_MIB)
        self.files = {"kernel": kernel, "initrd": initrd}
        disk = [
            "-blockdev", f"driver=file,node-name=vda-file,filename={self.image}",
            "-blockdev", f"driver=raw,node-name={DISK_NODE},file=vda-file",
        ]  # fmt: skip
        self.sourceDisk = disk
        self.source = await self.startQEMU(self.home, "source", False, disk)
        await self.source.says("START", BOOT_TIMEOUT)
        return self.source

    async def startQEMU(
        self, directory: str, name: str, incoming: bool, disk: list[str]
    ) -> LinuxQEMU:
        tpm = os.path.join(directory, f"{name}-tpm")
        os.makedirs(tpm, exist_ok=True)
        socket = os.path.join(tpm, "ctrl.sock")
        swtpm = ChildProcess(f"swtpm {name}")
        argv = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={tpm}",
                "--ctrl", f"type=unixio,path={socket}"]  # fmt: skip
        self.reactor.spawnProcess(swtpm, "swtpm", argv, env=dict(os.environ))
        self.children.append(swtpm)
        deadline = self.reactor.seconds() + 10
        while not os.path.exists(socket):
            if swtpm.status is not None or self.reactor.seconds() > deadline:
                raise ScenarioFailed(f"swtpm for {name} did not start: {swtpm.output}")
            await deferLater(self.reactor, 0.02, lambda: None)
        guest = LinuxQEMU(
            self.reactor,
            directory,
            name,
            self.files,
            incoming,
            disk,
            socket,
            self.memoryMiB,
        )
        self.guests.append(guest)
        await guest.start()
        return guest

    async def incoming(self, tag: str) -> LinuxQEMU:
        """A target toolstack's incoming QEMU, with a placeholder for the disk."""
        size = DISK_MIB * 1024 * 1024
        disk = [
            "-blockdev", f"driver=null-co,node-name={PLACEHOLDER},size={size},"
                         f"read-zeroes=on",
            "-blockdev", f"driver=raw,node-name={DISK_NODE},file={PLACEHOLDER}",
        ]  # fmt: skip
        return await self.startQEMU(self.targetRoot, f"{self.domain}-{tag}", True, disk)

    def targetImage(self, tag: str) -> str:
        return os.path.join(self.targetRoot, f"{self.domain}-{tag}-vda.raw")

    def specs(self, target: LinuxQEMU, tag: str) -> list[DeviceSpec]:
        assert self.source is not None
        source = self.source
        return [
            DeviceSpec.parse(
                f"devmodel:qemu:qmp={source.qmpPath},target-qmp={target.qmpPath},"
                f"target-log={target.logPath}"
                + (f",downtime={self.downtime}" if self.downtime else "")
            ),
            DeviceSpec.parse(
                f"disk:vda:path={self.image},target={self.targetImage(tag)},"
                f"format=raw,qmp={source.qmpPath},target-qmp={target.qmpPath},"
                f"target-node={DISK_NODE}"
            ),
        ]

    async def move(
        self,
        tag: str,
        policy: IConvergencePolicy | None = None,
        beforeCommit: Any = None,
    ) -> Move:
        """
        Migrate the guest to a new incoming QEMU; on any failure before the
        commit, resume it on the source.  ``beforeCommit(target)``, if given,
        runs between the transfer and the commit.
        """
        assert self.source is not None
        source = self.source
        target = await self.incoming(tag)
        migration = SourceMigration(
            self.client, self.domain, f"{self.domain}-{tag}-{os.getpid()}"
        )
        move = Move(migration.migrationId, tag, target=target)
        move.pcrBefore = (await source.says("PCR16", 30))[-1]
        control = QMPDomainControl(self.reactor, source.qmpPath)
        awaiter: ChildProcess | None = None
        drained: Deferred[int] | None = None
        try:
            await migration.prepare(self.specs(target, tag))
            awaiter = self._awaitOnTarget(migration.migrationId, target)
            await migration.precopy(
                policy or ConvergencePolicy(maxRounds=3, threshold=0)
            )
            await control.pause()
            migration.paused()
            drained = self._lastSync(source)
            await migration.transfer()
            if beforeCommit is not None:
                await beforeCommit(target)
            await migration.commit()
            move.committed = True
        except CommitInDoubt:
            raise  # never resume here when the target may run the VM
        except Exception as e:
            move.reason = migration.reason or str(e)
            if drained is not None:
                move.syncAtPause = await drained  # before the guest says more
                await control.resume()  # the source toolstack resumes its VM
        else:
            await control.release()
        if drained is not None and move.committed:
            move.syncAtPause = await drained
        move.report = migration.report()
        if awaiter is not None:
            move.awaited = await self._awaited(awaiter)
        return move

    def _lastSync(self, source: LinuxQEMU) -> Deferred[int]:
        """
        The last record the paused guest said it fsynced, once its console had
        0.3 s to bring in what the guest said before the pause.  The paused
        guest says nothing new, so this waits beside the migration, not in its
        paused window.
        """

        def last() -> int:
            return max(source.console.syncs, default=0)

        return deferLater(self.reactor, 0.3, last)

    def _awaitOnTarget(self, migrationId: str, target: LinuxQEMU) -> ChildProcess:
        """The target toolstack: ``xenmig await --resume`` through QMP."""
        child = ChildProcess("xenmig await", keep=400)
        argv = [
            sys.executable, "-m", "xenmig.cli.main", "await",
            "--domain", self.domain, "--migration-id", migrationId,
            "--state-dir", self.targetStateDir, "--timeout", "120",
            "--resume", "--domain-control", f"qmp:{target.qmpPath}", "--json",
        ]  # fmt: skip
        self.reactor.spawnProcess(child, sys.executable, argv, env=dict(os.environ))
        self.children.append(child)
        return child

    async def _awaited(self, child: ChildProcess) -> dict[str, Any]:
        import json

        deadline = self.reactor.seconds() + 30
        while child.status is None and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05, lambda: None)
        text = b"\n".join(child.output).decode(errors="replace")
        start, end = text.find("{"), text.rfind("}")
        try:
            answer: dict[str, Any] = json.loads(text[start : end + 1])
        except ValueError:
            return {"output": text, "exit_status": child.status}
        answer["exit_status"] = child.status
        return answer

    async def shutDown(self, guest: LinuxQEMU, timeout: float = 60.0) -> int:
        """Stop the guest's workload and let it power off; its last record."""
        guest.type("stop")
        done = await guest.says("DONE", timeout)
        if not await guest.whenEnded(timeout):
            raise ScenarioFailed(f"QEMU {guest.name} did not exit after power-off")
        number = re.match(r"\d+", done[-1])
        if number is None:
            raise ScenarioFailed(f"the guest in {guest.name} said DONE {done[-1]!r}")
        return int(number[0])

    async def tearDown(self) -> None:
        """End every process this scenario started."""
        for guest in self.guests:
            if guest.console.transport is not None:
                guest.console.transport.loseConnection()
            await guest.stop()
        for child in self.children:
            await child.stop(self.reactor, grace=2.0)


def _tail(path: str, size: int = 600) -> str:
    """Blocking (a small file): the end of the file at ``path``."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
