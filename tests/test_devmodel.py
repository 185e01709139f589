"""The ``devmodel`` device kind: a real QEMU's state through QMP, handler to daemons."""

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
from daemons import PKI, Daemon, settled
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from zope.interface import implementer
from zope.interface.verify import verifyObject

from xenmig.clients.qmpclient import connectQMP
from xenmig.demo import testguest
from xenmig.demo.observedguest import ObservedGuest
from xenmig.devices.devmodel.kind import DevmodelKind, devmodelKind
from xenmig.devices.devmodel.source import DevmodelSource
from xenmig.devices.devmodel.target import DevmodelTarget
from xenmig.digest import hashBytes, hashFile
from xenmig.errors import (
    BadSpec,
    DeviceError,
    DeviceRefused,
    DigestMismatch,
    PathNotAllowed,
    StreamError,
)
from xenmig.interfaces import IDeviceKind, IRecordWriter, ISourceDevice, ITargetDevice
from xenmig.model import DeviceDescription, DeviceSpec
from xenmig.source.migration import SourceMigration
from xenmig.testing import (
    FakeSourceContext,
    FakeTargetContext,
    PipeWriter,
    requirePrograms,
)
from xenmig.toolstack.domains import QMPDomainControl

# -- without QEMU ----------------------------------------------------------------------


def source(text: str) -> DevmodelSource:
    return devmodelKind.source(DeviceSpec.parse(text), FakeSourceContext(reactor))


@pytest.mark.parametrize(
    "text, message",
    [
        ("devmodel:q:target-qmp=/t.qmp", "needs qmp=PATH"),
        ("devmodel:q:qmp=/s.qmp", "exactly one of target-qmp"),
        ("devmodel:q:qmp=/s,target-qmp=/t,target-statefile=/f", "exactly one"),
        ("devmodel:q:qmp=/s,target-qmp=/t,colour=red", "unknown parameter(s) colour"),
        ("devmodel:q:qmp=/s,target-qmp=/t,target-x=1", "unknown parameter(s) target-x"),
        ("devmodel:q:qmp=/s,target-qmp=/t,release=maybe", "release= is 'quit'"),
        ("devmodel:q:qmp=/s,target-qmp=/t,timeout=never", "not a number of seconds"),
    ],
)
def test_sourceSpecChecked(text: str, message: str) -> None:
    """A source spec that cannot work is refused before anything is contacted."""
    with pytest.raises(BadSpec, match=message.replace("(", r"\(").replace(")", r"\)")):
        source(text)


def test_xenModeKeepsTheDeviceModel() -> None:
    """xen=1 leaves the device model to the toolstack after the commit."""
    assert source("devmodel:q:qmp=/s,xen=1,target-statefile=f").releaseMode == "keep"
    assert source("devmodel:q:qmp=/s,target-statefile=f").releaseMode == "quit"


def description(**params: Any) -> DeviceDescription:
    base = {"mode": "migrate", "format": 1, "max_size": 1 << 30, **params}
    return DeviceDescription("devmodel", "qemu", 1 << 24, base)


def test_targetPathsStayInsideTheRoots(tmp_path: Path) -> None:
    """The QMP socket, the log and the state file the source names must be allowed."""
    context = FakeTargetContext(reactor, [str(tmp_path)])
    try:
        for params in (
            {"target-qmp": "/run/elsewhere/t.qmp"},
            {"target-qmp": "t.qmp", "target-log": "/var/log/secret"},
            {"target-statefile": "../escape.state"},
        ):
            with pytest.raises(PathNotAllowed):
                DevmodelTarget(description(**params), context)
        with pytest.raises(BadSpec, match="max_size"):
            DevmodelTarget(
                description(**{"target-qmp": "t.qmp", "max_size": 0}), context
            )
        target = DevmodelTarget(description(**{"target-qmp": "t.qmp"}), context)
        assert target.qmpPath == str(tmp_path / "t.qmp")
    finally:
        context.cleanup()


def test_implementations(tmp_path: Path) -> None:
    """The kind and both sides provide their interfaces."""
    context = FakeTargetContext(reactor, [str(tmp_path)])
    assert verifyObject(IDeviceKind, DevmodelKind())
    assert verifyObject(ISourceDevice, source("devmodel:q:qmp=/s,target-qmp=t"))
    target = DevmodelTarget(description(**{"target-statefile": "vm.state"}), context)
    assert verifyObject(ITargetDevice, target)
    context.cleanup()


# -- with a real QEMU, handler to handler ---------------------------------------------


@pytest.fixture
def workdir() -> Iterator[str]:
    # Short: unix socket paths must stay under 108 bytes.
    path = tempfile.mkdtemp(prefix="xm-dm-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Guests:
    """Counting guests in a directory; every one ended afterwards."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.image = os.path.join(directory, "guest.rom")
        testguest.writeGuestImage(self.image)
        self.started: list[ObservedGuest] = []

    async def start(
        self,
        name: str,
        incoming: bool = False,
        extra: tuple[str, ...] = (),
        image: str | None = None,
        directory: str | None = None,
    ) -> ObservedGuest:
        guest = ObservedGuest(
            reactor,
            directory or self.directory,
            name,
            image or self.image,
            incoming,
            extra,
        )
        self.started.append(guest)
        return await guest.start()

    async def endAll(self) -> None:
        for guest in self.started:
            await guest.stop()


@pytest_twisted.async_yield_fixture
async def guests(workdir: str) -> Any:
    requirePrograms(testguest.QEMU)
    before = set(reactor.getReaders()) | set(reactor.getWriters())
    pool = Guests(workdir)
    yield pool
    await pool.endAll()
    await settled(reactor)  # no connection, socket or timer left behind
    assert set(reactor.getReaders()) | set(reactor.getWriters()) <= before


def contexts(workdir: str) -> tuple[FakeSourceContext, FakeTargetContext]:
    staging = os.path.join(workdir, "staging")
    return FakeSourceContext(reactor), FakeTargetContext(reactor, [workdir], staging)


async def pair(
    workdir: str, sourceGuest: ObservedGuest, **target: str
) -> tuple[DevmodelSource, DevmodelTarget]:
    """A source device and an accepted target device, as the framework builds them."""
    sourceContext, targetContext = contexts(workdir)
    extra = "".join(f",{k}={v}" for k, v in target.items())
    spec = DeviceSpec.parse(f"devmodel:qemu:qmp={sourceGuest.qmpPath}{extra}")
    device = devmodelKind.source(spec, sourceContext)
    described = await device.describe()
    full = DeviceDescription(
        described.kind,
        described.name,
        described.size,
        {**spec.targetParams, **described.params},
    )
    receiver = devmodelKind.target(full, targetContext)
    device.accepted(await receiver.accept())
    return device, receiver


async def pause(guest: ObservedGuest) -> int:
    """Stop the guest as its toolstack would; its counter then."""
    await QMPDomainControl(reactor, guest.qmpPath).pause()
    return await guest.readCounter()


@pytest_twisted.ensureDeferred
async def test_stateFlowsIntoAWaitingQEMU(guests: Guests, workdir: str) -> None:
    """The stopped source's state loads into the -incoming QEMU: it counts on."""
    running = await guests.start("src")
    waiting = await guests.start("dst", incoming=True)
    device, receiver = await pair(workdir, running, **{"target-qmp": waiting.qmpPath})
    await running.countsPast(100)
    atPause = await pause(running)
    writer = PipeWriter(receiver)
    digest = await device.sendFinal(writer)
    assert digest.size > 64 * 1024 and writer.dataBytes == digest.size
    assert await writer.finish(digest) == digest  # verified, then loaded
    assert await waiting.status() == "paused"
    assert await waiting.readCounter() == atPause
    [installed] = await receiver.commit()
    assert "holds the state, paused" in installed
    assert waiting.first("RESUME") is None  # nothing ran it before the toolstack
    await QMPDomainControl(reactor, waiting.qmpPath).resume()
    await waiting.countsPast(atPause)
    await device.release()
    assert await running.whenEnded()
    assert os.listdir(os.path.join(workdir, "staging")) == []


@implementer(IRecordWriter)
class HeldWriter:
    """Keeps every write waiting a moment; counts how many wait at once."""

    def __init__(self) -> None:
        self.bytesWritten = 0
        self.data = bytearray()
        self.waiting = 0
        self.mostWaiting = 0

    def writeData(self, offset: int, data: bytes) -> Deferred[None]:
        assert offset == len(self.data)
        self.data += data
        self.bytesWritten += len(data)
        self.waiting += 1
        self.mostWaiting = max(self.mostWaiting, self.waiting)

        def done(_: object) -> None:
            self.waiting -= 1

        return deferLater(reactor, 0.001, lambda: None).addCallback(done)

    def writeZero(self, offset: int, length: int) -> Deferred[None]:
        raise AssertionError("QEMU's stream has no holes")

    def writeMetadata(self, metadata: dict[str, Any]) -> Deferred[None]:
        return succeed(None)


def randomRAM(workdir: str) -> tuple[str, ...]:
    """QEMU options giving the guest 16 MiB of random RAM: a 16 MiB state stream."""
    path = os.path.join(workdir, "ram.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(16 * 1024 * 1024))
        f.truncate(testguest.tcgRAMBytes(16))
        # The counter reads 0 until the guest's first store, not a random count
        # that a test waiting for it to pass a value would take as counted.
        f.seek(testguest.COUNTER_ADDRESS)
        f.write(bytes(4))
    return (
        "-object",
        f"memory-backend-file,id=pc.ram,size={testguest.tcgRAM(16)},mem-path={path},"
        "share=off",
        "-machine",
        "memory-backend=pc.ram",
    )


@pytest_twisted.ensureDeferred
async def test_readingWaitsForTheWriter(guests: Guests, workdir: str) -> None:
    """While a write is pending the socket is not read: one write waits at a time."""
    running = await guests.start("src", extra=randomRAM(workdir))
    device, receiver = await pair(workdir, running, **{"target-statefile": "s"})
    await pause(running)
    writer = HeldWriter()
    digest = await device.sendFinal(writer)
    assert writer.mostWaiting == 1
    assert digest == hashBytes(bytes(writer.data))
    assert digest.size > 16 * 1024 * 1024
    assert bytes(writer.data[:4]) == b"QEVM"
    await receiver.abort()


@implementer(IRecordWriter)
class FailingWriter(HeldWriter):
    """A stream that is lost after ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def writeData(self, offset: int, data: bytes) -> Deferred[None]:
        if self.bytesWritten + len(data) > self.limit:
            failed: Deferred[None] = Deferred()
            failed.errback(StreamError("the stream of device qemu was lost"))
            return failed
        return super().writeData(offset, data)


@pytest_twisted.ensureDeferred
async def test_lostStreamEndsQEMUsMigration(guests: Guests, workdir: str) -> None:
    """A lost stream fails the send with its own reason; QEMU stays resumable."""
    running = await guests.start("src", extra=randomRAM(workdir))
    device, receiver = await pair(workdir, running, **{"target-statefile": "s"})
    atPause = await pause(running)
    with pytest.raises(StreamError, match="the stream of device qemu was lost"):
        await device.sendFinal(FailingWriter(100 * 1024))
    await device.rollback()
    await receiver.abort()
    client = await connectQMP(reactor, running.qmpPath)
    try:
        info = await client.execute("query-migrate")
    finally:
        await client.close()
    assert info["status"] in ("failed", "cancelled")
    assert await running.status() == "paused"
    await QMPDomainControl(reactor, running.qmpPath).resume()
    await running.countsPast(atPause)


@pytest_twisted.ensureDeferred
async def test_abortAfterTheStateLeftResumes(guests: Guests, workdir: str) -> None:
    """After a complete send and an abort, 'cont' resumes the source where it was."""
    running = await guests.start("src")
    device, receiver = await pair(workdir, running, **{"target-statefile": "s"})
    atPause = await pause(running)
    writer = PipeWriter(receiver)
    await writer.finish(await device.sendFinal(writer))
    await receiver.abort()
    await device.rollback()
    assert await running.status() == "postmigrate"
    await QMPDomainControl(reactor, running.qmpPath).resume()
    assert await running.countsPast(atPause) > atPause
    assert not os.path.exists(os.path.join(workdir, "s"))


@pytest_twisted.ensureDeferred
async def test_runningVMIsNotSent(guests: Guests, workdir: str) -> None:
    """The final state of a VM still running is refused: the toolstack pauses it."""
    running = await guests.start("src")
    device, receiver = await pair(workdir, running, **{"target-statefile": "s"})
    with pytest.raises(DeviceError, match="is running; pause it"):
        await device.sendFinal(PipeWriter(receiver))
    await device.rollback()
    await receiver.abort()
    assert await running.status() == "running"


@pytest_twisted.ensureDeferred
async def test_targetRefusedAtPrepare(guests: Guests, workdir: str) -> None:
    """A target QEMU that cannot take the state is refused before the VM pauses."""
    running = await guests.start("src")
    bigger = await guests.start("big", incoming=True, extra=("-m", "32"))
    with pytest.raises(DeviceRefused, match="RAM, the source 16785408: start it"):
        await pair(workdir, running, **{"target-qmp": bigger.qmpPath})
    other = await guests.start("other")  # running, not -incoming defer
    with pytest.raises(DeviceRefused, match="is 'running', not waiting"):
        await pair(workdir, running, **{"target-qmp": other.qmpPath})
    missing = os.path.join(workdir, "none.qmp")
    with pytest.raises(DeviceRefused, match="no QMP socket at"):
        await pair(workdir, running, **{"target-qmp": missing})
    assert await running.status() == "running"


@pytest_twisted.ensureDeferred
async def test_loadRefusalQuotesQEMU(guests: Guests, workdir: str) -> None:
    """A state QEMU refuses fails the device with QEMU's own words; QEMU is gone."""
    running = await guests.start("src")
    firmware = os.path.join(workdir, "guest-128k.rom")
    with open(firmware, "wb") as f:
        f.write(b"\xff" * 65536 + testguest.guestImage())
    waiting = await guests.start("dst", incoming=True, image=firmware)
    device, receiver = await pair(
        workdir,
        running,
        **{"target-qmp": waiting.qmpPath, "target-log": waiting.logPath},
    )
    await pause(running)
    writer = PipeWriter(receiver)
    with pytest.raises(DeviceError) as caught:
        # QEMU loads as the state arrives: it refuses while reading, or at the end.
        digest = await device.sendFinal(writer)
        await writer.finish(digest)
    message = str(caught.value)
    assert message.startswith(
        f"devmodel device qemu: the target QEMU at {waiting.qmpPath} refused the "
        f"state: qemu-system-x86_64: Size mismatch: pc.bios: 0x10000 != 0x20000"
    )
    assert "load of migration failed: Invalid argument" in message
    await receiver.abort()
    await device.rollback()
    assert await waiting.whenEnded()
    assert waiting.first("RESUME") is None


@pytest_twisted.ensureDeferred
async def test_damagedStateNeverRuns(guests: Guests, workdir: str) -> None:
    """A state whose digest differs from the source's fails; its QEMU never runs."""
    running = await guests.start("src")
    waiting = await guests.start("dst", incoming=True)
    device, receiver = await pair(workdir, running, **{"target-qmp": waiting.qmpPath})
    await pause(running)
    writer = SpoilingWriter(receiver)
    digest = await device.sendFinal(writer)
    assert writer.spoilt  # a byte of firmware filler, which QEMU loads unnoticed
    with pytest.raises(DigestMismatch, match="that QEMU will not run"):
        await writer.finish(digest)
    await receiver.abort()
    assert await waiting.whenEnded()  # quit: it held a state that must not run
    assert waiting.first("RESUME") is None


class SpoilingWriter(PipeWriter):
    """Flips one byte of the first run of 0xff filler it carries."""

    spoilt = False

    def writeData(self, offset: int, data: bytes) -> Deferred[None]:
        where = data.find(b"\xff" * 64)
        if not self.spoilt and where >= 0:
            self.spoilt = True
            data = data[:where] + b"\xfe" + data[where + 1 :]
        return super().writeData(offset, data)


@pytest_twisted.ensureDeferred
async def test_xenModeSavesDeviceStateToAFile(guests: Guests, workdir: str) -> None:
    """xen=1 saves the device state only; an abort lets the device model run again."""
    running = await guests.start("src")
    statefile = os.path.join(workdir, "dm.state")
    sourceContext, targetContext = contexts(workdir)
    spec = DeviceSpec.parse(
        f"devmodel:qemu:qmp={running.qmpPath},xen=1,target-statefile={statefile}"
    )
    device = devmodelKind.source(spec, sourceContext)
    described = await device.describe()
    assert described.params["mode"] == "xen-save-devices-state"
    full = DeviceDescription(
        "devmodel", "qemu", described.size, {**spec.targetParams, **described.params}
    )
    receiver = devmodelKind.target(full, targetContext)
    await receiver.accept()
    writer = PipeWriter(receiver)
    digest = await device.sendFinal(writer)  # it stops the running device model
    assert await running.status() == "paused"
    assert await writer.finish(digest) == digest
    assert digest.size < 64 * 1024  # no RAM: that moves through the hypervisor
    await receiver.commit()
    assert await targetContext.runInThread(hashFile, statefile) == digest
    with open(statefile, "rb") as f:
        assert f.read(4) == b"QEVM"
    await device.rollback()  # as after an abort elsewhere: the model runs again
    assert await running.status() == "running"
    await device.release()  # release=keep: the toolstack destroys it
    assert running.running


# -- through two twistd daemons over mutual TLS ----------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def hosts(
    tmp_path_factory: pytest.TempPathFactory, certs: PKI
) -> Iterator[tuple[Daemon, Daemon]]:
    """Two real daemons, host A and host B, each with its own allowed root."""
    requirePrograms(testguest.QEMU)
    started: list[Daemon] = []
    try:
        for name in ("a", "b"):
            started.append(Daemon(tmp_path_factory.mktemp(name), certs).start())
        yield started[0], started[1]
    finally:
        for daemon in started:
            daemon.stop()


async def moveVM(
    daemon: Daemon, running: ObservedGuest, waiting: ObservedGuest, domain: str
) -> int:
    """Migrate ``running`` into ``waiting`` through ``daemon``; the counter at pause."""
    client = daemon.client(reactor)
    spec = DeviceSpec.parse(
        f"devmodel:qemu:qmp={running.qmpPath},target-qmp={waiting.qmpPath},"
        f"target-log={waiting.logPath}"
    )
    migration = SourceMigration(client, domain, f"{domain}-{os.getpid()}")
    await migration.prepare([spec])
    atPause = await pause(running)
    migration.paused()
    await migration.transfer()
    assert await waiting.readCounter() == atPause  # loaded, still paused
    assert waiting.first("RESUME") is None
    await migration.commit()
    status = await daemon.status(reactor, migration.migrationId)
    assert status["phase"] == "COMMITTED"
    await QMPDomainControl(reactor, waiting.qmpPath).resume()
    assert migration.report()["paused_window"] is not None
    return atPause


@pytest_twisted.ensureDeferred
async def test_vmMovesThereAndBack(
    guests: Guests, hosts: tuple[Daemon, Daemon]
) -> None:
    """A->B->A through two daemons: the counter goes on; each source is released."""
    a, b = hosts
    first = await guests.start("vm-a")
    await first.countsPast(50)
    second = await guests.start("vm-b", True, directory=str(b.dest))
    atPause = await moveVM(b, first, second, "there")
    assert await first.whenEnded()  # the source QEMU was released
    assert await second.countsPast(atPause) > atPause
    third = await guests.start("vm-a2", True, directory=str(a.dest))
    back = await moveVM(a, second, third, "back")
    assert back > atPause
    assert await second.whenEnded()
    await third.countsPast(back)
    assert (third.first("RESUME") or 0) > (second.first("STOP") or 1e18)


@pytest_twisted.ensureDeferred
async def test_statefileForATargetThatStartsQEMUItself(
    guests: Guests, hosts: tuple[Daemon, Daemon]
) -> None:
    """The state installed as a file at commit loads into a QEMU started later."""
    _, b = hosts
    running = await guests.start("vm-file")
    statefile = b.dest / "vm-file.state"
    client = b.client(reactor)
    spec = DeviceSpec.parse(
        f"devmodel:qemu:qmp={running.qmpPath},target-statefile={statefile}"
    )
    migration = SourceMigration(client, "statefile", f"statefile-{os.getpid()}")
    await migration.prepare([spec])
    atPause = await pause(running)
    digests = await migration.transfer()
    assert not statefile.exists()  # installed only at the commit
    assert await migration.commit() == [str(statefile)]
    assert digests["qemu"] == hashFile(str(statefile))
    assert await running.whenEnded()
    # The target toolstack starts its QEMU and hands it the file.
    later = await guests.start("vm-file-b", True, directory=str(b.dest))
    client2 = await connectQMP(reactor, later.qmpPath)
    fd = os.open(statefile, os.O_RDONLY)
    try:
        assert await client2.migrateIncomingFromFD(fd) == "paused"
        assert await later.readCounter() == atPause
        await client2.cont()
    finally:
        os.close(fd)
        await client2.close()
    await later.countsPast(atPause)


def test_cliMigratesWithTheQMPDomainControl(
    hosts: tuple[Daemon, Daemon], workdir: str
) -> None:
    """``xenmig migrate --domain-control qmp:PATH`` pauses, migrates and releases."""
    requirePrograms(testguest.QEMU)
    _, b = hosts
    image = os.path.join(workdir, "guest.rom")
    testguest.writeGuestImage(image)
    sourceQMP = os.path.join(workdir, "cli-src.qmp")
    targetQMP = b.dest / "cli-dst.qmp"
    processes = [
        subprocess.Popen(testguest.qemuCommand(image, sourceQMP)),
        subprocess.Popen(testguest.qemuCommand(image, str(targetQMP), incoming=True)),
    ]
    try:
        for path in (sourceQMP, str(targetQMP)):
            _waitFor(path)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "xenmig.cli.main",
                "migrate",
                *b.targetArgs(),
                "--domain",
                "cli-vm",
                "--device",
                f"devmodel:qemu:qmp={sourceQMP},target-qmp={targetQMP}",
                "--domain-control",
                f"qmp:{sourceQMP}",
                "--json",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["phase"] == "COMMITTED"
        assert report["paused_window"] > 0
        assert report["live"]["pause"]["command"] == f"QEMU at {sourceQMP}"
        assert report["domain_control"]["released"] is True
        assert processes[0].wait(timeout=10) == 0  # the source QEMU quit
        assert processes[1].poll() is None  # the target waits, paused
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _waitFor(path: str, timeout: float = 10.0) -> None:
    """Blocking (no reactor work in this test): wait until QEMU listens on ``path``."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"QEMU does not listen on {path}")
            time.sleep(0.02)
