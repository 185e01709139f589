"""
A whole VM migrated as a toolstack would: QEMU, vTPM and disk behind one resume gate.

The VM is the counting test guest (L{xenmig.demo.testguest}) in a QEMU, a running swtpm
with PCR 16 extended, and a raw disk image that QEMU runs.  The guest's code does
not use the image: during pre-copy QEMU's block layer writes it (HMP ``qemu-io``),
standing in for the guest's writes, and the disk kind follows QEMU's dirty bitmap
(``qmp=``).
L{WholeVM} plays the source toolstack (prepare, pre-copy, pause through the QMP
domain control, transfer, commit, release; on failure abort and resume) and
starts ``xenmig await --resume`` as the target toolstack.  It records what the
test and ``xenmig demo`` check (L{xenmig.demo.guarantees}): the counter goes on
from where it stopped, the PCR and the disk arrive intact, and exactly one QEMU
runs at any time (from the run-state events of a second QMP monitor on each QEMU,
L{xenmig.demo.observedguest}).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.internet.utils import getProcessOutputAndValue

from xenmig.clients.processes import ChildProcess
from xenmig.demo import testguest
from xenmig.demo.guarantees import Outcome, verifyOutcome
from xenmig.demo.observedguest import GuestWriter, ObservedGuest, ScenarioFailed
from xenmig.digest import hashFile
from xenmig.errors import CommitInDoubt
from xenmig.model import DeviceSpec
from xenmig.source.client import MigrationClient
from xenmig.source.convergence import ConvergencePolicy
from xenmig.source.migration import SourceMigration
from xenmig.toolstack.domains import QMPDomainControl

MiB = 1024 * 1024
#: The programs the whole-VM scenario needs.
PROGRAMS = (testguest.QEMU, "swtpm", "tpm2_startup", "tpm2_pcrextend", "tpm2_pcrread")
#: The failure variants: the target QEMU refuses the state; the control
#: connection drops after the transfer, before the commit.
FAILURES = ("refuse", "drop")
DISK_SIZE = 16 * MiB
#: QEMU's block node names of the disk: its file, and the raw format above it.
DISK_FILE_NODE = "disk0-file"
DISK_NODE = "disk0"
#: The incoming QEMU's placeholder below that node, until the commit.
DISK_PLACEHOLDER = "disk0-placeholder"


def missingPrograms() -> list[str]:
    """The programs of L{PROGRAMS} not installed here."""
    return [p for p in PROGRAMS if shutil.which(p) is None]


class WholeVM:
    """
    One VM on a source "host" (``home``) and the slots a target toolstack made
    for it inside the target daemon's allowed root (``targetRoot``), migrated
    with ``client`` to the daemon whose state directory is ``targetStateDir``.
    ``failure`` picks a variant of L{FAILURES} (or None: it succeeds).
    """

    def __init__(
        self,
        reactor: Any,
        client: MigrationClient,
        home: str,
        targetRoot: str,
        targetStateDir: str,
        domain: str = "wholevm",
        failure: str | None = None,
    ) -> None:
        if failure not in (None, *FAILURES):
            raise ValueError(f"failure is one of {FAILURES}, not {failure!r}")
        self.reactor = reactor
        self.client = client
        self.home = home
        self.targetRoot = targetRoot
        self.targetStateDir = targetStateDir
        self.domain = domain
        self.failure = failure
        self.image = os.path.join(home, "guest.rom")
        self.disk = os.path.join(home, "disk0.raw")
        self.diskTarget = os.path.join(targetRoot, f"{domain}-disk0.raw")
        self.source: ObservedGuest | None = None
        self.target: ObservedGuest | None = None
        self.swtpms: list[Any] = []
        self.tpm: Any = None
        self.targetTpm: Any = None
        self.writer: GuestWriter | None = None
        self.awaiter: ChildProcess | None = None

    def inThread(self, function: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), function, *args
        )

    # -- the two hosts ---------------------------------------------------------------

    async def setUp(self) -> None:
        """Start the VM on the source and the empty slots on the target."""
        os.makedirs(self.home, exist_ok=True)
        testguest.writeGuestImage(self.image)
        targetImage = self.image
        if self.failure == "refuse":
            # The target toolstack starts QEMU with other firmware (128 KiB):
            # QEMU refuses the state ("Size mismatch: pc.bios ...").
            targetImage = os.path.join(self.home, "guest-128k.rom")
            with open(targetImage, "wb") as f:
                f.write(b"\xff" * 65536 + testguest.guestImage())
        if "," in self.disk:
            raise ScenarioFailed(f"QEMU cannot take a path with a comma: {self.disk}")
        await self.inThread(_writeDisk, self.disk, DISK_SIZE)
        disk = [
            "-blockdev",
            f"driver=file,filename={self.disk},node-name={DISK_FILE_NODE}",
            "-blockdev",
            f"driver=raw,file={DISK_FILE_NODE},node-name={DISK_NODE}",
        ]
        self.source = ObservedGuest(
            self.reactor, self.home, "source", self.image, extra=disk
        )
        await self.source.start()
        # The incoming QEMU gets the disk's node over a placeholder of the image's
        # size: the disk kind puts the installed image in its place at the commit.
        placeholder = [
            "-blockdev",
            f"driver=null-co,node-name={DISK_PLACEHOLDER},size={DISK_SIZE},"
            f"read-zeroes=on",
            "-blockdev",
            f"driver=raw,file={DISK_PLACEHOLDER},node-name={DISK_NODE}",
        ]
        self.target = ObservedGuest(
            self.reactor,
            self.targetRoot,
            f"{self.domain}-target",
            targetImage,
            True,
            extra=placeholder,
        )
        await self.target.start()
        await self._startTPMs()

    async def _startTPMs(self) -> None:
        from xenmig.clients.swtpmprocess import SwtpmProcess

        source = os.path.join(self.home, "tpm")
        target = os.path.join(self.targetRoot, f"{self.domain}-tpm")
        for directory in (source, target):
            os.makedirs(directory, exist_ok=True)
        self.tpm = SwtpmProcess(self.reactor, source)
        self.targetTpm = SwtpmProcess(self.reactor, target)  # no INIT: incoming
        for process in (self.tpm, self.targetTpm):
            self.swtpms.append(process)
            await process.start()
        await self.tpm.control.init()
        await self._tpm2(self.tpm, "tpm2_startup", "-c")
        await self._tpm2(self.tpm, "tpm2_pcrextend", "16:sha256=" + "5a" * 32)

    async def _tpm2(self, process: Any, tool: str, *args: str) -> str:
        env = dict(os.environ, TPM2TOOLS_TCTI=f"swtpm:path={process.serverPath}")
        out, err, code = await getProcessOutputAndValue(
            tool, args, env=env, reactor=self.reactor
        )
        if code != 0:
            raise ScenarioFailed(f"{tool} {' '.join(args)} exited {code}: {err!r}")
        return out.decode()

    def specs(self) -> list[DeviceSpec]:
        """The VM's three devices, as its toolstack names them."""
        assert self.source is not None and self.target is not None
        return [
            DeviceSpec.parse(
                f"devmodel:qemu:qmp={self.source.qmpPath},"
                f"target-qmp={self.target.qmpPath},target-log={self.target.logPath}"
            ),
            DeviceSpec.parse(
                f"vtpm:tpm0:ctrl={self.tpm.ctrlPath},target-ctrl={self.targetTpm.ctrlPath}"
            ),
            DeviceSpec.parse(
                f"disk:disk0:path={self.disk},target={self.diskTarget},format=raw,"
                f"qmp={self.source.qmpPath},target-qmp={self.target.qmpPath},"
                f"target-node={DISK_NODE}"
            ),
        ]

    async def tearDown(self) -> None:
        """End every process this scenario started."""
        if self.writer is not None:
            await self.writer.stop()
        if self.awaiter is not None:
            await self.awaiter.stop(self.reactor, grace=2.0)
        for guest in (self.source, self.target):
            if guest is not None:
                await guest.stop()
        for process in self.swtpms:
            await process.stop()

    # -- the migration ---------------------------------------------------------------

    async def migrate(self, migrationId: str | None = None) -> Outcome:
        """Migrate the VM as a toolstack would; what happened (see L{verify})."""
        assert self.source is not None and self.target is not None
        source = self.source
        migration = SourceMigration(
            self.client, self.domain, migrationId or f"{self.domain}-{os.getpid()}"
        )
        outcome = Outcome(migration.migrationId)
        control = QMPDomainControl(self.reactor, source.qmpPath)
        outcome.pcr = await self._tpm2(self.tpm, "tpm2_pcrread", "sha256:16")
        outcome.diskBefore = (await self.inThread(hashFile, self.disk)).hex
        await source.countsPast(0)
        await migration.prepare(self.specs())
        self.awaiter = self._awaitOnTarget(migration.migrationId)
        self.writer = GuestWriter(self.reactor, source, DISK_NODE, DISK_SIZE)
        await self.writer.start()
        try:
            await migration.precopy(ConvergencePolicy(maxRounds=3, threshold=0))
        finally:
            await self.writer.stop()  # the guest stops writing
        await control.pause()
        migration.paused()
        outcome.counterAtPause = await source.readCounter()
        outcome.diskAtPause = (await self.inThread(hashFile, self.disk)).hex
        try:
            await migration.transfer()
            outcome.counterLoaded = await self.target.readCounter()
            if self.failure == "drop":
                await self._dropControl(migration)
            await migration.commit()
            outcome.committed = True
        except CommitInDoubt:
            raise  # never resume here when the target may run the VM
        except Exception as e:
            outcome.reason = migration.reason or str(e)
            await control.resume()  # the source toolstack resumes its VM
        else:
            await control.release()  # the devmodel's release ended QEMU already
        outcome.report = migration.report()
        outcome.awaited = await self._awaited()
        await self._observeAfter(outcome)
        return outcome

    def _awaitOnTarget(self, migrationId: str) -> ChildProcess:
        """
        The target toolstack: ``xenmig await --resume`` through QMP, for this
        migration by its id (answered even if it ended before the question).
        """
        assert self.target is not None
        child = ChildProcess("xenmig await", keep=400)
        argv = [
            sys.executable, "-m", "xenmig.cli.main", "await",
            "--domain", self.domain, "--migration-id", migrationId,
            "--state-dir", self.targetStateDir,
            "--timeout", "60",
            "--resume", "--domain-control", f"qmp:{self.target.qmpPath}",
            "--json",
        ]  # fmt: skip
        self.reactor.spawnProcess(child, sys.executable, argv, env=dict(os.environ))
        return child

    async def _awaited(self) -> dict[str, Any]:
        assert self.awaiter is not None
        deadline = self.reactor.seconds() + 30
        while self.awaiter.status is None and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.02, lambda: None)
        if self.awaiter.status is None:
            await self.awaiter.stop(self.reactor)
            raise ScenarioFailed("xenmig await did not end within 30 s")
        text = b"\n".join(self.awaiter.output).decode(errors="replace")
        start, end = text.find("{"), text.rfind("}")
        try:
            answer = json.loads(text[start : end + 1])
        except ValueError:
            raise ScenarioFailed(f"xenmig await printed no JSON: {text!r}")
        answer["exit_status"] = self.awaiter.status
        return answer

    async def _dropControl(self, migration: SourceMigration) -> None:
        """Cut the control connection and wait until the target has aborted."""
        from xenmig.toolstack.localcontrol import LocalControl

        assert migration.control is not None
        migration.control.transport.abortConnection()  # type: ignore[union-attr]
        local = LocalControl(self.reactor, self.targetStateDir)
        deadline = self.reactor.seconds() + 10
        while (await local.query(migration.migrationId))["phase"] != "ABORTED":
            if self.reactor.seconds() > deadline:
                raise ScenarioFailed("the target did not abort on the dropped control")
            await deferLater(self.reactor, 0.02, lambda: None)

    async def _observeAfter(self, outcome: Outcome) -> None:
        assert self.source is not None and self.target is not None
        if outcome.committed:
            await self.source.whenEnded()
            outcome.counterAfter = await self.target.countsPast(outcome.counterAtPause)
            outcome.pcrAfter = await self._tpm2(
                self.targetTpm, "tpm2_pcrread", "sha256:16"
            )
            if os.path.exists(self.diskTarget):
                outcome.diskInstalled = (
                    await self.inThread(hashFile, self.diskTarget)
                ).hex
                await self._writeOnTarget(outcome)
        else:
            outcome.counterAfter = await self.source.countsPast(outcome.counterAtPause)
            outcome.pcrAfter = await self._tpm2(self.tpm, "tpm2_pcrread", "sha256:16")
            outcome.bitmapsAfter = await self.source.dirtyBitmaps()
            await self.target.whenEnded()

    async def _writeOnTarget(self, outcome: Outcome) -> None:
        """Which file the target's disk node opens; a write there reaches it."""
        observer = self.target.observer if self.target else None
        assert observer is not None
        nodes = await observer.execute("query-named-block-nodes", {"flat": True})
        outcome.diskAttached = next(
            (n["file"] for n in nodes if n["node-name"] == DISK_NODE), ""
        )
        await testguest.writeThroughQEMU(observer, DISK_NODE, 0, 4096, 0x5C)
        await observer.execute(
            "human-monitor-command", {"command-line": f'qemu-io {DISK_NODE} "flush"'}
        )
        head = await self.inThread(_readHead, self.diskTarget, 4096)
        outcome.writeAfterLanded = head == b"\x5c" * 4096

    def verify(self, outcome: Outcome) -> list[str]:
        """
        Check the outcome against what a whole-VM migration must guarantee
        (L{verifyOutcome}); one line per check.

        @raise ScenarioFailed: naming the first guarantee broken.
        """
        assert self.source is not None and self.target is not None
        return verifyOutcome(
            outcome, self.source, self.target, self.tpm, self.diskTarget
        )


def _readHead(path: str, length: int) -> bytes:
    """Blocking: the first ``length`` bytes of the file at ``path``."""
    with open(path, "rb") as f:
        return f.read(length)


def _writeDisk(path: str, size: int) -> None:
    """Blocking: a sparse raw image, random data in its first half."""
    with open(path, "wb") as f:
        f.write(os.urandom(size // 2))
        f.truncate(size)


async def runScenario(
    reactor: Any,
    client: MigrationClient,
    home: str,
    targetRoot: str,
    targetStateDir: str,
    domain: str = "wholevm",
    failure: str | None = None,
) -> tuple[Outcome, float]:
    """Set up, migrate, verify, tear down; the outcome and the seconds it took."""
    started = time.monotonic()
    vm = WholeVM(reactor, client, home, targetRoot, targetStateDir, domain, failure)
    try:
        await vm.setUp()
        outcome = await vm.migrate()
        vm.verify(outcome)
    finally:
        await vm.tearDown()
    return outcome, time.monotonic() - started
