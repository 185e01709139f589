"""
The END record arriving while written batches are still queued: the digest and
the final fsync of a staged state cover every byte, for StagedFile and ImageStaging.

The operators' race: a batch finished, the paused stream was released before
the next queued batch started, the next record was END, and ``finish`` took
the digest and fsynced while batches were still queued (the old ``drained``
waited only for a batch in flight).  Here the thread pool is stepped by hand
(L{SteppedThreads}) and the real L{StreamReceiver} hands END over exactly then.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer
from zope.interface.verify import verifyObject

from xenmig.devices.disk.blockmap import treeAlgorithm, treeDigest
from xenmig.devices.disk.imagestaging import ImageStaging
from xenmig.devices.staging import StagedFile
from xenmig.digest import hashBytes
from xenmig.interfaces import IReceivingSession
from xenmig.model import ContentDigest
from xenmig.records import (
    DataRecord,
    EndRecord,
    Record,
    ZeroRecord,
    encodeEnd,
    encodeRecord,
    encodeStreamHeader,
)
from xenmig.streamreceiver import StreamReceiver
from xenmig.testing import FakeTargetContext, SteppedThreads

BLOCK = 4096
#: The thread-pool calls after which a staged state is durable: its last fsync.
FINAL_FSYNC = {"file": "fsync", "image": "_cut"}
#: The calls that fsync or take the digest: an adversarial pool runs them first.
FINISHING = frozenset(
    {"fsync", "ftruncate", "_cut", "hashFile", "table", "_hashBlocks"}
)


@implementer(IReceivingSession)
class StagingSession:
    """
    The session a stream hands records to, reduced to one staged state: records
    go to it, END starts its finish; what the pool held at that moment is kept.
    """

    migrationId = "m-race"

    def __init__(
        self,
        clock: task.Clock,
        pool: SteppedThreads,
        staged: StagedFile,
        finish: Callable[[EndRecord], Any],
        flushBefore: frozenset[int] = frozenset(),
    ) -> None:
        self.clock = clock
        self.pool = pool
        self.staged = staged
        self.finish = finish
        self.flushBefore = flushBefore
        self.received = 0
        self.outcome: list[ContentDigest | Failure] = []
        self.atEnd: tuple[list[str], int] | None = None
        self.failed: list[str] = []

    def recordReceived(self, name: str, record: Record) -> Deferred[None] | None:
        assert isinstance(record, DataRecord | ZeroRecord)
        if self.received in self.flushBefore and isinstance(self.staged, ImageStaging):
            self.staged.flushInBackground()  # a pre-copy round's background fsync
        self.received += 1
        return self.staged.receive(record)

    def streamEnded(self, name: str, end: EndRecord) -> Deferred[None]:
        self.atEnd = (self.pool.names, recordsIn(self.pool, "_writeBatch"))
        d = Deferred.fromCoroutine(self.finish(end))
        return d.addBoth(self.outcome.append)

    def streamLost(self, name: str, why: str) -> None:
        self.failed.append(why)

    def deviceFailed(self, name: str, error: BaseException) -> None:
        self.failed.append(str(error))


def recordsIn(pool: SteppedThreads, name: str) -> int:
    """How many records the batches ``name`` that ran so far held."""
    return sum(len(call.args[0]) for call in pool.ran if call.name == name)


@dataclass
class Staging:
    """A staged state of one kind, fed by a real stream receiver over a stepped pool."""

    kind: str
    path: Path
    size: int
    pool: SteppedThreads
    clock: task.Clock
    session: StagingSession
    receiver: StreamReceiver
    transport: StringTransport

    held: bytes | None = None

    def step(self, name: str | None = None) -> None:
        """
        Run one waiting call (the oldest, or the oldest of ``name``); after the
        last fsync, keep what the staged file held right then.
        """
        if self.pool.run(name).name == FINAL_FSYNC[self.kind]:
            self.held = self.path.read_bytes()

    def durableAt(self) -> tuple[int, bytes | None]:
        """
        Run every waiting call, those that fsync or take the digest before any
        other (the order that exposes a write left behind); the position in the
        run log of the last fsync, and what the staged file held right after it.
        """
        while self.pool.waiting:
            finishing = [name for name in self.pool.names if name in FINISHING]
            self.step(finishing[0] if finishing else None)
        return lastIndex(self.pool, FINAL_FSYNC[self.kind]), self.held


def lastIndex(pool: SteppedThreads, name: str) -> int:
    return max(i for i, call in enumerate(pool.ran) if call.name == name)


def makeStaging(
    kind: str,
    directory: Path,
    size: int,
    high: int,
    low: int,
    batch: int,
    flushBefore: frozenset[int] = frozenset(),
) -> Staging:
    pool, clock = SteppedThreads(), task.Clock()
    context = FakeTargetContext(clock, [str(directory)], str(directory / "staging"))
    context.runInThread = pool  # type: ignore[assignment]
    path = directory / "staging" / "state.part"
    marks: dict[str, Any] = {"highWater": high, "lowWater": low, "maxBatch": batch}
    staged: StagedFile
    finish: Callable[[EndRecord], Any]
    if kind == "file":
        staged = StagedFile(context, FilePath(str(path)), size, **marks)
        finish = lambda end: staged.finish()  # noqa: E731
    else:
        image = ImageStaging(
            context, FilePath(str(path)), size, blockSize=BLOCK, **marks
        )
        staged, finish = image, lambda end: image.finishImage(end.size)
    opened = Deferred.fromCoroutine(staged.open())
    pool.runAll()
    assert opened.called
    session = StagingSession(clock, pool, staged, finish, flushBefore)
    assert verifyObject(IReceivingSession, session)
    receiver = StreamReceiver(session, "state", 60.0)
    transport = StringTransport()
    receiver.makeConnection(transport)
    return Staging(kind, path, size, pool, clock, session, receiver, transport)


def contentOf(size: int, records: list[DataRecord | ZeroRecord]) -> bytes:
    """What the records make of a state of ``size`` bytes, applied in order."""
    content = bytearray(size)
    for record in records:
        if isinstance(record, DataRecord):
            content[record.offset : record.offset + len(record.data)] = record.data
        else:
            content[record.offset : record.offset + record.length] = bytes(
                record.length
            )
    return bytes(content)


def digestOf(kind: str, content: bytes) -> ContentDigest:
    """The digest each kind's finish must return for ``content``."""
    if kind == "file":
        return hashBytes(content)
    digests = b"".join(
        blake3.blake3(content[i : i + BLOCK]).digest()
        for i in range(0, len(content), BLOCK)
    )
    return treeDigest(len(content), BLOCK, digests)


def streamOf(kind: str, size: int, records: list[DataRecord | ZeroRecord]) -> bytes:
    """The stream bytes: header, the records, and END with the content's digest."""
    digest = digestOf(kind, contentOf(size, records))
    algorithm = digest.algorithm if kind == "file" else treeAlgorithm(BLOCK)
    body = [piece for record in records for piece in encodeRecord(record)]
    return b"".join(
        [encodeStreamHeader(), *body, *encodeEnd(size, algorithm, digest.digest)]
    )


def blocks(count: int) -> list[DataRecord | ZeroRecord]:
    """``count`` whole blocks of distinct bytes, in offset order."""
    return [DataRecord(i * BLOCK, bytes([i + 1]) * BLOCK) for i in range(count)]


def assertCovered(staging: Staging, records: list[DataRecord | ZeroRecord]) -> None:
    """The digest and the last fsync cover every byte; nothing is written after."""
    fsynced, held = staging.durableAt()
    content = contentOf(staging.size, records)
    assert staging.session.failed == []
    assert staging.session.outcome == [digestOf(staging.kind, content)]
    assert held == content
    writes = [i for i, c in enumerate(staging.pool.ran) if c.name == "_writeBatch"]
    assert writes and max(writes) < fsynced
    assert recordsIn(staging.pool, "_writeBatch") == len(records)
    assert staging.path.read_bytes() == content
    assert staging.pool.waiting == [] and staging.clock.getDelayedCalls() == []
    Deferred.fromCoroutine(staging.session.staged.discard())
    staging.pool.runAll()
    assert not staging.path.exists()


# -- the interleaving, step by step ----------------------------------------------------


def test_stagedFileEndWhileBatchesQueued(tmp_path: Path) -> None:
    """StagedFile's digest and fsync cover batches still queued when END arrives."""
    records = blocks(4)
    staging = makeStaging("file", tmp_path, 4 * BLOCK, 3 * BLOCK, 2 * BLOCK, BLOCK)
    staging.receiver.dataReceived(streamOf("file", 4 * BLOCK, records))
    assert staging.transport.producerState == "paused"  # four queued: above high
    staging.step("_writeBatch")  # block 0; block 1's batch starts
    assert staging.session.atEnd is None
    staging.step("_writeBatch")  # block 1: down to the low mark, END comes
    # END was handed over with two batches queued and none in the thread pool.
    assert staging.session.atEnd == ([], 2)
    assert staging.session.outcome == []
    assertCovered(staging, records)


@pytest.mark.parametrize("last", ["_writeBatch", "_hashBatch"])
def test_imageEndWhileBatchesQueued(tmp_path: Path, last: str) -> None:
    """
    ImageStaging's digest and fsync cover batches still queued when END arrives,
    whether the writes or the block hashes are the ones left queued.
    """
    other = "_hashBatch" if last == "_writeBatch" else "_writeBatch"
    records = blocks(4)
    staging = makeStaging("image", tmp_path, 4 * BLOCK, 3 * BLOCK, 2 * BLOCK, BLOCK)
    staging.receiver.dataReceived(streamOf("image", 4 * BLOCK, records))
    assert staging.transport.producerState == "paused"
    while other in staging.pool.names:  # that pipeline goes through...
        staging.step(other)
    staging.step(last)
    assert staging.session.atEnd is None
    staging.step(last)  # ...this one gets down to its low mark: END comes
    # END was handed over with two of this pipeline's batches queued, none
    # in the thread pool, and the other pipeline done.
    assert staging.session.atEnd == ([], 2 if last == "_writeBatch" else 4)
    assert recordsIn(staging.pool, last) == 2
    assertCovered(staging, records)


# -- every interleaving of the pool ----------------------------------------------------


@st.composite
def streams(draw: st.DrawFn) -> tuple[int, list[DataRecord | ZeroRecord]]:
    """
    A state size and records for it: whole blocks mostly, and some pieces that
    start or end inside a block, overlap earlier ones, or are zeros.
    """
    count = draw(st.integers(1, 6))
    size = count * BLOCK - draw(st.sampled_from([0, 0, 0, 100]))
    records: list[DataRecord | ZeroRecord] = []
    for n in range(draw(st.integers(1, 8))):
        offset = min(draw(st.integers(0, 2 * count - 1)) * BLOCK // 2, size - 1)
        length = min(
            draw(st.sampled_from([BLOCK, BLOCK, 2 * BLOCK, 700])), size - offset
        )
        if draw(st.integers(0, 5)) == 0:
            records.append(ZeroRecord(offset, length))
        else:
            records.append(DataRecord(offset, bytes([n + 1]) * length))
    return size, records


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    kind=st.sampled_from(["file", "image"]),
    stream=streams(),
    marks=st.sampled_from([(2, 1, 1), (3, 2, 1), (4, 1, 2), (6, 4, 3), (1, 0, 1)]),
    flushBefore=st.frozensets(st.integers(0, 8), max_size=2),
    data=st.data(),
)
def test_everyInterleavingCoversEveryByte(
    kind: str,
    stream: tuple[int, list[DataRecord | ZeroRecord]],
    marks: tuple[int, int, int],
    flushBefore: frozenset[int],
    data: st.DataObject,
) -> None:
    """
    Whatever order the pool runs its calls in until END arrives, the digest a
    staged state returns and its last fsync cover every record of the stream.
    """
    size, records = stream
    high, low, batch = (BLOCK * m for m in marks)
    with tempfile.TemporaryDirectory() as directory:
        staging = makeStaging(
            kind, Path(directory), size, high, low, batch, flushBefore
        )
        staging.receiver.dataReceived(streamOf(kind, size, records))
        while staging.pool.waiting and staging.session.atEnd is None:
            staging.step(data.draw(st.sampled_from(staging.pool.names)))
        assertCovered(staging, records)  # from here on, fsync and digest first


# -- a finish that outlives its staging ------------------------------------------------


def test_discardWaitsForFinishOnTheDescriptor(tmp_path: Path) -> None:
    """
    A staging discarded while its finish cuts the file closes the descriptor
    only after that call: the number, reused by another file, is never cut.
    """
    pool, clock = SteppedThreads(), task.Clock()
    context = FakeTargetContext(clock, [str(tmp_path)], str(tmp_path / "staging"))
    context.runInThread = pool  # type: ignore[assignment]
    # As the devmodel kind stages: size unknown until END, which cuts the file.
    staged = StagedFile(
        context, FilePath(str(tmp_path / "state.part")), 0, maxSize=8192
    )
    Deferred.fromCoroutine(staged.open())
    pool.runAll()
    fd = staged.fd
    assert fd is not None
    staged.receive(DataRecord(0, b"s" * 5000))
    finished: list[Any] = []
    Deferred.fromCoroutine(staged.finish(5000)).addBoth(finished.append)
    pool.run("_writeBatch")
    assert finished == [] and pool.waiting  # the finish's calls on the file wait
    discarded: list[Any] = []
    Deferred.fromCoroutine(staged.discard()).addBoth(discarded.append)
    # A pool thread may take the discard's close before the finish's call...
    closedUnder = "_discard" in pool.names
    if closedUnder:
        pool.run("_discard")
    # ...and another migration's staging then gets the same number.
    victim = tmp_path / "another-migration.part"
    victim.write_bytes(b"v" * 100)
    reused = os.open(victim, os.O_RDWR)
    if closedUnder and reused != fd:
        os.dup2(reused, fd)
        os.close(reused)
        reused = fd
    try:
        pool.runAll()
        assert victim.read_bytes() == b"v" * 100
    finally:
        os.close(reused)
    assert discarded == [None] and not (tmp_path / "state.part").exists()
    [outcome] = finished
    assert isinstance(outcome, Failure)  # discarded under it: no digest


# -- the stepped pool itself -----------------------------------------------------------


def test_steppedThreadsRunWhenTold() -> None:
    """Calls wait in order until run, by age or by name; their results come back."""
    pool = SteppedThreads()
    first, second = pool(lambda: "a"), pool(os.getpid)
    outcomes: list[Any] = []
    first.addBoth(outcomes.append)
    second.addBoth(outcomes.append)
    assert pool.names == ["<lambda>", "getpid"] and outcomes == []
    pool.run("getpid")
    assert outcomes == [os.getpid()]
    assert pool.runAll() == 1 and outcomes == [os.getpid(), "a"]
    assert [call.name for call in pool.ran] == ["getpid", "<lambda>"]
    with pytest.raises(LookupError):
        pool.run()


def test_steppedThreadsFailOnCueAndCrash() -> None:
    """A cued fault fails the next call of its name; a crash forgets what waits."""
    pool = SteppedThreads()
    pool.failNext("getpid", OSError(28, "No space left on device"))
    assert pool.cued == ["getpid"]
    failed: list[Any] = []
    pool(os.getpid).addBoth(failed.append)
    pool.run()
    assert pool.cued == []
    assert isinstance(failed[0], Failure) and failed[0].check(OSError)
    assert pool.runAll() == 0
    lost: list[Any] = []
    pool(os.getpid).addBoth(lost.append)
    cancelled = pool(os.getpid)
    cancelled.cancel()  # fails at once; the call itself still waits to run
    assert pool.names == ["getpid", "getpid"]
    assert cancelled.addErrback(lambda f: f.check(CancelledError)).result
    assert len(pool.crash()) == 2 and pool.waiting == [] and lost == []
