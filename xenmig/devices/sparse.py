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
#: Records read per system call (and thread hop).
READ_RECORDS = 4


_ZEROS = bytes(CHUNK)


def isZero(data: bytes | memoryview) -> bool:
    """
    Whether ``data`` is all zero bytes.  A prefix decides at once for most real
    data; otherwise a comparison with a zero buffer runs at memcmp speed.
    """
    if bytes(data[:64]) != _ZEROS[: min(64, len(data))]:
        return False
    whole = data.tobytes() if isinstance(data, memoryview) else data
    if len(whole) == len(_ZEROS):
        return whole == _ZEROS
    return whole == bytes(len(whole))


def nextDataExtent(fd: int, position: int, end: int) -> tuple[int, int] | None:
    """
    Blocking: the next ``(start, stop)`` range holding data at or after ``position``.

    Uses ``SEEK_DATA``/``SEEK_HOLE``; a filesystem without them reports the whole
    rest of the file as data.  Returns None when only holes remain before ``end``.
    """
    found = _seekData(fd, position, end)
    if found is None:
        return None
    return found[0], min(found[1], end)


def _seekData(fd: int, position: int, end: int) -> tuple[int, int] | None:
    """Like L{nextDataExtent}, but the extent's stop is not clipped to ``end``."""
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
    return start, os.lseek(fd, start, os.SEEK_HOLE)


def dataExtents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Blocking: every data range of ``fd`` between ``start`` and ``end``."""
    position = start
    while (extent := nextDataExtent(fd, position, end)) is not None:
        yield extent
        position = extent[1]


class DataExtents:
    """
    The data ranges of an open file, for callers that ask about it piece by piece.

    The last data extent found is remembered, so that a long extent costs one
    ``SEEK_HOLE`` rather than one per piece: on tmpfs ``SEEK_HOLE`` walks the
    file's pages up to the next hole, and asking again for every piece of a
    dense image made the scan quadratic.  Only data is remembered, never holes:
    a range once seen as data is read (a hole punched in it since reads as
    zeros), a hole is asked about again.  Safe to share between threads (a
    race costs a system call, not a wrong answer).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._known = (0, 0)

    def within(self, start: int, end: int) -> list[tuple[int, int]]:
        """Blocking: the data ranges between ``start`` and ``end``, in order."""
        extents = []
        position = start
        while position < end:
            knownStart, knownStop = self._known
            if not knownStart <= position < knownStop:
                found = _seekData(self.fd, position, end)
                if found is None:
                    break
                self._known = found
                knownStart, knownStop = found
            stop = min(knownStop, end)
            extents.append((max(position, knownStart), stop))
            position = stop
        return extents


def readChunk(
    fd: int, offset: int, length: int, hasher: ContentHasher | None, record: int = CHUNK
) -> list[tuple[int, memoryview, bool]]:
    """
    Blocking: read ``length`` bytes at ``offset``, cut them into records of at
    most ``record`` bytes, feed them to ``hasher``, and say of each whether it is
    all zeros: a list of ``(offset, data, zero)``.

    @raise xenmig.errors.DeviceError: if the file is shorter than expected (it was
        truncated under the sender).
    """
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise DeviceError(
            f"file ended at {offset + len(data)} bytes while reading {length} bytes "
            f"at {offset}: it was truncated during the transfer"
        )
    view = memoryview(data)
    pieces = []
    for start in range(0, length, record):
        piece = view[start : start + record]
        zero = isZero(piece)
        if hasher is not None:
            if zero:
                hasher.zeros(offset + start, len(piece))
            else:
                hasher.update(offset + start, piece)
        pieces.append((offset + start, piece, zero))
    return pieces


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
    size = chunk * READ_RECORDS
    reading = context.runInThread(
        readChunk, fd, offset, min(size, end - offset), hasher, chunk
    )
    while reading is not None:
        pieces = await reading
        offset += sum(len(data) for _, data, _ in pieces)
        # Reads stay in order (the hasher needs that); only the write overlaps.
        reading = (
            context.runInThread(
                readChunk, fd, offset, min(size, end - offset), hasher, chunk
            )
            if offset < end
            else None
        )
        try:
            for current, data, zero in pieces:
                if zero:
                    await writer.writeZero(current, len(data))
                else:
                    await writer.writeData(current, data)  # type: ignore[arg-type]
                    sent += len(data)
        except BaseException:
            # The caller closes ``fd`` next: never under a read still running.
            if reading is not None:
                await reading.addErrback(lambda _: None)
            raise
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
