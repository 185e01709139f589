"""Receiving a disk image in rounds: staged, its blocks hashed as they are written."""

from __future__ import annotations

import os
from typing import Any

import blake3
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from xenmig.devices.disk.blockmap import (
    BLOCK_SIZE,
    DIGEST_SIZE,
    UNKNOWN,
    treeDigest,
    zeroDigest,
)
from xenmig.devices.disk.leaves import (
    LEAF_SIZE,
    VALUE_SIZE,
    LeafTables,
    blockTable,
    leafValues,
    rootOf,
    zeroTable,
)
from xenmig.devices.staging import StagedFile, recordWeight
from xenmig.errors import DeviceError
from xenmig.interfaces import ITargetContext
from xenmig.model import ContentDigest
from xenmig.pump import BatchPump
from xenmig.records import DataRecord, MetadataRecord, RoundRecord, ZeroRecord

#: Coverage mark of a block written in a way its digest does not follow.
STALE = -1


log = Logger()

#: What the hashing pipeline takes: records, and marks between them.
_Hashed = DataRecord | ZeroRecord | RoundRecord | MetadataRecord


#: Threads that read back and hash the blocks not known from the records.
READ_BACK_THREADS = 2


class BlockDigests:
    """
    The blake3 digest of every block of a staged image, taken from the records
    written into it, in the order they are written; blocking, for one thread at
    a time.

    A source sends every changed block whole, in offset order (DATA and ZERO
    pieces from its start to its end), so each block is hashed as its pieces
    pass, and a later round's copy of a block replaces the earlier digest.
    From the second round on (L{startRound}), a block received whole also gets
    a leaf table (L{xenmig.devices.disk.leaves}), and later pieces of it that
    cover whole leaves update the table: the block's digest is then the root
    over it, with nothing read back.  A block written any other way (from its
    middle, or only partly, without a table) is marked stale and hashed from
    the staged file at the end; a block never written is a hole.  The table is
    then what the source's block map holds, and the content digest
    (L{treeDigest}) costs only what the last round changed.
    """

    def __init__(self, blockSize: int = BLOCK_SIZE) -> None:
        self.blockSize = blockSize
        self._zeros = bytes(blockSize)
        self._hole = zeroDigest(blockSize)
        self._digests = bytearray()  # a hole's digest until a block is written
        self._count = 0  # blocks with a digest entry
        self._short: dict[int, int] = {}  # block -> bytes hashed, if not whole
        self._current = -1
        self._hasher: Any = None
        self._position = 0
        #: Leaf tables of blocks received whole after the first round.
        self.tables = LeafTables(blockSize)
        self._leafy = False
        self._always = False  # the source uses leaf tables: from round 0 on
        self._round = 0
        self._final = False
        self._buffer = bytearray()
        self._rootless: set[int] = set()  # blocks whose table changed since

    def startRound(self, round: int, final: bool = False) -> None:
        """
        The records that follow belong to ``round``.  The ``final`` round keeps
        no new tables (none would be used), but its pieces still go into those
        there are.
        """
        self._close()
        self._round, self._final = round, final
        self._leafy = (
            not final and (round >= 1 or self._always) and self.tables.most > 0
        )

    def keepLeaves(self) -> None:
        """Keep leaf tables of the blocks received whole from now on, this round
        too (the source keeps them from its first round)."""
        self._always = True
        self.startRound(self._round, self._final)

    def add(self, offset: int, length: int, data: bytes | None = None) -> None:
        """``length`` bytes at ``offset`` were written: ``data``, or zeros if None."""
        view = memoryview(data) if data is not None else None
        end = offset + length
        position = offset
        while position < end:
            index = position // self.blockSize
            start = index * self.blockSize
            stop = min(end, start + self.blockSize)
            piece = None if view is None else view[position - offset : stop - offset]
            if index != self._current or position != self._position:
                self._close()
                if position != start:
                    self._partial(index, position, stop, piece)
                    position = stop
                    continue
                if view is None and stop == start + self.blockSize:
                    self._set(index, self._hole, self.blockSize)
                    if self._leafy:
                        self._keepTable(index, bytearray(zeroTable(self.blockSize)))
                    else:
                        self.tables.drop(index)
                    position = stop
                    continue
                self._current, self._hasher = index, None
                # Into the buffer, for the leaves: a block with a table (a piece
                # from its start may be all that comes), or one to keep a table of.
                tabled = self.tables.get(index) is not None
                if tabled or (self._leafy and self.tables.room(index)):
                    if not self._buffer:
                        self._buffer = bytearray(self.blockSize)
                else:
                    self._hasher = blake3.blake3()
            if self._hasher is None:
                where = self._buffer
                if piece is None:
                    where[position - start : stop - start] = self._zeros[
                        : stop - position
                    ]
                else:
                    where[position - start : stop - start] = piece
            elif piece is None:
                self._hasher.update(memoryview(self._zeros)[: stop - position])
            else:
                self._hasher.update(piece)
            self._position = position = stop
            if stop == start + self.blockSize:
                self._close()

    def _close(self) -> None:
        """Record the digest of the block being hashed, as far as it was written."""
        if self._current < 0:
            return
        index, self._current = self._current, -1
        covered = self._position - index * self.blockSize
        hasher, self._hasher = self._hasher, None
        if hasher is not None:
            self._set(index, hasher.digest(), covered)
            self.tables.drop(index)
        elif covered == self.blockSize:
            table, digest = blockTable(self._buffer)
            self._set(index, digest, covered)
            self._keepTable(index, table)
        else:
            start = index * self.blockSize
            prefix = memoryview(self._buffer)[:covered]
            if not self._partial(index, start, start + covered, prefix, stale=False):
                self.tables.drop(index)  # its leaves no longer say what it holds
                self._set(index, blake3.blake3(prefix).digest(), covered)

    def _keepTable(self, index: int, table: bytearray) -> None:
        if not (self._leafy and self.tables.put(index, table)):
            self.tables.drop(index)

    def _partial(
        self,
        index: int,
        lo: int,
        hi: int,
        data: memoryview | None,
        stale: bool = True,
    ) -> bool:
        """
        Bytes ``[lo, hi)`` of block ``index`` were written: update its leaf
        table if it has one and they are whole leaves, else (if ``stale``) mark
        the block to be read back.  Whether the table took them.
        """
        table = self.tables.get(index)
        first, last = divmod(lo - index * self.blockSize, LEAF_SIZE)
        stop, rest = divmod(hi - index * self.blockSize, LEAF_SIZE)
        if table is not None and not last and not rest:
            where = slice(first * VALUE_SIZE, stop * VALUE_SIZE)
            if data is None:
                table[where] = zeroTable(self.blockSize)[where]
            else:
                table[where] = leafValues(data, first)
            self._rootless.add(index)
            return True
        if stale:
            self._set(index, UNKNOWN, STALE)
            self.tables.drop(index)
        return False

    def _set(self, index: int, digest: bytes, covered: int) -> None:
        if index >= self._count:
            self._digests += self._hole * (index + 1 - self._count)
            self._count = index + 1
        self._digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = digest
        self._rootless.discard(index)
        if covered == self.blockSize:
            self._short.pop(index, None)
        else:
            self._short[index] = covered

    @property
    def rootless(self) -> frozenset[int]:
        """The blocks whose digests their leaf tables will give (at L{table})."""
        return frozenset(self._rootless)

    def _roots(self) -> None:
        """The digests of the blocks whose leaf tables changed: their roots."""
        for index in sorted(self._rootless):
            table = self.tables.get(index)
            assert table is not None
            self._set(index, rootOf(table), self.blockSize)

    def table(self, size: int) -> tuple[bytearray, list[int]]:
        """
        The digests of the blocks of an image of ``size`` bytes, and the blocks
        whose digest is not known from the records (to hash from the file).
        """
        self._close()
        self._roots()
        count = -(-size // self.blockSize)
        digests = self._digests[: count * DIGEST_SIZE]
        digests += self._hole * (count - min(count, self._count))
        unknown = sorted(i for i in self._short if i < count)
        tail = size - (count - 1) * self.blockSize
        last = count - 1
        if count and tail != self.blockSize:  # a short last block
            if last >= self._count:  # never written: a hole
                digests[last * DIGEST_SIZE :] = zeroDigest(tail)
            elif self._short.get(last) == tail:  # hashed to its end
                unknown.remove(last)
            elif last not in self._short:  # a hole, or hashed whole: read it
                unknown.append(last)
        return digests, unknown


class ImageStaging(StagedFile):
    """
    A L{StagedFile} for an image received in rounds, which hashes it itself.

    - Records may reach ``maxSize``: a qcow2 container grows while the guest runs;
      the END record's size cuts it (L{finishImage}).
    - Rounds rewrite earlier blocks, so one running hash of the stream would not
      do: the blocks are hashed from the records (L{BlockDigests}) in a second
      pipeline in the thread pool, beside the writes, and the content digest is a
      tree over them.  The paused window hashes only the last round's blocks.
    - Each pre-copy round is fsynced in the background as the next one starts.
    """

    def __init__(
        self,
        context: ITargetContext,
        path: FilePath,
        size: int,
        maxSize: int | None = None,
        blockSize: int = BLOCK_SIZE,
        **kwargs: Any,
    ) -> None:
        super().__init__(context, path, size, maxSize=maxSize, hashing=False, **kwargs)
        self.blocks = BlockDigests(blockSize)
        self._hashes: BatchPump[_Hashed] = BatchPump(
            context.runInThread,
            self._hashBatch,
            _weight,
            self.highWater,
            self.lowWater,
            self.maxBatch,
        )
        self._flushing = False

    # -- receiving ----------------------------------------------------------------

    def receive(self, record: DataRecord | ZeroRecord) -> Deferred[None] | None:
        """Queue one record to be written and hashed; a Deferred means: wait."""
        if self._hashes.failure is not None:
            self._hashes.failure.raiseException()
        waiting = super().receive(record)
        hashing = self._hashes.put(record)
        if hashing is not None:
            waiting = hashing if waiting is None else _all([waiting, hashing])
        return waiting

    def startRound(self, round: int, final: bool = False) -> None:
        """The records that follow belong to ``round`` (in order with them)."""
        self._mark(RoundRecord(round, final))

    def keepLeaves(self) -> None:
        """The source uses leaf tables: keep them for the records that follow."""
        self._mark(MetadataRecord({}))

    def _mark(self, marker: RoundRecord | MetadataRecord) -> None:
        if self._hashes.failure is None:
            waiting = self._hashes.put(marker)
            if waiting is not None:  # the records' own waits carry any failure
                waiting.addErrback(lambda _: None)

    def _hashBatch(self, batch: list[_Hashed]) -> None:
        for record in batch:
            if isinstance(record, DataRecord):
                self.blocks.add(record.offset, len(record.data), record.data)
            elif isinstance(record, ZeroRecord):
                self.blocks.add(record.offset, record.length)
            elif isinstance(record, RoundRecord):
                self.blocks.startRound(record.round, record.final)
            else:
                self.blocks.keepLeaves()

    def writingFailed(self, failure: Failure) -> None:
        # Hashing stops with the writes: whoever waits on it must hear why.
        self._hashes.stop(failure)

    @property
    def _stopped(self) -> bool:
        return (
            self._discarded
            or self.failure is not None
            or self._hashes.failure is not None
        )

    # -- background work on the file ------------------------------------------------

    def flushInBackground(self) -> None:
        """Start writing what arrived so far to disk, so the last fsync is short."""
        fd = self.fd
        if self._flushing or fd is None or self._stopped:
            return
        self._flushing = True

        def done(result: object) -> None:
            self._flushing = False

        self.onFile(os.fsync, fd).addBoth(done)

    async def _quiet(self) -> None:
        """Wait for background work on the file (and hashing) to finish."""
        await self._hashes.whenIdle()
        await self._fileCalls.idle()

    # -- the end ------------------------------------------------------------------

    async def finishImage(self, size: int) -> ContentDigest:
        """
        Write out the queue, cut the image to ``size``, fsync; the content digest
        (L{treeDigest}) of the staged image.
        """
        await self.drained()
        await self._quiet()
        if self._discarded:
            raise DeviceError("the staged image was discarded")
        if self._hashes.failure is not None:
            self._hashes.failure.raiseException()
        await self.onFile(self._cut, size)
        self.size = size
        if self._discarded:
            raise DeviceError("the staged image was discarded")
        tables = len(self.blocks.rootless)
        digests, unknown = await self.onFile(self.blocks.table, size)
        log.info(
            "migration {migration_id}: {path}: {tables} block digests from leaf "
            "tables, {blocks} blocks read back",
            migration_id=self.context.migrationId,
            path=self.path.path,
            tables=tables,
            blocks=len(unknown),
        )
        # Blocks not known from the records (the written parts of a block that a
        # final round sends, without leaf tables) are read back, in parallel.
        parts = [unknown[i::READ_BACK_THREADS] for i in range(READ_BACK_THREADS)]
        await _all(
            [
                self.onFile(self._hashBlocks, digests, part, size)
                for part in parts
                if part
            ]
        )
        return treeDigest(size, self.blocks.blockSize, digests)

    def _cut(self, size: int) -> None:
        fd = self.fd
        assert fd is not None
        os.ftruncate(fd, size)
        os.fsync(fd)

    def _hashBlocks(self, digests: bytearray, blocks: list[int], size: int) -> None:
        """Blocking: put the digests of ``blocks``, read from the file, in the table."""
        fd = self.fd
        assert fd is not None
        blockSize = self.blocks.blockSize
        for index in blocks:
            start = index * blockSize
            length = min(blockSize, size - start)
            data = os.pread(fd, length, start)
            if len(data) != length:
                raise DeviceError(f"the staged image ended inside block {index}")
            where = index * DIGEST_SIZE
            digests[where : where + DIGEST_SIZE] = blake3.blake3(data).digest()

    async def discard(self) -> None:
        self._discarded = True
        self._hashes.stop(Failure(DeviceError("staging discarded")))
        await self._quiet()
        await super().discard()


def _weight(record: _Hashed) -> int:
    if isinstance(record, DataRecord | ZeroRecord):
        return recordWeight(record)
    return 0


def _all(deferreds: list[Deferred[Any]]) -> Deferred[None]:
    """A Deferred that fires once all have, failing if any failed (the first)."""
    every = DeferredList(deferreds, fireOnOneErrback=True, consumeErrors=True)

    def unwrap(result: object) -> None:
        return None

    def firstFailure(failure: Failure) -> Failure:
        inner: Failure = getattr(failure.value, "subFailure", failure)
        return inner

    return every.addCallbacks(unwrap, firstFailure)
