"""Per-block digests of an image: the source's dirty map, without hypervisor help."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import blake3

from xenmig.digest import ALGORITHM
from xenmig.errors import DeviceError
from xenmig.model import ContentDigest
from xenmig.sparse import dataExtents

#: The unit of change detection: one digest (32 bytes) per block.
BLOCK_SIZE = 1024 * 1024
DIGEST_SIZE = 32
_ZEROS = bytes(BLOCK_SIZE)
#: The digest of a block whose content the target does not have yet.
UNKNOWN = b"\xff" * DIGEST_SIZE


@dataclass(frozen=True)
class Piece:
    """A range to send: ``data`` at ``offset``, or ``length`` zeros when it is None."""

    offset: int
    length: int
    data: bytes | None = None


@dataclass(frozen=True)
class BlockScan:
    """
    One block as a scan saw it.

    ``pieces`` is empty when the block did not change since its digest was recorded.
    """

    index: int
    offset: int
    length: int
    pieces: tuple[Piece, ...]


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
        self._zeroDigest = blake3.blake3(bytes(blockSize)).digest()
        self._tailZeroDigest = self._zeroDigest
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
        self.size = size
        tail = size - (self.count - 1) * self.blockSize if self.count else 0
        self._tailZeroDigest = blake3.blake3(bytes(tail)).digest()

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

    def currentSize(self) -> int:
        """Blocking: the image's size now."""
        return os.fstat(self.fd).st_size

    def startPass(self) -> int:
        """
        Blocking: before a pass, follow a growable image to its current size.

        @return: the size the pass covers.
        @raise DeviceError: if the image was resized in a way it may not be.
        """
        size = self.currentSize()
        if size != self.blocks.size:
            if not self.growable or size > self.maxSize:
                self._resized(size)
            self.blocks.resize(size)
        return size

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

    def scan(
        self, first: int, last: int, content: ContentStream | None = None
    ) -> list[BlockScan]:
        """
        Read blocks ``first`` to ``last`` (exclusive), holes skipped, and record the
        digest of every block that changed since its digest was recorded.

        @param content: hash every block's content into it too (it must be at the
            start of ``first``: passes that hash content scan one batch at a time).
        @raise DeviceError: if the image was resized or truncated.
        """
        self.checkSize(exact=False)
        blocks = self.blocks
        start, _ = blocks.blockRange(first)
        _, end = blocks.blockRange(last - 1)
        extents = list(dataExtents(self.fd, start, end))
        scans = []
        cursor = 0
        for index in range(first, last):
            blockStart, blockEnd = blocks.blockRange(index)
            while cursor < len(extents) and extents[cursor][1] <= blockStart:
                cursor += 1
            inside = _clip(extents, cursor, blockStart, blockEnd)
            scans.append(self._scanBlock(index, inside, content))
        return scans

    def _scanBlock(
        self,
        index: int,
        extents: list[tuple[int, int]],
        content: ContentStream | None,
    ) -> BlockScan:
        start, end = self.blocks.blockRange(index)
        length = end - start
        zero = self.blocks.zeroDigest(index)
        data: bytes | None = None
        digest = zero
        if extents:
            # A fresh buffer per block: a changed block's data goes to the writer
            # as it is, and the allocator recycles the unchanged ones' at once.
            data = os.pread(self.fd, length, start)
            if len(data) != length:
                raise DeviceError(
                    f"{self.describe} ended at {start + len(data)} bytes, inside "
                    f"block {index}: it was truncated under the sender"
                )
            digest = blake3.blake3(data).digest()
            if digest == zero:
                data = None
        if content is not None:
            content.update(start, data, length)
        if digest == self.blocks.digest(index):
            return BlockScan(index, start, length, ())
        self.blocks.record(index, digest)
        if data is None:
            return BlockScan(index, start, length, (Piece(start, length),))
        return BlockScan(index, start, length, _pieces(start, data, extents))


def _clip(
    extents: list[tuple[int, int]], cursor: int, start: int, end: int
) -> list[tuple[int, int]]:
    """The parts of ``extents`` (sorted, from ``cursor``) inside ``[start, end)``."""
    inside = []
    for extentStart, extentEnd in extents[cursor:]:
        if extentStart >= end:
            break
        inside.append((max(extentStart, start), min(extentEnd, end)))
    return inside


def _pieces(
    start: int, data: bytes, extents: list[tuple[int, int]]
) -> tuple[Piece, ...]:
    """
    Split a block read whole into DATA pieces (its data extents) and zero pieces
    (its holes), so the target allocates what the source allocates.

    A hole that does not read as zeros (written between the extent walk and the
    read) is sent as data: what is sent is always exactly what was read.
    """
    pieces: list[Piece] = []
    position = start
    end = start + len(data)
    for extentStart, extentEnd in [*extents, (end, end)]:
        if extentStart > position:
            pieces.append(
                _piece(position, data[position - start : extentStart - start])
            )
        if extentEnd > extentStart:
            pieces.append(
                _piece(extentStart, data[extentStart - start : extentEnd - start])
            )
        position = max(position, extentEnd)
    return tuple(pieces)


def _piece(offset: int, chunk: bytes) -> Piece:
    """A zero piece if ``chunk`` is all zeros (one memcmp), else a DATA piece."""
    if chunk == (_ZEROS if len(chunk) == BLOCK_SIZE else bytes(len(chunk))):
        return Piece(offset, len(chunk))
    return Piece(offset, len(chunk), chunk)


class ContentStream:
    """
    The content digest (blake3 over the logical bytes, zeros included) fed block by
    block in offset order, hashed on several cores.

    Produces the same digest as L{xenmig.digest.ContentHasher}.
    """

    def __init__(self, maxThreads: int = blake3.blake3.AUTO) -> None:
        self._hash = blake3.blake3(max_threads=maxThreads)
        self.position = 0

    def update(self, offset: int, data: bytes | None, length: int) -> None:
        """Blocking: hash ``data`` (None: ``length`` zeros), which is at ``offset``."""
        if offset != self.position:
            raise ValueError(f"content fed at {offset}, expected {self.position}")
        if data is None:
            _hashZeros(self._hash.update, length)
        else:
            self._hash.update(data)
        self.position += length

    def hashFile(self, fd: int, stop: int, chunk: int = 4 * BLOCK_SIZE) -> None:
        """
        Blocking: hash the file at ``fd`` from ``position`` to ``stop`` (zeros past
        its end), holes as zeros without reading them.
        """
        end = min(stop, os.fstat(fd).st_size)
        for start, extentEnd in dataExtents(fd, self.position, end):
            self.update(self.position, None, start - self.position)
            while start < extentEnd:
                data = os.pread(fd, min(chunk, extentEnd - start), start)
                if not data:
                    raise OSError(f"the file shrank at {start} while it was hashed")
                self.update(start, data, len(data))
                start += len(data)
        self.update(self.position, None, stop - self.position)

    def result(self) -> ContentDigest:
        """The digest of everything fed."""
        return ContentDigest(self.position, ALGORITHM, self._hash.digest())


def hashSparseFile(path: str, size: int) -> ContentDigest:
    """
    Blocking: the content digest of the first ``size`` bytes of ``path`` (zero-padded
    past its end), on several cores, holes hashed as zeros without reading them.

    The same digest as L{xenmig.digest.hashFile}, faster on sparse images.
    """
    content = ContentStream()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        content.hashFile(fd, size)
    finally:
        os.close(fd)
    return content.result()


def _hashZeros(update: Callable[[bytes], object], length: int) -> None:
    while length:
        chunk = min(length, BLOCK_SIZE)
        update(_ZEROS if chunk == BLOCK_SIZE else _ZEROS[:chunk])
        length -= chunk
