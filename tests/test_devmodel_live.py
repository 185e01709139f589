"""The ``devmodel`` kind's live RAM: QEMU's pre-copy while the guest runs."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, cast

import pytest
import pytest_twisted
from daemons import PKI, Daemon
from test_devmodel import (  # the real-QEMU fixtures: guests, workdir, pair, pause
    Guests,
    _waitFor,
    guests,
    pair,
    pause,
    randomRAM,
    workdir,
)
from test_sourcemigration import FakeClient, RoundsKind, RoundsSource, run
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import deferLater
from zope.interface import implementer

from xenmig.demo import testguest
from xenmig.devices.devmodel.live import FIRST_SHARE, LiveRAM, Nudges
from xenmig.devices.devmodel.source import DevmodelSource
from xenmig.errors import MigrationAborted
from xenmig.interfaces import ISourceDevice
from xenmig.model import DeviceSpec, RoundResult
from xenmig.source.client import MigrationClient
from xenmig.source.convergence import FixedRounds
from xenmig.source.migration import SourceMigration
from xenmig.source.threadedstream import ThreadedStreamSender
from xenmig.testing import PipeWriter, requirePrograms
from xenmig.toolstack.domains import QMPDomainControl

__all__ = ["guests", "workdir"]  # fixtures, used by name


def dirtying(workdir: str) -> str:
    """The firmware of the guest that rewrites 512 KiB of its RAM as it counts."""
    path = os.path.join(workdir, "dirtying.rom")
    testguest.writeGuestImage(path, dirtying=True)
    return path


async def queryMigrate(guest: Any) -> dict[str, Any]:
    result: dict[str, Any] = await guest.observer.execute("query-migrate")
    return result


async def switchedOver(guest: Any) -> str:
    """The migration's status once QEMU left ``pre-switchover`` (within 5 s)."""
    for _ in range(500):
        status = str((await queryMigrate(guest))["status"])
        if status != "pre-switchover":
            return status
        await deferLater(reactor, 0.01, lambda: None)
    return status


@pytest.mark.parametrize("rewriting", [False, True], ids=["quiet", "rewriting"])
@pytest_twisted.ensureDeferred
async def test_ramMovesWhileTheGuestRuns(
    guests: Guests, workdir: str, rewriting: bool
) -> None:
    """
    RAM goes in pre-copy rounds while the guest runs (and rewrites memory),
    straight into the incoming QEMU; the paused window carries the rest; the
    guest counts on from where it stopped.
    """
    image = dirtying(workdir) if rewriting else guests.image
    running = await guests.start("src", image=image, extra=randomRAM(workdir))
    waiting = await guests.start("dst", incoming=True, image=image)
    # QEMU stops the guest once what is left takes under 20 ms to send: soon
    # after its first pass, as the guest rewrites at most 512 KiB.
    device, receiver = await pair(
        workdir, running, **{"target-qmp": waiting.qmpPath, "downtime": "20"}
    )
    assert device.precopy
    before = await running.countsPast(3)
    writer = PipeWriter(receiver)
    observer: Any = running.observer
    results, limits, expected = [], [], 20 // FIRST_SHARE
    while not results or (results[-1].remaining and len(results) < 5):
        result = await device.sendRound(writer, len(results))
        assert result.figures["stream_bytes"] == result.bytesSent
        results.append(result)
        # QEMU's downtime-limit began at a share of the 20 ms and doubled after
        # each pass that did not converge, up to the 20 ms.
        if result.remaining:
            expected = min(20, expected * 2)
        parameters = await observer.execute("query-migrate-parameters")
        limits.append(parameters["downtime-limit"])
        assert limits[-1] == expected == device.live.limit, limits
    sent = sum(r.bytesSent for r in results)
    # QEMU sent most of the 16 MiB of random RAM while the guest ran and counted
    # (it stops the guest with up to 20 ms of sending left).
    assert sent > 12 * 1024 * 1024
    assert results[-1].figures["ram_transferred"] > 12 * 1024 * 1024
    # The incoming QEMU is loading already, or has loaded all of it (QEMU went
    # on with its switch-over as soon as it stopped the guest): before any END,
    # so nothing was staged whole first.
    assert (await queryMigrate(waiting))["status"] in ("active", "completed")
    assert await switchedOver(running) in ("device", "completed")
    atPause = await pause(running)
    assert atPause > before
    digest = await device.sendFinal(writer)
    final = digest.size - sent
    assert 0 < final < digest.size // 4  # the last dirty RAM and the devices
    assert await writer.finish(digest) == digest
    assert [name for name, _ in running.events].count("STOP") == 1  # one pause
    assert await running.status() == "postmigrate"
    assert await waiting.status() == "paused"
    # Exact, with passes while the guest rewrites memory: its RAM size is not a
    # whole number of 64-page words (testguest.tcgRAM), so QEMU 7.2 tracks every
    # store under TCG (doc/devmodel.md, "TCG caveat"; with 16 MiB the count lagged
    # by one in about half of the runs, QEMU alone too).
    loaded = await waiting.readCounter()
    assert loaded == atPause
    await receiver.commit()
    await QMPDomainControl(reactor, waiting.qmpPath).resume()
    await waiting.countsPast(loaded)
    # The source QEMU's migration settings are as they were: put back after
    # its final state was sent, outside the paused window (within 5 s).
    for _ in range(500):
        capabilities = await observer.execute("query-migrate-capabilities")
        states = {c["capability"]: c["state"] for c in capabilities}
        parameters = await observer.execute("query-migrate-parameters")
        if not states["pause-before-switchover"]:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert states["pause-before-switchover"] is False
    assert parameters["downtime-limit"] == 300  # QEMU's default, put back
    await device.release()
    assert await running.whenEnded()


class SlowWriter(PipeWriter):
    """Holds every write a moment (its bytes at 12 MB/s): a stream slower than QEMU."""

    def writeData(self, offset: int, data: bytes) -> Deferred[None]:
        written = super().writeData(offset, data)
        delay = len(data) / 12e6
        return written.addCallback(lambda _: deferLater(reactor, delay, lambda: None))


def test_theLimitDoublesUpToItsCap() -> None:
    """Each pass that did not converge doubles QEMU's limit, never past the cap."""
    sent: list[Any] = []

    class Monitor:
        def execute(self, command: str, arguments: Any = None) -> Deferred[Any]:
            sent.append((command, arguments))
            return succeed({})

    live = LiveRAM(reactor, "qemu", cast(Any, None), limit=20 // FIRST_SHARE, cap=20)
    for _ in range(6):
        assert Deferred.fromCoroutine(live.raiseLimit(Monitor())).called
    assert [a["downtime-limit"] for _, a in sent] == [4, 8, 16, 20]
    assert {c for c, _ in sent} == {"migrate-set-parameters"} and live.limit == 20


@pytest_twisted.ensureDeferred
async def test_qemuGetsAShareOfTheLimitThenMore(guests: Guests, workdir: str) -> None:
    """
    QEMU's own ``query-migrate-parameters`` while the first pass runs: an
    eighth of the device's ``downtime``; after each round, doubled if its pass
    did not converge (QEMU did not stop the guest), as L{LiveRAM} says.  An
    abort then puts QEMU's own limit back, and the guest runs.
    """
    image = dirtying(workdir)
    running = await guests.start("src", image=image, extra=randomRAM(workdir))
    waiting = await guests.start("dst", incoming=True, image=image)
    device, receiver = await pair(
        workdir, running, **{"target-qmp": waiting.qmpPath, "downtime": "20"}
    )
    writer = SlowWriter(receiver)
    observer: Any = running.observer
    first = device.sendRound(writer, 0)
    while device.live is None:  # started: QEMU has its limit before it migrates
        await deferLater(reactor, 0.01, lambda: None)
    parameters = await observer.execute("query-migrate-parameters")
    if not first.called:  # its first pass still runs
        assert parameters["downtime-limit"] == 20 // FIRST_SHARE == 2
    results, expected = [await first], 2
    while True:
        stopped = results[-1].figures["vm_stopped"]
        if not stopped:  # the round ended with a pass that did not converge
            expected = min(20, expected * 2)
        parameters = await observer.execute("query-migrate-parameters")
        assert parameters["downtime-limit"] == expected == device.live.limit
        if stopped or len(results) == 4:
            break
        results.append(await device.sendRound(writer, len(results)))
    await device.rollback()
    await receiver.abort()
    assert await running.status() == "running"
    parameters = await observer.execute("query-migrate-parameters")
    assert parameters["downtime-limit"] == 300


@pytest_twisted.ensureDeferred
async def test_abortDuringPreCopy(guests: Guests, workdir: str) -> None:
    """An abort in pre-copy cancels QEMU's migration; the source guest runs on."""
    image = dirtying(workdir)
    running = await guests.start("src", image=image, extra=randomRAM(workdir))
    waiting = await guests.start("dst", incoming=True, image=image)
    device, receiver = await pair(workdir, running, **{"target-qmp": waiting.qmpPath})
    writer = SlowWriter(receiver)
    round = device.sendRound(writer, 0)
    round.addErrback(lambda f: None)  # cancelled by the rollback
    await deferLater(reactor, 0.3, lambda: None)
    assert (await queryMigrate(running))["status"] == "active"
    await device.rollback()
    await receiver.abort()
    assert (await queryMigrate(running))["status"] == "cancelled"
    assert await running.status() == "running"
    assert running.first("STOP") is None  # never paused, by QEMU or anyone
    await running.countsPast(await running.readCounter())
    assert await waiting.whenEnded()  # it held part of a state: quit
    assert waiting.first("RESUME") is None


@pytest_twisted.ensureDeferred
async def test_abortAfterQEMUStoppedTheGuest(guests: Guests, workdir: str) -> None:
    """
    QEMU stopped the guest for its switch-over, and the round let it go on: an
    abort before the toolstack's pause has the guest run again, and the
    incoming QEMU, which may hold all of the state, never runs it.
    """
    running = await guests.start("src")
    waiting = await guests.start("dst", incoming=True)
    device, receiver = await pair(workdir, running, **{"target-qmp": waiting.qmpPath})
    result = await device.sendRound(PipeWriter(receiver), 0)
    # A quiet guest: QEMU's RAM converged at once and QEMU stopped the guest.
    assert result.figures["qemu_status"] == "pre-switchover"
    assert result.remaining == 0
    # The round let the switch-over go on: QEMU sends the rest, VM stopped.
    assert await switchedOver(running) in ("device", "completed")
    assert await running.status() in ("finish-migrate", "postmigrate")
    before = await running.readCounter()
    await device.rollback()
    await receiver.abort()
    assert await running.status() == "running"
    assert (await queryMigrate(running))["status"] in ("completed", "cancelled")
    await running.countsPast(before)
    assert await waiting.whenEnded()  # it held the state: quit, never run
    assert waiting.first("RESUME") is None
    # The source QEMU's migration settings are as they were.
    capabilities = await running.observer.execute(  # type: ignore[union-attr]
        "query-migrate-capabilities"
    )
    states = {c["capability"]: c["state"] for c in capabilities}
    assert states["pause-before-switchover"] is False and states["events"] is False


@pytest_twisted.ensureDeferred
async def test_abortAfterTheToolstacksPause(guests: Guests, workdir: str) -> None:
    """
    After the toolstack's pause the VM stays paused on an abort, whatever QEMU's
    switch-over did: resuming it is the toolstack's step.
    """
    running = await guests.start("src")
    waiting = await guests.start("dst", incoming=True)
    device, receiver = await pair(workdir, running, **{"target-qmp": waiting.qmpPath})
    writer = PipeWriter(receiver)
    await device.sendRound(writer, 0)
    atPause = await pause(running)
    await device.sendFinal(writer)
    await device.rollback()
    await receiver.abort()
    assert await running.status() == "postmigrate"
    assert await running.readCounter() == atPause
    await QMPDomainControl(reactor, running.qmpPath).resume()  # the toolstack's
    await running.countsPast(atPause)


def test_xenModeHasNoPreCopy() -> None:
    """xen=1 sends device state only, in the paused window: no pre-copy rounds."""
    spec = DeviceSpec.parse("devmodel:q:qmp=/s,xen=1,target-statefile=f")
    assert not DevmodelSource(spec, None).precopy  # type: ignore[arg-type]
    spec = DeviceSpec.parse("devmodel:q:qmp=/s,live=0,target-qmp=t")
    assert not DevmodelSource(spec, None).precopy  # type: ignore[arg-type]


# -- waits QEMU's events cut short, and a shallow queue, without QEMU ----------------


class EventSource:
    """What L{Nudges} uses of a QMP client: its event subscriptions."""

    def __init__(self) -> None:
        self.handlers: dict[str, list[Any]] = {}

    def onEvent(self, name: str, callback: Any) -> Any:
        self.handlers.setdefault(name, []).append(callback)
        return lambda: self.handlers[name].remove(callback)

    def emit(self, name: str) -> None:
        for callback in list(self.handlers.get(name, [])):
            callback({"event": name, "data": {}})


def test_aWaitEndsWithQEMUsEvent() -> None:
    """A wait between two looks lasts its seconds, or until QEMU's next event."""
    clock, client = task.Clock(), EventSource()
    nudges = Nudges(clock, client)  # type: ignore[arg-type]
    waited = Deferred.fromCoroutine(nudges.wait(1))
    clock.advance(0.5)
    assert not waited.called
    clock.advance(0.5)
    assert waited.called
    waited = Deferred.fromCoroutine(nudges.wait(10))
    client.emit("MIGRATION")
    assert waited.called and not nudges.stopped
    client.emit("STOP")  # between two waits: the next one ends at once
    assert nudges.stopped
    assert Deferred.fromCoroutine(nudges.wait(10)).called
    waited = Deferred.fromCoroutine(nudges.wait(10))
    waited.cancel()
    waited.addErrback(lambda f: f.trap(CancelledError))
    assert not clock.getDelayedCalls()
    nudges.close()
    assert all(not handlers for handlers in client.handlers.values())


def test_QEMUsStreamKeepsLittleUnsent() -> None:
    """
    The devmodel's stream keeps at most 2 MiB waiting unsent (QEMU measures
    its bandwidth by its writes); another device's, the sender's 16 MiB.
    """
    spec = DeviceSpec.parse("devmodel:q:qmp=/s,target-qmp=t")
    queue = DevmodelSource(spec, None).streamQueue  # type: ignore[arg-type]
    assert queue == 2 * 1024 * 1024
    client = MigrationClient(
        reactor, "127.0.0.1", 1, sslContext=ssl.create_default_context()
    )
    piece = bytes(256 * 1024)
    for bound, writes in ((queue, 7), (None, 63)):
        sender = client.streamSender("q", None, bound)
        assert isinstance(sender, ThreadedStreamSender)
        written = [sender.writeData(i * len(piece), piece) for i in range(writes + 1)]
        # Each record is a little more than its data: the last write waits.
        assert all(d.called for d in written[:writes]) and not written[-1].called
        written[-1].addErrback(lambda f: None)
        sender.abort()


# -- the order of the rounds, without QEMU --------------------------------------------


@implementer(ISourceDevice)
class OrderedSource(RoundsSource):
    """A pre-copy device that notes its rounds; ``last=1``: it pauses the VM."""

    log: list[str] = []

    @property
    def precopyLast(self) -> bool:
        return bool(self.spec.params.get("last"))

    def sendRound(self, writer: Any, round: int) -> Deferred[RoundResult]:
        self.log.append(f"{self.spec.name}{round}")
        return super().sendRound(writer, round)


class OrderedKind(RoundsKind):
    def source(self, spec: DeviceSpec, context: Any) -> OrderedSource:
        device = OrderedSource(spec, context)
        self.sources.append(device)
        return device


def test_pausingDeviceGoesLast() -> None:
    """A device whose convergence pauses the VM pre-copies after all the others."""
    OrderedSource.log = []
    client = FakeClient({"memory": OrderedKind()})
    migration = SourceMigration(client, "vm1", "m1")  # type: ignore[arg-type]
    specs = ["memory:ram:data=x,last=1", "memory:disk:data=y", "memory:tpm:data=z"]
    run(migration.prepare([DeviceSpec.parse(s) for s in specs]))
    rounds = run(migration.precopy(FixedRounds(2)))
    log = OrderedSource.log
    assert sorted(log[:4]) == ["disk0", "disk1", "tpm0", "tpm1"]
    assert log[4:] == ["ram0", "ram1"]
    assert set(rounds) == {"ram", "disk", "tpm"}


# -- the command line, through a twistd daemon over mutual TLS -------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The target host's daemon; its allowed root holds the incoming QEMU's socket."""
    requirePrograms(testguest.QEMU)
    running = Daemon(tmp_path_factory.mktemp("b"), PKI(tmp_path_factory.mktemp("pki")))
    running.start()
    yield running
    running.stop()


def test_cliShowsTheRAMRounds(daemon: Daemon, workdir: str) -> None:
    """``xenmig migrate --live``: RAM rounds on the terminal and in the report."""
    image = dirtying(workdir)
    sourceQMP = os.path.join(workdir, "live-src.qmp")
    targetQMP = daemon.dest / "live-dst.qmp"
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
                *daemon.targetArgs(),
                "--domain",
                "live-vm",
                "--device",
                f"devmodel:qemu:qmp={sourceQMP},target-qmp={targetQMP},downtime=50",
                "--domain-control",
                f"qmp:{sourceQMP}",
                "--live",
                "--json",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["phase"] == "COMMITTED"
        [qemu] = report["devices"]
        figures = qemu["round_figures"]
        assert len(figures) == len(qemu["rounds"]) >= 1
        # A round's bytes are QEMU's stream up to the round's end (not what
        # followed once the round let QEMU's switch-over go on).
        assert [f["stream_bytes"] for f in figures] == qemu["rounds"]
        assert all(f["ram_transferred"] > 0 for f in figures)
        assert {"ram_remaining", "dirty_pages_rate", "dirty_bytes_rate"} <= set(
            figures[0]
        )
        assert sum(qemu["rounds"]) < qemu["data_bytes"]  # the paused window's part
        # QEMU stopped the VM in the last round: the paused window starts there.
        assert figures[-1]["vm_stopped"] is True
        assert 0 < report["paused_window"] < report["durations"]["total"]
        assert report["paused_window"] > report["live"]["pause"]["seconds"]
        assert "qemu RAM round 0: " in result.stderr
        assert processes[0].wait(timeout=10) == 0  # the source QEMU quit
        assert processes[1].poll() is None  # the target waits, paused
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def bigRandomRAM(workdir: str, mib: int) -> tuple[str, ...]:
    """QEMU options giving the guest ``mib`` MiB of random RAM (the last -m wins)."""
    path = os.path.join(workdir, f"ram{mib}.bin")
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
        f.truncate(testguest.tcgRAMBytes(mib))
    return (
        "-m", testguest.tcgRAM(mib),
        "-object",
        f"memory-backend-file,id=pc.ram,size={testguest.tcgRAM(mib)},mem-path={path},"
        "share=off",
        "-machine", "memory-backend=pc.ram",
    )  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_incomingQEMUGoneDuringPreCopy(
    guests: Guests, workdir: str, daemon: Daemon
) -> None:
    """
    The incoming QEMU exits while RAM moves: the migration aborts with the
    target's reason, nothing is installed, the source guest never stopped.
    """
    extra = bigRandomRAM(workdir, 128)
    running = await guests.start("src", extra=extra)
    waiting = await guests.start(
        "dst", incoming=True, extra=extra, directory=str(daemon.dest)
    )
    spec = DeviceSpec.parse(
        # downtime=1: QEMU cannot switch over before its first pass is done
        f"devmodel:qemu:qmp={running.qmpPath},target-qmp={waiting.qmpPath},downtime=1"
    )
    migration = SourceMigration(daemon.client(reactor), "gone", f"gone-{os.getpid()}")
    await migration.prepare([spec])
    precopy = Deferred.fromCoroutine(migration.precopy())
    # As soon as RAM moves and the incoming QEMU reads it (the first pass of
    # 128 MiB of random RAM takes longer than this), the incoming QEMU goes.
    for _ in range(1000):
        state = await queryMigrate(running)
        incoming = await queryMigrate(waiting)
        if state.get("ram", {}).get("transferred", 0) and incoming.get("status") == (
            "active"
        ):
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert state["status"] == "active", state  # RAM is moving
    assert incoming["status"] == "active", incoming  # and the target QEMU reads it
    await waiting.observer.execute("quit")
    with pytest.raises(MigrationAborted) as caught:
        await precopy
    assert "the target QEMU stopped reading the state" in str(caught.value)
    status = await daemon.status(reactor, migration.migrationId)
    assert status["phase"] == "ABORTED" and status["installed"] == []
    # No migration in progress: the cut stream failed it (or the abort cancelled it).
    assert (await queryMigrate(running))["status"] in ("failed", "cancelled")
    assert await running.status() == "running"
    assert running.first("STOP") is None
    await running.countsPast(await running.readCounter())
