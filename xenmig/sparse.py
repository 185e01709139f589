"""Reading state files on the source: sparse-aware extents, sent with backpressure."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from xenmig.digest import ContentHasher
from xenmig.errors import DeviceError
from xenmig.interfaces import IRecordWriter, ISourceContext
from xenmig.model import ContentDigest

#: The size of one DATA record the source sends.
CHUNK = 1024 * 1024


_ZEROS = bytes(CHUNK)


def isZero(data: bytes) -> bool:
    """
    Whether ``data`` is all zero bytes.  A comparison with a zero buffer stops at
    the first non-zero byte (at once, for real data) and runs at memcmp speed.
    """
    if len(data) == len(_ZEROS):
        return data == _ZEROS
    return data == bytes(len(data))


def nextDataExtent(fd: int, position: int, end: int) -> tuple[int, int] | None:
    """
    Blocking: the next ``(start, stop)`` range holding data at or after ``position``.

    Uses ``SEEK_DATA``/``SEEK_HOLE``; a filesystem without them reports the whole
    rest of the file as data.  Returns None when only holes remain before ``end``.
    """
    if position >= end:
        return None
    try:
        start = os.lseek(fd, position, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return position, end
    if start >= end:
        return None
    stop = os.lseek(fd, start, os.SEEK_HOLE)
    return start, min(stop, end)


def dataExtents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Blocking: every data range of ``fd`` between ``start`` and ``end``."""
    position = start
    while (extent := nextDataExtent(fd, position, end)) is not None:
        yield extent
        position = extent[1]


def readChunk(
    fd: int, offset: int, length: int, hasher: ContentHasher | None
) -> tuple[bytes, bool]:
    """
    Blocking: read ``length`` bytes at ``offset``, feed them to ``hasher``, and say
    whether they are all zeros.

    @raise xenmig.errors.DeviceError: if the file is shorter than expected (it was
        truncated under the sender).
    """
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise DeviceError(
            f"file ended at {offset + len(data)} bytes while reading {length} bytes "
            f"at {offset}: it was truncated during the transfer"
        )
    zero = isZero(data)
    if hasher is not None:
        if zero:
            hasher.zeros(offset, length)
        else:
            hasher.update(offset, data)
    return data, zero


async def sendRange(
    context: ISourceContext,
    writer: IRecordWriter,
    fd: int,
    start: int,
    end: int,
    hasher: ContentHasher | None = None,
    chunk: int = CHUNK,
) -> int:
    """
    Send the bytes of ``fd`` between ``start`` and ``end``: holes and all-zero chunks
    as ZERO records, the rest as DATA records.

    ``hasher`` (if given) sees the whole range in order, zeros included.
    Returns the number of data bytes sent.
    """
    sent = 0
    position = start
    for extentStart, extentEnd in await _extents(context, fd, start, end):
        if extentStart > position:
            await _zeros(writer, hasher, position, extentStart - position)
        sent += await _sendExtent(
            context, writer, fd, extentStart, extentEnd, hasher, chunk
        )
        position = extentEnd
    if end > position:
        await _zeros(writer, hasher, position, end - position)
    return sent


async def _sendExtent(
    context: ISourceContext,
    writer: IRecordWriter,
    fd: int,
    start: int,
    end: int,
    hasher: ContentHasher | None,
    chunk: int,
) -> int:
    """Send one data extent, reading the next chunk while the previous is written."""
    sent = 0
    offset = start
    reading = context.runInThread(
        readChunk, fd, offset, min(chunk, end - offset), hasher
    )
    while reading is not None:
        data, zero = await reading
        current = offset
        offset += len(data)
        # Reads stay in order (the hasher needs that); only the write overlaps.
        reading = (
            context.runInThread(readChunk, fd, offset, min(chunk, end - offset), hasher)
            if offset < end
            else None
        )
        if zero:
            await writer.writeZero(current, len(data))
        else:
            await writer.writeData(current, data)
            sent += len(data)
    return sent


async def _zeros(
    writer: IRecordWriter, hasher: ContentHasher | None, offset: int, length: int
) -> None:
    if hasher is not None:
        hasher.zeros(offset, length)
    await writer.writeZero(offset, length)


async def _extents(
    context: ISourceContext, fd: int, start: int, end: int
) -> list[tuple[int, int]]:
    # The extent map of a file is small next to its data (one pair per extent).
    return await context.runInThread(lambda: list(dataExtents(fd, start, end)))


async def sendFile(
    context: ISourceContext, writer: IRecordWriter, path: str, chunk: int = CHUNK
) -> ContentDigest:
    """
    Send the whole file at ``path`` sparsely; return its content digest.

    @raise xenmig.errors.DeviceError: if the file changes size while it is sent.
    """
    fd = await context.runInThread(os.open, path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        hasher = ContentHasher()
        await sendRange(context, writer, fd, 0, size, hasher, chunk)
        return hasher.result(size)
    finally:
        os.close(fd)
