"""
Per-block digests of an image: the source's dirty map, without hypervisor help,
and the disk kind's content digest, a tree over those block digests.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Sequence
from functools import cache

import blake3

from xenmig.devices.disk.leaves import (
    LEAF_SIZE,
    VALUE_SIZE,
    LeafTables,
    blockTable,
    leafRuns,
    leafValues,
    readLeaves,
    rootOf,
    zeroTable,
)
from xenmig.devices.disk.pieces import (
    BlockScan,
    Piece,
    blockPieces,
    clip,
    cutTo,
    holePieces,
)
from xenmig.devices.sparse import DataExtents
from xenmig.errors import DeviceError
from xenmig.model import ContentDigest

#: The unit of change detection: one digest (32 bytes) per block.
BLOCK_SIZE = 1024 * 1024
DIGEST_SIZE = 32
#: The digest of a block whose content the target does not have yet.
UNKNOWN = b"\xff" * DIGEST_SIZE
#: The disk kind's content digest (see L{treeDigest}): the algorithm name starts so.
TREE_ALGORITHM = "blake3-blocks"
_TREE_DOMAIN = b"xenmig blake3-blocks v1\n"


def treeAlgorithm(blockSize: int) -> str:
    """The name of the tree digest over blocks of ``blockSize`` (in END records)."""
    return f"{TREE_ALGORITHM}-{blockSize // 1024}k"


def treeDigest(size: int, blockSize: int, digests: bytes | bytearray) -> ContentDigest:
    """
    The content digest of an image of ``size`` bytes from the blake3 digests of its
    blocks (``digests``: 32 bytes for each block, in order; a shorter last block is
    hashed as it is): blake3 over a header naming the size and block size, then the
    block digests.

    Like the plain content digest it covers the logical bytes (holes as zeros, a
    sparse image and its dense copy agree), but both sides get it from block
    digests they already have: the source from its block map, the target from the
    records as it writes them.  Only the blocks that changed are hashed again.
    """
    count = -(-size // blockSize)
    if len(digests) != count * DIGEST_SIZE:
        raise ValueError(f"{count} block digests expected, {len(digests)} bytes given")
    tree = blake3.blake3(_TREE_DOMAIN + struct.pack(">QQ", size, blockSize))
    tree.update(digests)
    return ContentDigest(size, treeAlgorithm(blockSize), tree.digest())


@cache
def zeroDigest(length: int) -> bytes:
    """The blake3 digest of ``length`` zero bytes (a hole of one block)."""
    return blake3.blake3(bytes(length)).digest()


class BlockMap:
    """
    The digest of every block of an image, as last sent to the target.

    Memory is 32 bytes per block (32 KiB per GiB of image with 1 MiB blocks).
    Scans of disjoint block ranges may run in parallel threads; L{resize} may not
    run during a scan.
    """

    def __init__(self, size: int, blockSize: int = BLOCK_SIZE) -> None:
        if blockSize <= 0 or blockSize % 4096:
            raise ValueError("the block size must be a positive multiple of 4096")
        self.blockSize = blockSize
        self.size = 0
        self.count = 0
        self._digests = bytearray()
        self._zeroDigest = zeroDigest(blockSize)
        self._tailZeroDigest = self._zeroDigest
        #: The leaf tables of blocks a round after the first sent whole.
        self.leaves = LeafTables(blockSize)
        self.resize(size)

    def resize(self, size: int) -> None:
        """
        Follow the image to ``size`` bytes (a qcow2 container grows as the guest
        writes): new blocks and the blocks around both ends count as changed.
        """
        oldCount = self.count
        self.count = -(-size // self.blockSize)
        del self._digests[self.count * DIGEST_SIZE :]
        self._digests += UNKNOWN * (self.count - oldCount)
        for index in (oldCount - 1, self.count - 1):
            if 0 <= index < self.count:
                self.record(index, UNKNOWN)
            self.leaves.drop(index)
        self.size = size
        tail = size - (self.count - 1) * self.blockSize if self.count else 0
        self._tailZeroDigest = zeroDigest(tail)

    def blockRange(self, index: int) -> tuple[int, int]:
        """The ``(start, stop)`` byte range of block ``index``."""
        start = index * self.blockSize
        return start, min(start + self.blockSize, self.size)

    def zeroDigest(self, index: int) -> bytes:
        """The digest block ``index`` has when it is all zeros."""
        return self._tailZeroDigest if index == self.count - 1 else self._zeroDigest

    def digest(self, index: int) -> bytes:
        """The digest recorded for block ``index`` (L{UNKNOWN} if none)."""
        return bytes(self._digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])

    def record(self, index: int, digest: bytes) -> None:
        """Record that the target now holds content with ``digest`` in ``index``."""
        self._digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = digest

    def unknownBlocks(self) -> list[int]:
        """The blocks without a digest (never scanned, or around a resize)."""
        found = []
        position = self._digests.find(UNKNOWN)
        while position != -1:
            if position % DIGEST_SIZE == 0:
                found.append(position // DIGEST_SIZE)
            position = self._digests.find(UNKNOWN, position + 1)
        return found

    def contentDigest(self) -> ContentDigest:
        """
        The content digest (L{treeDigest}) of what the target holds once a whole
        pass has recorded every block.

        @raise ValueError: if a block has no digest yet.
        """
        unknown = self.unknownBlocks()
        if unknown:
            raise ValueError(f"block {unknown[0]} was never hashed")
        return treeDigest(self.size, self.blockSize, self._digests)


class BlockScanner:
    """
    Blocking scans of an open image against a L{BlockMap}; run them in threads.

    ``describe`` names the image in error messages (e.g. ``"device d0: /a.img"``).
    A ``growable`` image (a qcow2 container) may grow up to ``maxSize`` between
    passes; any other size change is an error.
    """

    def __init__(
        self,
        fd: int,
        blocks: BlockMap,
        describe: str,
        growable: bool = False,
        maxSize: int | None = None,
    ) -> None:
        self.fd = fd
        self.blocks = blocks
        self.describe = describe
        self.growable = growable
        self.maxSize = blocks.size if maxSize is None else maxSize
        self._modified = 0
        self._extents = DataExtents(fd)
        #: Keep leaf tables (the target keeps them too): rounds after the first
        #: read and send only the changed leaves of a block that has one.
        self.leafy = False

    def currentSize(self) -> int:
        """Blocking: the image's size now."""
        return os.fstat(self.fd).st_size

    def startPass(self) -> int:
        """
        Blocking: before a pass, follow a growable image to its current size.

        @return: the size the pass covers.
        @raise DeviceError: if the image was resized in a way it may not be.
        """
        st = os.fstat(self.fd)
        size = st.st_size
        if size != self.blocks.size:
            if not self.growable or size > self.maxSize:
                self._resized(size)
            self.blocks.resize(size)
        self._modified = st.st_mtime_ns
        return size

    def checkUntouched(self) -> None:
        """
        Blocking: after a pass that the image must not change under (the final
        one, the VM paused): fail if it was resized or written since the pass
        started.  The modification time catches a writer that the pause did not
        stop, unless its writes fell within the clock tick the pass started in.

        @raise DeviceError: naming the image.
        """
        self.checkSize()
        if os.fstat(self.fd).st_mtime_ns != self._modified:
            raise DeviceError(
                f"{self.describe} was written while its final round was read: "
                f"something still writes to it after the pause (is the VM really "
                f"paused?); the migration cannot go on"
            )

    def checkSize(self, exact: bool = True) -> None:
        """
        @raise DeviceError: if the image no longer has the size of this pass (or,
            unless ``exact``, has shrunk below it).
        """
        size = self.currentSize()
        if size != self.blocks.size and (
            exact or not self.growable or size < self.blocks.size
        ):
            self._resized(size)

    def _resized(self, size: int) -> None:
        if size > self.blocks.size and self.growable:
            what = f"grew beyond its limit of {self.maxSize} bytes"
        else:
            what = "was resized or truncated under the sender"
        raise DeviceError(
            f"{self.describe} changed size from {self.blocks.size} to {size} bytes "
            f"during the migration: the image {what}; the migration cannot go on"
        )

    def scanBlocks(
        self,
        indices: Sequence[int],
        budget: int | None = None,
        within: list[tuple[int, int]] | None = None,
        final: bool = True,
    ) -> list[BlockScan]:
        """
        Read the blocks ``indices`` (ascending), holes skipped, and record the
        digest of every block that changed since its digest was recorded.

        @param budget: stop early, after the block that brings the changed data
            held to ``budget`` bytes (at least one block is scanned): fewer scans
            than ``indices`` are returned then.
        @param within: the only byte ranges (sorted) that may have changed since
            the target got each block, if a dirty-block source says so: in the
            ``final`` round a changed block's pieces are then cut to them (a
            block without a digest yet is still sent whole).  With L{leafy}, a
            block with a leaf table reads and sends only the leaves they touch
            (in any round), and one without is read whole and gets a table if
            it is sent whole.  The digest recorded is the whole block's.
        @raise DeviceError: if the image was resized or truncated.
        """
        self.checkSize(exact=False)
        if not indices:
            return []
        blocks = self.blocks
        start, _ = blocks.blockRange(indices[0])
        _, end = blocks.blockRange(indices[-1])
        contiguous = indices[-1] - indices[0] + 1 == len(indices)
        # One extent walk for a run of blocks; each block of a scattered set
        # asks for its own (a walk across the gaps could be long).
        extents = self._extents.within(start, end) if contiguous else []
        scans = []
        cursor = 0
        held = 0
        for index in indices:
            blockStart, blockEnd = blocks.blockRange(index)
            if contiguous:
                while cursor < len(extents) and extents[cursor][1] <= blockStart:
                    cursor += 1
                inside = clip(extents, cursor, blockStart, blockEnd)
            else:
                inside = self._extents.within(blockStart, blockEnd)
            scan = self._scanBlock(index, inside, within, final)
            scans.append(scan)
            held += sum(len(p.data) for p in scan.pieces if p.data is not None)
            if budget is not None and held >= budget:
                break
        return scans

    def _scanBlock(
        self,
        index: int,
        extents: list[tuple[int, int]],
        within: list[tuple[int, int]] | None = None,
        final: bool = True,
    ) -> BlockScan:
        start, end = self.blocks.blockRange(index)
        length = end - start
        zero = self.blocks.zeroDigest(index)
        # Tables in the rounds before the final one, and with a dirty-block
        # source: a full pass builds them, later ones use them.
        leafy = (
            self.leafy
            and length == self.blocks.blockSize
            and (within is not None or not final)
            and self.blocks.leaves.room(index)
        )
        table = self.blocks.leaves.get(index) if leafy else None
        if table is not None and within is not None:
            if self.blocks.digest(index) != UNKNOWN:
                return self._scanLeaves(index, start, end, table, within)
        data: bytes | None = None
        digest = zero
        if leafy:
            table = bytearray(zeroTable(length))
        if extents:
            # A fresh buffer per block: a changed block's data goes to the writer
            # as it is, and the allocator recycles the unchanged ones' at once.
            data = os.pread(self.fd, length, start)
            if len(data) != length:
                raise DeviceError(
                    f"{self.describe} ended at {start + len(data)} bytes, inside "
                    f"block {index}: it was truncated under the sender"
                )
            if leafy:
                table, digest = blockTable(data)
            else:
                digest = blake3.blake3(data).digest()
            if digest == zero:
                data = None
        recorded = self.blocks.digest(index)
        if digest == recorded:
            return BlockScan(index, start, length, ())
        self.blocks.record(index, digest)
        if data is None:
            pieces: tuple[Piece, ...] = (Piece(start, length),)
        else:
            pieces = blockPieces(start, data, extents)
        if final and within is not None and recorded != UNKNOWN:
            pieces = cutTo(pieces, within, start, end)
            self.blocks.leaves.drop(index)
        elif table is not None:
            # Sent whole after the first round: the target keeps a table too.
            self.blocks.leaves.put(index, table)
        else:
            self.blocks.leaves.drop(index)
        return BlockScan(index, start, length, pieces)

    def _scanLeaves(
        self,
        index: int,
        start: int,
        end: int,
        table: bytearray,
        within: list[tuple[int, int]],
    ) -> BlockScan:
        """A block with a leaf table: read, hash and send only the leaves named."""
        first = bisect.bisect_right(within, (start, start)) - 1
        runs = leafRuns(clip(within, max(first, 0), start, end), start, end)
        reads = readLeaves(self.fd, start, runs, self.describe)
        new = bytearray(table)
        for lo, hi, data in reads:
            new[lo * VALUE_SIZE : hi * VALUE_SIZE] = leafValues(data, lo)
        digest = rootOf(new) if reads else self.blocks.digest(index)
        self.blocks.leaves.put(index, new)
        if digest == self.blocks.digest(index):
            return BlockScan(index, start, end - start, ())
        self.blocks.record(index, digest)
        pieces: list[Piece] = []
        for lo, _, data in reads:
            pieces += holePieces(start + lo * LEAF_SIZE, data)
        return BlockScan(index, start, end - start, tuple(pieces))


def hashImage(path: str, blockSize: int = BLOCK_SIZE) -> ContentDigest:
    """
    Blocking: the content digest (L{treeDigest}) of the file at ``path`` as it is
    now, every block read: what the disk kind reports for that image.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        digests = bytearray()
        for start in range(0, size, blockSize):
            length = min(blockSize, size - start)
            data = os.pread(fd, length, start)
            if len(data) != length:
                raise OSError(f"{path} shrank at {start + len(data)} while hashed")
            digests += blake3.blake3(data).digest()
    finally:
        os.close(fd)
    return treeDigest(size, blockSize, digests)
