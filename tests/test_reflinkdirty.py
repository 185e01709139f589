"""
Reflink snapshots as the disk kind's source of changed blocks, on a real XFS
(``mkfs.xfs -m reflink=1`` on a loop device), and the extent comparison alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted
from test_disk import (
    FakeSourceContext,
    digestOf,
    makeSpec,
    prepare,
    pwrite,
    treeOf,
)
from twisted.internet.threads import deferToThread
from zope.interface.verify import verifyObject

from xenmig.devices.disk.reflinkdirty import (
    FIEMAP_EXTENT_UNWRITTEN,
    Extent,
    IQuiescedDirtyBlocks,
    ReflinkSnapshots,
    changedRanges,
)
from xenmig.devices.disk.source import DiskSource
from xenmig.errors import BadSpec, DeviceError
from xenmig.interfaces import IDirtyBlocks
from xenmig.model import DeviceSpec
from xenmig.source.convergence import FixedRounds

MiB = 1024 * 1024


def image(path: Path, data: int, size: int) -> Path:
    with open(path, "wb") as f:
        f.write(os.urandom(data))
        f.truncate(size)
    return path


# -- the comparison -------------------------------------------------------------------


def test_changed_ranges_compare_mappings() -> None:
    """Same blocks: unchanged, even when cut into other extents; other blocks, a
    hole on one side, an unwritten extent written, unreliable extents: changed;
    an unwritten extent and a hole (both read as zeros): unchanged."""
    K = 4096
    before = [
        Extent(0, 1000 * K, 10 * K, 0),
        Extent(10 * K, 2000 * K, 10 * K, 0),
        Extent(30 * K, 3000 * K, 5 * K, FIEMAP_EXTENT_UNWRITTEN),
        Extent(40 * K, 4000 * K, 4 * K, 0x4),  # delayed allocation
    ]
    after = [
        Extent(0, 1000 * K, 4 * K, 0),  # the same blocks, cut in two
        Extent(4 * K, 1004 * K, 2 * K, 0),
        Extent(6 * K, 5000 * K, 2 * K, 0),  # rewritten: new blocks
        Extent(8 * K, 1008 * K, 2 * K, 0),
        Extent(10 * K, 2000 * K, 6 * K, 0),  # the rest of it is a hole now
        Extent(25 * K, 6000 * K, K, 0),  # written into a hole
        Extent(30 * K, 3000 * K, 5 * K, 0),  # unwritten, then written in place
        Extent(40 * K, 4000 * K, 4 * K, 0),
    ]
    assert changedRanges(before, after, 50 * K) == [
        (6 * K, 8 * K),
        (16 * K, 20 * K),
        (25 * K, 26 * K),
        (30 * K, 35 * K),
        (40 * K, 44 * K),
    ]
    assert changedRanges(before, before[:2], 50 * K) == [(40 * K, 44 * K)]
    preallocated = Extent(20 * K, 7000 * K, 5 * K, FIEMAP_EXTENT_UNWRITTEN)
    assert changedRanges(before[:2], [*before[:2], preallocated], 50 * K) == []
    assert changedRanges([], [], 50 * K) == []


def test_changed_ranges_of_a_fragmented_map() -> None:
    """Thousands of extents in common cost nothing and change nothing; the one
    that differs is found."""
    K = 4096
    before = [Extent(i * 2 * K, 10**6 * K + i * 3 * K, K, 0) for i in range(20000)]
    after = list(before)
    after[12345] = Extent(12345 * 2 * K, 5 * K, K, 0)
    assert changedRanges(before, after, 40000 * K) == [(24690 * K, 24691 * K)]


# -- on XFS ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_collect_reports_each_intervals_writes(space: Path) -> None:
    path = image(space / "a.img", 16 * MiB, 64 * MiB)
    dirty = ReflinkSnapshots(str(path), deferToThread)
    verifyObject(IDirtyBlocks, dirty)
    await dirty.start()
    pwrite(str(path), b"x" * 4096, MiB)
    pwrite(str(path), b"y" * 8192, 5 * MiB + 4096)
    pwrite(str(path), b"z" * 4096, 40 * MiB)  # into a hole
    assert await dirty.collect() == [
        (MiB, MiB + 4096),
        (5 * MiB + 4096, 5 * MiB + 12288),
        (40 * MiB, 40 * MiB + 4096),
    ]
    assert await dirty.collect() == []
    pwrite(str(path), b"w" * 65536, 10 * MiB)
    assert await dirty.collect() == [(10 * MiB, 10 * MiB + 65536)]
    snapshots = [p for p in os.listdir(space) if p.endswith(".snap")]
    assert len(snapshots) == 1 and snapshots[0].startswith(".a.img.xenmig-")
    await dirty.stop()
    await dirty.stop()
    assert os.listdir(space) == ["a.img"]


@pytest_twisted.ensureDeferred
async def test_collect_quiesced_needs_no_snapshot(space: Path) -> None:
    """Once nothing writes the image, its own map (written back first) against
    the last snapshot's gives the last interval's writes, exactly, without a new
    snapshot; the filesystem's preallocations around them are not writes."""
    path = image(space / "a.img", 16 * MiB, 64 * MiB)
    dirty = ReflinkSnapshots(str(path), deferToThread)
    verifyObject(IQuiescedDirtyBlocks, dirty)
    with pytest.raises(DeviceError, match="not recording"):
        await dirty.settle()
    await dirty.start()
    for block in range(12):  # scattered writes, written back before a round
        pwrite(str(path), os.urandom(4096), block * MiB + 8192)
    await dirty.settle()
    assert len(await dirty.collect()) == 12
    snapshots = {p for p in os.listdir(space) if p.endswith(".snap")}
    pwrite(str(path), b"x" * 4096, 3 * MiB + 8192)  # again, not written back
    pwrite(str(path), b"y" * 8192, 20 * MiB)  # into a hole
    pwrite(str(path), bytes(MiB), 2 * MiB)  # zeros over data
    assert await dirty.collectQuiesced() == [
        (2 * MiB, 3 * MiB),
        (3 * MiB + 8192, 3 * MiB + 12288),
        (20 * MiB, 20 * MiB + 8192),
    ]
    assert {p for p in os.listdir(space) if p.endswith(".snap")} == snapshots
    await dirty.stop()
    assert os.listdir(space) == ["a.img"]


@pytest_twisted.ensureDeferred
async def test_a_filesystem_without_reflinks_is_named(tmp_path: Path) -> None:
    path = image(tmp_path / "a.img", MiB, 4 * MiB)
    dirty = ReflinkSnapshots(str(path), deferToThread)
    with pytest.raises(DeviceError, match="not on a filesystem with reflinks"):
        await dirty.start()
    assert os.listdir(tmp_path) == ["a.img"]


def test_qmp_and_reflink_together_are_refused(tmp_path: Path) -> None:
    spec = DeviceSpec.parse(f"disk:d0:path={tmp_path}/a,target=b,qmp=/q,reflink=1")
    with pytest.raises(BadSpec, match="qmp= or reflink="):
        DiskSource(spec, FakeSourceContext())


@pytest_twisted.ensureDeferred
async def test_live_disk_with_reflink_snapshots(space: Path, tmp_path: Path) -> None:
    """``reflink=1``: rounds after the first read only the blocks written, and
    the final round sends only the written pages; the target equals the image
    at the pause, and no snapshot is left."""
    path = image(space / "live.img", 24 * MiB, 64 * MiB)
    destination = str(tmp_path / "dest" / "out.img")
    spec = makeSpec(str(path), destination, reflink="1")
    source = DiskSource(spec, FakeSourceContext(), batchBlocks=4)
    migration = await prepare(tmp_path, str(path), destination, source=source)

    async def between(number: int) -> None:
        for block in (3, 9, 30 + number):
            pwrite(str(path), os.urandom(8192), block * MiB + 4096 * number)

    await migration.rounds(FixedRounds(3), between)
    assert [s.scannedBlocks for s in source.history] == [64, 3, 3]
    # The last writes, before the pause.
    pwrite(str(path), b"\x07" * 4096, 50 * MiB)  # into a hole
    pwrite(str(path), bytes(MiB), 2 * MiB)  # zeros over a data block
    pwrite(str(path), b"\x08" * 8192, 3 * MiB + 8192)  # a little into another
    digest = await migration.final()
    final = source.history[-1]
    assert (final.scannedBlocks, final.changedBlocks) == (3, 3)
    # Only the written pages travel.
    assert (final.dataBytes, final.zeroBytes) == (4096 + 8192, MiB)
    assert digest == await treeOf(str(path))
    assert await digestOf(destination) == await digestOf(str(path))
    assert sorted(os.listdir(space)) == ["live.img"]
