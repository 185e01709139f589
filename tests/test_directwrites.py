"""
Large DATA records assembled in page-aligned blocks, and staged files written
from them with direct I/O: the bytes and the digests are those of the records.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from test_disk import PipeWriter, prepare, treeOf
from test_stagingrace import contentOf
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer
from zope.interface.verify import verifyObject

from xenmig.devices.staging import StagedFile
from xenmig.digest import hashBytes
from xenmig.fs import DIRECT_ALIGN, directlyWritable, openDirect
from xenmig.interfaces import IReceivingSession
from xenmig.model import ContentDigest
from xenmig.records import (
    BLOCK_MINIMUM,
    DataRecord,
    EndRecord,
    Record,
    RecordParser,
    ZeroRecord,
    encodeEnd,
    encodeRecord,
    encodeStreamHeader,
)
from xenmig.source.convergence import FixedRounds
from xenmig.streamreceiver import StreamReceiver, alignedBlock
from xenmig.testing import FakeTargetContext, SteppedThreads

KiB = 1024


def encoded(records: list[Any]) -> bytes:
    return encodeStreamHeader() + b"".join(
        b"".join(encodeRecord(record)) for record in records
    )


def aligned(data: bytes) -> memoryview:
    """``data`` copied into a page-aligned block, as the stream receiver makes it."""
    block = alignedBlock(len(data))
    block[:] = data
    return block


def directSupported(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"")
    fd = openDirect(str(probe))
    if fd is None:
        return False
    os.close(fd)
    return True


# -- the parser ------------------------------------------------------------------------


def largeRecords() -> list[Record]:
    return [
        DataRecord(0, b"small"),
        DataRecord(8 * KiB, os.urandom(BLOCK_MINIMUM)),
        ZeroRecord(BLOCK_MINIMUM + 8 * KiB, 4096),
        DataRecord(256 * KiB, os.urandom(200 * KiB + 13)),  # padded on the wire
        DataRecord(512 * KiB, os.urandom(BLOCK_MINIMUM - 8)),  # below the minimum
    ]


@pytest.mark.parametrize("step", [1000, 4096, 65536])
def test_parserAssemblesLargeDataInBlocks(step: int) -> None:
    """Large DATA records arriving in parts come out equal, each in a block."""
    records = largeRecords()
    stream = encoded(records)
    blocks: list[memoryview] = []

    def allocate(size: int) -> memoryview:
        blocks.append(alignedBlock(size))
        return blocks[-1]

    parser = RecordParser(allocate=allocate)
    out: list[Record] = []
    for start in range(0, len(stream), step):
        out.extend(parser.feed(stream[start : start + step]))
    assert out == records
    assert parser.buffered == 0 and parser.bytesParsed == len(stream)
    # The two records of at least BLOCK_MINIMUM bytes, and only they, got blocks.
    assert len(blocks) == 2
    for record, block in zip([out[1], out[3]], blocks, strict=True):
        assert isinstance(record, DataRecord)
        assert record.data.obj is block.obj  # type: ignore[attr-defined]
        assert directlyWritable(record.data, 0) == (len(record.data) % 4096 == 0)


def test_parserLeavesRecordsArrivedWholeInPlace() -> None:
    """A large record that arrives whole is a view of what was fed: no block."""
    records = largeRecords()
    blocks: list[int] = []
    parser = RecordParser(
        allocate=lambda size: blocks.append(size) or alignedBlock(size)
    )
    assert parser.feed(encoded(records)) == records
    assert blocks == []


def test_blockFilledTakesBytesWrittenStraightIn() -> None:
    """Bytes written into blockSpace, declared by blockFilled, complete the record."""
    records = largeRecords()
    stream = memoryview(encoded(records))
    parser = RecordParser(allocate=alignedBlock)
    out: list[Record] = []
    position = 0
    while position < len(stream):
        space = parser.blockSpace()
        if space is None:  # a plain read: a few bytes, as the bulk reader does
            out.extend(parser.feed(stream[position : position + 3000]))
            position += 3000
            continue
        count = min(len(space), 50000)
        space[:count] = stream[position : position + count]
        position += count
        assert parser.buffered > 0
        out.extend(parser.blockFilled(count))
    assert out == records
    assert parser.blockSpace() is None and parser.buffered == 0


def test_directlyWritableNeedsAlignmentEverywhere() -> None:
    """Only page-aligned writable memory of whole pages at a page offset qualifies."""
    block = aligned(os.urandom(2 * DIRECT_ALIGN))
    assert directlyWritable(block, DIRECT_ALIGN)
    assert not directlyWritable(block, 512)  # the offset
    assert not directlyWritable(block[: DIRECT_ALIGN + 1], 0)  # the length
    assert not directlyWritable(block[512 : 512 + DIRECT_ALIGN], 0)  # the memory
    assert not directlyWritable(bytes(block), 0)  # read-only: address unknown
    assert not directlyWritable(block[:0], 0)


# -- staged files ----------------------------------------------------------------------


def staged(tmp_path: Path, size: int) -> tuple[StagedFile, SteppedThreads]:
    pool = SteppedThreads()
    context = FakeTargetContext(task.Clock(), [str(tmp_path)], str(tmp_path / "st"))
    context.runInThread = pool  # type: ignore[assignment]
    staging = StagedFile(
        context, FilePath(str(tmp_path / "st" / "state.part")), size, maxBatch=10**9
    )
    Deferred.fromCoroutine(staging.open())
    pool.runAll()
    return staging, pool


def test_mixedBatchWritesEveryRecordInOrder(tmp_path: Path) -> None:
    """
    One batch mixing aligned blocks (direct I/O), unaligned data, rewrites of
    earlier ranges and zero ranges leaves the file as the records say, in order.
    """
    if not directSupported(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem has no O_DIRECT")
    page = DIRECT_ALIGN
    size = 40 * page + 100
    records: list[DataRecord | ZeroRecord] = [
        DataRecord(0, aligned(os.urandom(4 * page))),  # direct, contiguous ...
        DataRecord(4 * page, aligned(os.urandom(4 * page))),  # ... with this one
        DataRecord(2 * page + 7, os.urandom(300)),  # through the cache, over them
        DataRecord(page, aligned(os.urandom(page))),  # direct again, over that
        ZeroRecord(6 * page, page),  # a hole punched in direct data
        DataRecord(10 * page, os.urandom(3 * page)),  # read-only: the cache
        DataRecord(10 * page, aligned(os.urandom(2 * page))),  # rewritten directly
        DataRecord(39 * page, aligned(os.urandom(page))),
        DataRecord(40 * page, os.urandom(100)),  # the short tail
    ]
    staging, pool = staged(tmp_path, size)
    for record in records:
        staging.receive(record)
    finished = Deferred.fromCoroutine(staging.finish())
    pool.runAll()
    expected = contentOf(size, records)
    assert finished.result == hashBytes(expected)
    assert Path(staging.path.path).read_bytes() == expected
    assert staging.directBytes == 12 * page
    Deferred.fromCoroutine(staging.discard())
    pool.runAll()


def _refuseDirect(staging: StagedFile) -> None:
    """As on a filesystem without O_DIRECT: no direct descriptor."""
    if staging._direct is not None:
        os.close(staging._direct)
        staging._direct = None


@pytest.mark.parametrize(
    "how",
    [_refuseDirect, StagedFile.throughCache],
    ids=["no-direct-descriptor", "throughCache"],
)
def test_alignedRecordsThroughTheCache(
    tmp_path: Path, how: Callable[[StagedFile], None]
) -> None:
    """
    Where no direct descriptor exists, or after throughCache, aligned records
    go through the page cache, intact.
    """
    page = DIRECT_ALIGN
    records = [DataRecord(i * page, aligned(os.urandom(page))) for i in range(4)]
    staging, pool = staged(tmp_path, 4 * page)
    how(staging)
    for record in records:
        staging.receive(record)
    finished = Deferred.fromCoroutine(staging.finish())
    pool.runAll()
    expected = contentOf(4 * page, records)
    assert finished.result == hashBytes(expected)
    assert Path(staging.path.path).read_bytes() == expected
    assert staging.directBytes == 0


@implementer(IReceivingSession)
class OneFile:
    """A session reduced to one staged file: records go to it, END finishes it."""

    migrationId = "m-direct"

    def __init__(self, clock: task.Clock, staging: StagedFile) -> None:
        self.clock = clock
        self.staging = staging
        self.outcome: list[ContentDigest | Failure] = []
        self.failed: list[str] = []

    def recordReceived(self, name: str, record: Record) -> Deferred[None] | None:
        assert isinstance(record, DataRecord | ZeroRecord)
        return self.staging.receive(record)

    def streamEnded(self, name: str, end: EndRecord) -> Deferred[None]:
        return Deferred.fromCoroutine(self.staging.finish()).addBoth(
            self.outcome.append
        )

    def streamLost(self, name: str, why: str) -> None:
        self.failed.append(why)

    def deviceFailed(self, name: str, error: BaseException) -> None:
        self.failed.append(str(error))


def test_receivedStreamIsWrittenDirectly(tmp_path: Path) -> None:
    """A stream of megabyte records reaches the staged file with direct I/O."""
    if not directSupported(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem has no O_DIRECT")
    MiB = 1024 * KiB
    size = 3 * MiB + 5000
    records: list[DataRecord | ZeroRecord] = [
        DataRecord(0, os.urandom(MiB)),
        ZeroRecord(MiB, MiB),
        DataRecord(2 * MiB, os.urandom(MiB)),
        DataRecord(3 * MiB, os.urandom(5000)),
    ]
    expected = contentOf(size, records)
    digest = hashBytes(expected)
    stream = encoded(records) + b"".join(encodeEnd(size, "blake3", digest.digest))
    staging, pool = staged(tmp_path, size)
    clock = task.Clock()
    session = OneFile(clock, staging)
    assert verifyObject(IReceivingSession, session)
    receiver = StreamReceiver(session, "state", 60.0)
    receiver.makeConnection(StringTransport())
    for start in range(0, len(stream), 70000):  # chunks as a socket gives them
        receiver.dataReceived(stream[start : start + 70000])
        pool.runAll()
    pool.runAll()
    assert session.failed == []
    assert session.outcome == [digest]
    assert Path(staging.path.path).read_bytes() == expected
    assert staging.directBytes == 2 * MiB
    Deferred.fromCoroutine(staging.discard())
    pool.runAll()


# -- the disk kind: direct in one pass, through the cache when live ----------------


class AlignedPipe(PipeWriter):
    """A pipe whose DATA records arrive in page-aligned blocks, as from a stream."""

    def writeData(self, offset: int, data: bytes) -> Deferred[None]:
        return super().writeData(offset, aligned(bytes(data)))  # type: ignore[arg-type]


@pytest.mark.parametrize("live", [False, True])
@pytest_twisted.ensureDeferred
async def test_diskImageWrittenDirectlyOnlyInOnePass(
    tmp_path: Path, live: bool
) -> None:
    """
    A disk image sent in one pass is staged with direct I/O; one sent in live
    rounds through the page cache (the final round reads blocks back from
    it).  Both arrive intact.
    """
    if not directSupported(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem has no O_DIRECT")
    MiB = 1024 * KiB
    image = str(tmp_path / "a.img")
    with open(image, "wb") as f:
        f.write(os.urandom(4 * MiB))
    migration = await prepare(tmp_path, image)
    migration.writer = AlignedPipe(migration.target)
    if live:
        await migration.rounds(FixedRounds(1))
    digest = await migration.final()
    assert digest == await treeOf(str(tmp_path / "dest" / "out.img"))
    staging = migration.target.staged
    assert staging is not None
    assert staging.directBytes == (0 if live else 4 * MiB)
