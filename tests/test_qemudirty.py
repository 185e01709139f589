"""
QEMU's dirty bitmaps as the disk kind's source of changed blocks, against a
real QEMU: the bitmap on the image's file node, read over QEMU's NBD server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import blake3
import pytest
import pytest_twisted
from test_disk import FakeSourceContext, digestOf, makeSpec, prepare, run, treeOf
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from zope.interface.verify import verifyObject

from xenmig.clients.qmpclient import QMPClient
from xenmig.demo.testguest import QEMU, RunningGuest, startQEMU, writeThroughQEMU
from xenmig.devices.disk import leaves, qemudirty
from xenmig.devices.disk.qemudirty import QEMUDirtyBitmap
from xenmig.devices.disk.source import DiskSource
from xenmig.errors import DeviceError, PhaseTimeout
from xenmig.interfaces import IDirtyBlocks
from xenmig.source.convergence import FixedRounds
from xenmig.testing import requirePrograms


@pytest.fixture(autouse=True)
def _programs() -> None:
    requirePrograms(QEMU, "qemu-img")


MiB = 1024 * 1024
K64 = 64 * 1024


@asynccontextmanager
async def qemuWith(
    tmp_path: Any,
    image: str,
    driver: str = "raw",
    blockdev: bool = True,
    more: tuple[str, ...] = (),
) -> AsyncIterator[tuple[RunningGuest, str]]:
    """
    A QEMU (no guest) with ``image`` attached (and raw images ``more`` as disk1,
    ...), and two QMP monitors: one the test holds, one free for xenmig's short
    sessions (its path is yielded).
    """
    control = str(tmp_path / "control.qmp")
    free = str(tmp_path / "xenmig.qmp")
    if blockdev:
        disk = [
            "-blockdev", f"driver=file,filename={image},node-name=file0",
            "-blockdev", f"driver={driver},file=file0,node-name=disk0",
        ]  # fmt: skip
    else:  # auto-named nodes, as -drive makes them
        disk = ["-drive", f"if=none,id=disk0,file={image},format={driver}"]
    for number, path in enumerate(more, 1):
        disk += [
            "-blockdev", f"driver=file,filename={path},node-name=file{number}",
            "-blockdev", f"driver=raw,file=file{number},node-name=disk{number}",
        ]  # fmt: skip
    command = [
        QEMU, "-machine", "none", "-nodefaults", "-no-user-config",
        "-display", "none", *disk,
        "-qmp", f"unix:{control},server=on,wait=off",
        "-qmp", f"unix:{free},server=on,wait=off",
    ]  # fmt: skip
    guest = await startQEMU(reactor, command, control)
    try:
        yield guest, free
    finally:
        await guest.terminate()


async def write(
    qmp: QMPClient, offset: int, length: int, pattern: int = 0x5A, disk: str = "disk0"
) -> None:
    """A guest's write of ``length`` bytes at ``offset`` (through QEMU)."""
    await writeThroughQEMU(qmp, disk, offset, length, pattern)


async def bitmapsOf(qmp: QMPClient) -> list[str]:
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    return [b["name"] for node in nodes for b in node.get("dirty-bitmaps", [])]


def rawImage(tmp_path: Any, size: int = 64 * MiB) -> str:
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest_twisted.ensureDeferred
async def test_collect_reports_the_writes_of_each_interval(tmp_path: Any) -> None:
    image = rawImage(tmp_path)
    async with qemuWith(tmp_path, image) as (guest, qmpPath):
        dirty = QEMUDirtyBitmap(reactor, qmpPath, image)
        verifyObject(IDirtyBlocks, dirty)
        await dirty.start()
        assert dirty.node == "file0"  # the file node, found from the path
        # Ranges come in whole 64 KiB granules (the default granularity).
        await write(guest.qmp, MiB, 64 * 1024)
        await write(guest.qmp, 10 * MiB + 4096, 4096)
        await write(guest.qmp, 12 * MiB + 65536 - 4096, 8192)  # across two granules
        await write(guest.qmp, 63 * MiB, MiB)
        assert await dirty.collect() == [
            (MiB, MiB + K64),
            (10 * MiB, 10 * MiB + K64),
            (12 * MiB, 12 * MiB + 2 * K64),
            (63 * MiB, 64 * MiB),
        ]
        await write(guest.qmp, 20 * MiB, 3 * MiB)
        assert await dirty.collect() == [(20 * MiB, 23 * MiB)]
        assert await dirty.collect() == []
        # Exports and used bitmaps are gone as each collect ends: one is left,
        # recording.
        assert len(await bitmapsOf(guest.qmp)) == 1
        assert await guest.qmp.execute("query-block-exports") == []

        serverDir = qemudirty._servers[os.path.realpath(qmpPath)].directory
        assert os.path.exists(os.path.join(serverDir, "nbd.sock"))

        await dirty.stop()
        await dirty.stop()  # idempotent
        assert await bitmapsOf(guest.qmp) == []
        assert not os.path.exists(serverDir)
        assert qemudirty._servers == {}
        # Our NBD server is stopped: another can start.
        await guest.qmp.execute(
            "nbd-server-start",
            {"addr": {"type": "unix", "data": {"path": str(tmp_path / "n.sock")}}},
        )


@pytest_twisted.ensureDeferred
async def test_a_refused_step_of_a_batch_leaves_the_recording_whole(
    tmp_path: Any,
) -> None:
    """
    The commands of a round go to QEMU together: one refused (the view's node
    name taken) fails the collect naming QEMU's words, the interval's bitmap
    is removed with nothing exported, and the next interval's keeps recording:
    a later collect reports what was written since.
    """
    image = rawImage(tmp_path)
    async with qemuWith(tmp_path, image) as (guest, qmpPath):
        dirty = QEMUDirtyBitmap(reactor, qmpPath, image)
        await dirty.start()
        taken = f"{dirty._active}-view"
        await guest.qmp.execute(
            "blockdev-add", {"driver": "null-co", "node-name": taken, "size": MiB}
        )
        await write(guest.qmp, MiB, 4096)
        with pytest.raises(DeviceError, match=taken):
            await dirty.collect()
        assert len(await bitmapsOf(guest.qmp)) == 1  # the next interval's
        assert await guest.qmp.execute("query-block-exports") == []
        await write(guest.qmp, 5 * MiB, 4096)
        assert await dirty.collect() == [(5 * MiB, 5 * MiB + K64)]
        await dirty.stop()
        assert await bitmapsOf(guest.qmp) == []
        await guest.qmp.execute("blockdev-del", {"node-name": taken})


@pytest_twisted.ensureDeferred
async def test_a_collect_cancelled_mid_batch_leaves_nothing(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A collect cancelled (its migration aborted) while QEMU runs the batch that
    makes the view: QEMU made it all the same, and the collect removes it, its
    export and the interval's bitmap before its session ends; recording goes
    on in the next bitmap.
    """
    from twisted.internet.defer import CancelledError

    from xenmig.devices.disk import bitmapviews

    async def cutOff(qmp: QMPClient, commands: Any) -> Any:
        answers = await qemudirty.executeAll(qmp, commands)
        if any(name == "block-export-add" for name, _ in commands):
            raise CancelledError()  # the answers came, the caller had gone
        return answers

    image = rawImage(tmp_path)
    async with qemuWith(tmp_path, image) as (guest, qmpPath):
        dirty = QEMUDirtyBitmap(reactor, qmpPath, image)
        await dirty.start()
        monkeypatch.setattr(bitmapviews, "executeAll", cutOff)
        await write(guest.qmp, MiB, 4096)
        with pytest.raises(CancelledError):
            await dirty.collect()
        assert len(await bitmapsOf(guest.qmp)) == 1  # the next interval's
        assert await guest.qmp.execute("query-block-exports") == []
        nodes = await guest.qmp.execute("query-named-block-nodes", {"flat": True})
        assert not [n for n in nodes if n["node-name"].endswith("-view")]
        monkeypatch.undo()
        await write(guest.qmp, 5 * MiB, 4096)
        assert await dirty.collect() == [(5 * MiB, 5 * MiB + K64)]
        await dirty.stop()
        assert await bitmapsOf(guest.qmp) == []


@pytest_twisted.ensureDeferred
async def test_a_stop_during_a_collect_leaves_nothing(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A stop (the migration rolled back) while a collect's swap is in QEMU: the
    collect ends with the next interval's bitmap recording and the NBD server
    taken, and the stop, whose session QEMU serves after it, removes both.
    """
    stopping: list[Any] = []
    real = qemudirty.executeAll

    async def stopMeanwhile(qmp: QMPClient, commands: Any) -> Any:
        if not stopping and commands[0][0] == "transaction":
            stopping.append(dirty.stop())  # while QEMU runs the swap
        return await real(qmp, commands)

    image = rawImage(tmp_path)
    async with qemuWith(tmp_path, image) as (guest, qmpPath):
        dirty = QEMUDirtyBitmap(reactor, qmpPath, image)
        await dirty.start()
        await write(guest.qmp, MiB, 4096)
        monkeypatch.setattr(qemudirty, "executeAll", stopMeanwhile)
        assert await dirty.collect() == [(MiB, MiB + K64)]
        await stopping[0]
        assert await bitmapsOf(guest.qmp) == []
        assert qemudirty._servers == {}
        # Our NBD server is stopped: another can start.
        await guest.qmp.execute(
            "nbd-server-start",
            {"addr": {"type": "unix", "data": {"path": str(tmp_path / "n.sock")}}},
        )


@pytest_twisted.ensureDeferred
async def test_the_disks_of_one_qemu_share_its_nbd_server(tmp_path: Any) -> None:
    """A VM's two disks: their bitmaps collect at once through QEMU's one NBD
    server, which runs until the last of them stops."""
    first, second = rawImage(tmp_path), str(tmp_path / "second.raw")
    shutil.copyfile(first, second)
    async with qemuWith(tmp_path, first, more=(second,)) as (guest, qmpPath):
        disks = [QEMUDirtyBitmap(reactor, qmpPath, path) for path in (first, second)]
        for dirty in disks:
            await dirty.start()
        assert [d.node for d in disks] == ["file0", "file1"]
        await write(guest.qmp, 2 * MiB, 4096)
        await write(guest.qmp, 7 * MiB, 4096, disk="disk1")
        collected = await DeferredList([d.collect() for d in disks])
        assert collected == [
            (True, [(2 * MiB, 2 * MiB + K64)]),
            (True, [(7 * MiB, 7 * MiB + K64)]),
        ]
        await disks[0].stop()
        await write(guest.qmp, 9 * MiB, 4096, disk="disk1")
        assert await disks[1].collect() == [(9 * MiB, 9 * MiB + K64)]
        await disks[1].stop()
        assert await bitmapsOf(guest.qmp) == []
        assert qemudirty._servers == {}
        await guest.qmp.execute(  # QEMU's NBD server is free again
            "nbd-server-start",
            {"addr": {"type": "unix", "data": {"path": str(tmp_path / "n.sock")}}},
        )


@pytest_twisted.ensureDeferred
async def test_qcow2_container_changes_are_covered(tmp_path: Any) -> None:
    """On a qcow2 image the bitmap counts container offsets: every 1 MiB block of
    the container file that a guest write changed lies in a collected range."""
    image = str(tmp_path / "disk.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", image, "256M"], check=True
    )
    async with qemuWith(tmp_path, image, driver="qcow2", blockdev=False) as (
        guest,
        qmpPath,
    ):
        dirty = QEMUDirtyBitmap(reactor, qmpPath, image)
        await dirty.start()
        await write(guest.qmp, 0, 2 * MiB, 0x11)
        await dirty.collect()
        before = blockDigests(image)
        for offset in (5 * MiB, 100 * MiB + 65536, 200 * MiB, 0):
            await write(guest.qmp, offset, 3 * 65536, 0x22)
        ranges = await dirty.collect()
        after = blockDigests(image)
        await dirty.stop()
    changed = {
        i
        for i in range(max(len(before), len(after)))
        if i >= len(before) or i >= len(after) or before[i] != after[i]
    }
    covered = {
        i for start, stop in ranges for i in range(start // MiB, -(-stop // MiB))
    }
    assert changed, "the writes changed the container"
    assert changed <= covered
    # Not the whole container: the bitmap names the written clusters and metadata.
    assert len(covered) < len(after) // 2 or len(covered) <= 8


def blockDigests(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return [
            blake3.blake3(block).digest() for block in iter(lambda: f.read(MiB), b"")
        ]


@pytest_twisted.ensureDeferred
async def test_errors_name_what_failed(tmp_path: Any) -> None:
    image = rawImage(tmp_path)
    other = str(tmp_path / "other.raw")
    shutil.copyfile(image, other)
    missing = QEMUDirtyBitmap(reactor, str(tmp_path / "nothing.qmp"), image)
    with pytest.raises(DeviceError, match="no QMP socket at .*nothing.qmp"):
        await missing.start()
    await missing.stop()

    async with qemuWith(tmp_path, image) as (guest, qmpPath):
        stranger = QEMUDirtyBitmap(reactor, qmpPath, other)
        with pytest.raises(DeviceError, match="no block node for this image") as e:
            await stranger.start()
        assert image in str(e.value) and other in str(e.value)

        wrongNode = QEMUDirtyBitmap(reactor, qmpPath, image, node="nosuchnode")
        with pytest.raises(DeviceError, match="nosuchnode"):
            await wrongNode.start()

        # QEMU runs one NBD server: if another is up, collect says so, clearly.
        await guest.qmp.execute(
            "nbd-server-start",
            {"addr": {"type": "unix", "data": {"path": str(tmp_path / "n.sock")}}},
        )
        busy = QEMUDirtyBitmap(reactor, qmpPath, image)
        await busy.start()
        with pytest.raises(DeviceError, match="one NBD server"):
            await busy.collect()
        await busy.stop()
        assert await bitmapsOf(guest.qmp) == []

        # A QEMU that holds its monitor (another client on it) times out, named.
        hung = QEMUDirtyBitmap(reactor, str(tmp_path / "control.qmp"), image)
        hung.timeout = 0.3
        with pytest.raises((DeviceError, PhaseTimeout), match="control.qmp"):
            await hung.start()


# -- the disk kind with qmp= ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_live_disk_rounds_read_only_what_qemu_wrote(tmp_path: Any) -> None:
    """With ``qmp=``, rounds after the first read only the blocks QEMU wrote; the
    target equals the image as it was at the pause; nothing is left in QEMU."""
    image = str(tmp_path / "live.raw")
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(16 * MiB))
    destination = str(tmp_path / "dest" / "out.img")
    async with qemuWith(tmp_path, image) as (guest, qmpPath):
        spec = makeSpec(image, destination, qmp=qmpPath)
        source = DiskSource(spec, FakeSourceContext(), batchBlocks=4)
        migration = await prepare(tmp_path, image, destination, source=source)

        async def between(number: int) -> None:
            if number == 0:
                for offset in (MiB + 4096, 2 * MiB, 40 * MiB):  # blocks 1, 2, 40
                    await write(guest.qmp, offset, 8192, 0x33)

        results = await migration.rounds(FixedRounds(2), between)
        # With leaf tables on both sides (from round 0 on), the written 64 KiB
        # granules of blocks 1 and 2, else those blocks whole; in block 40, a
        # hole before, only the 8 KiB written (the rest as zeros).
        changed = 2 * 65536 if leaves.available() else 2 * MiB
        assert [r.bytesSent for r in results] == [16 * MiB, changed + 8192]
        assert [s.scannedBlocks for s in source.history] == [64, 3]
        assert [s.changedBlocks for s in source.history] == [64, 3]
        # The guest's last writes, then the pause.
        await write(guest.qmp, 63 * MiB, 4096, 0x44)  # into a hole
        await write(guest.qmp, 5 * MiB, MiB, 0)  # zeros over a whole data block
        await write(guest.qmp, 3 * MiB + 131072, 8192, 0x55)  # 8 KiB in data
        await guest.qmp.stop()
        digest = await migration.final()
        final = source.history[-1]
        assert (final.final, final.scannedBlocks, final.changedBlocks) == (True, 3, 3)
        # Only the written 64 KiB pieces of a block travel in the final round
        # (the target updates the block's leaf table from them, or reads the
        # rest of the block back without one).
        granule = 64 * 1024
        assert final.dataBytes == 4096 + granule
        assert final.zeroBytes == MiB + granule - 4096
        assert digest == await treeOf(image)
        assert await digestOf(destination) == await digestOf(image)
        assert await bitmapsOf(guest.qmp) == []


@pytest_twisted.ensureDeferred
async def test_live_qcow2_that_grows_under_qemu(tmp_path: Any) -> None:
    """A qcow2 image whose container QEMU grows during pre-copy (new clusters,
    L2 and refcount tables) and before the pause: the target passes
    ``qemu-img check`` and ``compare`` against the source at the pause."""
    image = str(tmp_path / "live.qcow2")
    code, output = await run("qemu-img", "create", "-q", "-f", "qcow2", image, "256M")
    assert code == 0, output
    destination = str(tmp_path / "dest" / "out.qcow2")
    async with qemuWith(tmp_path, image, driver="qcow2") as (guest, qmpPath):
        await write(guest.qmp, 0, 4 * MiB, 0x11)
        spec = makeSpec(image, destination, qmp=qmpPath)
        source = DiskSource(spec, FakeSourceContext(), batchBlocks=4)
        migration = await prepare(tmp_path, image, destination, source=source)
        sizes = [os.stat(image).st_size]

        async def between(number: int) -> None:
            for offset in range(number * 40 * MiB + 8 * MiB, 256 * MiB, 60 * MiB):
                await write(guest.qmp, offset, 3 * 65536, 0x20 + number)
            sizes.append(os.stat(image).st_size)

        await migration.rounds(FixedRounds(3), between)
        await write(guest.qmp, 250 * MiB, 65536, 0x77)  # the last write, new cluster
        await write(guest.qmp, 4096, 4096, 0x78)  # and one in an old one
        await guest.qmp.stop()
        digest = await migration.final()
        sizes.append(os.stat(image).st_size)
        assert sizes == sorted(sizes) and sizes[-1] > sizes[0]  # it grew each time
        assert digest == await treeOf(image)
        code, output = await run("qemu-img", "compare", "-U", image, destination)
        assert code == 0, output
        code, output = await run("qemu-img", "check", destination)
        assert code == 0, output
    # Rounds after the first read only what QEMU wrote, never the whole image.
    assert all(s.scannedBlocks < sizes[-1] // MiB for s in source.history[1:])


@pytest_twisted.ensureDeferred
async def test_rollback_leaves_nothing_in_qemu(tmp_path: Any) -> None:
    image = rawImage(tmp_path)
    destination = str(tmp_path / "dest" / "out.img")
    async with qemuWith(tmp_path, image) as (guest, qmpPath):
        spec = makeSpec(image, destination, qmp=qmpPath)
        source = DiskSource(spec, FakeSourceContext())
        migration = await prepare(tmp_path, image, destination, source=source)
        await migration.rounds(FixedRounds(2))
        assert len(await bitmapsOf(guest.qmp)) == 1
        await source.rollback()
        await migration.target.abort()
        assert await bitmapsOf(guest.qmp) == []
        assert not os.path.exists(destination)


@pytest_twisted.ensureDeferred
async def test_a_lost_qemu_fails_the_round_with_its_reason(tmp_path: Any) -> None:
    """QEMU gone between rounds: the round fails naming the QMP socket, and the
    source can still be rolled back."""
    image = rawImage(tmp_path)
    destination = str(tmp_path / "dest" / "out.img")
    async with qemuWith(tmp_path, image) as (guest, qmpPath):
        source = DiskSource(
            makeSpec(image, destination, qmp=qmpPath), FakeSourceContext()
        )
        migration = await prepare(tmp_path, image, destination, source=source)
        await migration.rounds(FixedRounds(1))
        await guest.terminate()
        with pytest.raises(DeviceError, match="xenmig.qmp"):
            await migration.rounds(FixedRounds(1))
        await source.rollback()
        await migration.target.abort()
        assert not os.path.exists(destination)


class BusyViewQMP:
    """A QMP client whose ``blockdev-del`` says the node is in use ``busy`` times."""

    def __init__(self, busy: int, desc: str = "Node view is in use") -> None:
        self.busy = busy
        self.desc = desc
        self.calls: list[str] = []

    def execute(self, command: str, arguments: Any = None) -> Deferred[Any]:
        from twisted.internet.defer import fail, succeed

        from xenmig.clients.qmp import QMPError

        self.calls.append(command)
        if self.busy:
            self.busy -= 1
            return fail(QMPError(command, "GenericError", self.desc))
        return succeed({})


def test_viewStillInUseIsAskedAgain() -> None:
    """A view QEMU still counts in use after its export went is removed on a retry."""
    from twisted.internet.task import Clock

    clock = Clock()
    bitmap = QEMUDirtyBitmap(clock, "/q.sock", "/img")
    qmp = BusyViewQMP(busy=3)
    d = Deferred.fromCoroutine(bitmap._deleteView(qmp, "view"))  # type: ignore[arg-type]
    while clock.getDelayedCalls():
        clock.advance(1)
    assert qmp.calls == ["blockdev-del"] * 4
    assert d.called and d.result is None


def test_viewRefusedOtherwiseFails() -> None:
    """Any other refusal of the view's removal is not retried."""
    from twisted.internet.task import Clock

    from xenmig.clients.qmp import QMPError

    bitmap = QEMUDirtyBitmap(Clock(), "/q.sock", "/img")
    qmp = BusyViewQMP(busy=1, desc="Cannot find node view")
    d = Deferred.fromCoroutine(bitmap._deleteView(qmp, "view"))  # type: ignore[arg-type]
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert qmp.calls == ["blockdev-del"]
    assert failures and failures[0].check(QMPError)


def test_viewInUseToTheEndIsLeftForLater() -> None:
    """
    A view QEMU counts in use through every retry does not fail the round,
    whose ranges were read: it is removed later, once QEMU lets it go.
    """
    from twisted.internet.task import Clock

    from xenmig.devices.disk.bitmapviews import VIEW_DELETE_ATTEMPTS

    clock = Clock()
    bitmap = QEMUDirtyBitmap(clock, "/q.sock", "/img")
    qmp = BusyViewQMP(busy=VIEW_DELETE_ATTEMPTS + 1)
    d = Deferred.fromCoroutine(bitmap._deleteView(qmp, "view"))  # type: ignore[arg-type]
    while clock.getDelayedCalls():
        clock.advance(1)
    assert d.called and d.result is None
    assert qmp.calls == ["blockdev-del"] * VIEW_DELETE_ATTEMPTS
    # still in use at the next round's start: kept for the one after
    d = Deferred.fromCoroutine(bitmap._deleteStrayViews(qmp))  # type: ignore[arg-type]
    assert d.called and bitmap._strayViews == ["view"]
    # let go: removed
    d = Deferred.fromCoroutine(bitmap._deleteStrayViews(qmp))  # type: ignore[arg-type]
    assert d.called and bitmap._strayViews == []
    assert qmp.calls == ["blockdev-del"] * (VIEW_DELETE_ATTEMPTS + 2)
