"""
The kinds of state the demo migrates: a L{DemoDevice} per kind (file, disk, vTPM).

Each entry makes the source state on the source host (``setup``, per leg),
names the device (its spec), and verifies what the target installed
(``verify``, raising L{DemoFailed}).  A kind joins the demo by adding an entry
to L{demoDevices}; an entry runs only where its kind is installed
(L{xenmig.plugins.deviceKinds}) and its programs exist.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from xenmig.demo.hosts import Leg
from xenmig.digest import hashFile
from xenmig.model import DeviceSpec
from xenmig.toolstack.progress import formatBytes


class DemoRun(Protocol):
    """What a demo device uses of the run: the reactor and its thread pool."""

    reactor: Any

    def inThread(self, function: Any, *args: Any) -> Deferred[Any]:
        """Run blocking ``function`` in the run's thread pool."""


MiB = 1024 * 1024


class DemoFailed(Exception):
    """A step of the demo failed or a result did not verify."""


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
