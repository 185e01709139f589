"""
Reflink snapshots as the source of a disk's changed blocks, without hypervisor help.

On a filesystem with reflinks (XFS made with ``reflink=1``, btrfs), ``FICLONE``
makes a copy of a file that shares its blocks, at once.  A write to either file
afterwards goes to new blocks (copy on write), so two snapshots of an image taken
at two moments map an unchanged range to the same physical blocks, and a range
written in between to different ones.  ``FIEMAP`` tells the mapping.

Each interval is the difference between two snapshots, both immutable: at
C{collect} a new snapshot is taken, compared with the previous one, and the old
one removed.  Every write to the image lands between two snapshots, whoever made
it (QEMU, blkback, any process), so this works for any writer of a file on such
a filesystem.  The snapshots are hidden files next to the image
(``.IMAGE.xenmig-ID.snap``, owner-only); while one exists, a write to a block the
snapshot shares costs the writer a copy of that block, as with any snapshot.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from xenmig.errors import DeviceError
from xenmig.interfaces import IDirtyBlocks

log = Logger()


class IQuiescedDirtyBlocks(IDirtyBlocks):
    """
    An L{IDirtyBlocks} that finds the last changes more cheaply once nothing
    writes the image any more (the VM paused): the disk kind then calls
    C{settle} after each pre-copy round and C{collectQuiesced} instead of the
    final C{collect}.
    """

    def settle():
        """
        Prepare for a cheap C{collectQuiesced} while the writer still runs (for
        instance, write back what was written so far), after a pre-copy round.

        @return: a Deferred firing with None, or failing with
            L{xenmig.errors.DeviceError}.
        """

    def collectQuiesced():
        """
        Like C{collect}, when nothing writes the image any more: the ranges
        written since the previous C{collect}.  Recording may end with it: call
        C{stop} next.

        @return: a Deferred firing with a sorted list of ``(start, stop)`` byte
            ranges, or failing with L{xenmig.errors.DeviceError}.
        """


FICLONE = 0x40049409
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_LAST = 0x1
#: Extents whose physical address says nothing (delayed allocation, inline
#: data, encoded or not yet known): always count as changed.
FIEMAP_UNRELIABLE = 0x2 | 0x4 | 0x8 | 0x80 | 0x200 | 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
_HEADER = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags
#: Extents asked for per FIEMAP call.
EXTENTS_PER_CALL = 1024


class Extent(NamedTuple):
    """
    One mapped range of a file: ``length`` bytes at ``logical`` on ``physical``
    (a tuple: a fragmented image's map has tens of thousands, compared as sets).
    """

    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length


def fileExtents(fd: int) -> list[Extent]:
    """Blocking: the mapping of the whole file at ``fd``, in logical order."""
    extents: list[Extent] = []
    position = 0
    buffer = bytearray(_HEADER.size + EXTENTS_PER_CALL * _EXTENT.size)
    while True:
        remaining = 2**64 - 1 - position
        _HEADER.pack_into(buffer, 0, position, remaining, 0, 0, EXTENTS_PER_CALL, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buffer)
        mapped = _HEADER.unpack_from(buffer)[3]
        answer = memoryview(buffer)[_HEADER.size : _HEADER.size + mapped * _EXTENT.size]
        extents += map(Extent._make, _EXTENT.iter_unpack(answer))
        # A full answer may have more after it; anything less is the whole rest.
        if mapped < EXTENTS_PER_CALL or extents[-1].flags & FIEMAP_EXTENT_LAST:
            return extents
        position = extents[-1].end


def changedRanges(
    before: list[Extent], after: list[Extent], size: int
) -> list[tuple[int, int]]:
    """
    The byte ranges below ``size`` that two snapshots do not share: mapped to
    other blocks, mapped in one and a hole in the other, or mapped by extents
    whose addresses say nothing.  Sorted, adjacent ranges joined.

    Extents the two maps have in common (most of them, between two rounds) are
    set aside first: the ranges they cover are unchanged, and the comparison
    costs what changed, not the size of a fragmented image's map.  Unwritten
    (preallocated) extents read as zeros, as holes do, and count as holes: an
    image written back carries the filesystem's preallocations, which no
    snapshot of it does.
    """
    common = set(before) & set(after)
    before = [e for e in before if e not in common and _written(e)]
    after = [e for e in after if e not in common and _written(e)]
    cuts = {0, size}
    for extent in (*before, *after):
        cuts.update(p for p in (extent.logical, extent.end) if 0 < p < size)
    points = sorted(cuts)
    changed: list[tuple[int, int]] = []
    a = b = 0
    for start, stop in zip(points, points[1:], strict=False):
        while a < len(before) and before[a].end <= start:
            a += 1
        while b < len(after) and after[b].end <= start:
            b += 1
        old = before[a] if a < len(before) and before[a].logical <= start else None
        new = after[b] if b < len(after) and after[b].logical <= start else None
        if not _same(old, new, start):
            if changed and changed[-1][1] == start:
                changed[-1] = (changed[-1][0], stop)
            else:
                changed.append((start, stop))
    return changed


def _written(extent: Extent) -> bool:
    return not extent.flags & FIEMAP_EXTENT_UNWRITTEN


def _same(old: Extent | None, new: Extent | None, at: int) -> bool:
    if old is None or new is None:
        return old is None and new is None
    if (old.flags | new.flags) & FIEMAP_UNRELIABLE:
        return False
    if (old.flags ^ new.flags) & FIEMAP_EXTENT_UNWRITTEN:
        return False
    return old.physical + (at - old.logical) == new.physical + (at - new.logical)


@implementer(IQuiescedDirtyBlocks)
class ReflinkSnapshots:
    """
    The ranges of the image at ``path`` written between snapshots.

    Once the VM is paused, the last interval needs no snapshot: the image no
    longer changes, so C{collectQuiesced} writes it back and compares its own
    map with the last snapshot's (kept from the previous C{collect}).  A
    snapshot of a fragmented image costs in proportion to its extents (tens of
    thousands after a few seconds of scattered writes: a fraction of a second
    here), the write-back in proportion to what changed, which C{settle} keeps
    small by writing back each pre-copy round's writes as the round ends.

    @param runInThread: runs a blocking call in a thread pool; a Deferred.
    """

    def __init__(self, path: str, runInThread: Callable[..., Deferred[Any]]) -> None:
        self.path = path
        self.runInThread = runInThread
        self.description = f"reflink snapshots of {path}"
        # Beside the file itself (a reflink stays within one filesystem).
        directory, name = os.path.split(os.path.realpath(path))
        self._base = os.path.join(directory, f".{name}.xenmig-{uuid.uuid4().hex[:12]}")
        self._generation = 0
        self._current = ""
        self._currentMap: list[Extent] | None = None  # the snapshot's, once read
        self._stopped = False

    # -- IDirtyBlocks ---------------------------------------------------------------

    def start(self) -> Deferred[None]:
        return self.runInThread(self._start)

    def collect(self) -> Deferred[list[tuple[int, int]]]:
        return self.runInThread(self._collect)

    def stop(self) -> Deferred[None]:
        return self.runInThread(self._stop)

    # -- IQuiescedDirtyBlocks -------------------------------------------------------

    def settle(self) -> Deferred[None]:
        return self.runInThread(self._settle)

    def collectQuiesced(self) -> Deferred[list[tuple[int, int]]]:
        return self.runInThread(self._collectQuiesced)

    # -- blocking steps -------------------------------------------------------------

    def _start(self) -> None:
        if self._current or self._stopped:
            raise DeviceError(f"{self.description}: already started")
        self._current = self._snapshot()
        log.info("recording writes to {path} with reflink snapshots", path=self.path)

    def _collect(self) -> list[tuple[int, int]]:
        if not self._current or self._stopped:
            raise DeviceError(f"{self.description}: not recording")
        following = self._snapshot()
        try:
            before = self._currentMap or _mapping(self._current)
            after = _mapping(following)
            size = max(os.stat(self._current).st_size, os.stat(following).st_size)
        except BaseException:
            _remove(following)
            raise
        _remove(self._current)
        self._current, self._currentMap = following, after
        return changedRanges(before, after, size)

    def _settle(self) -> None:
        """Write back what was written so far (the image opened read-only)."""
        if not self._current or self._stopped:
            raise DeviceError(f"{self.description}: not recording")
        fd = _open(self.path, os.O_RDONLY, self.description)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _collectQuiesced(self) -> list[tuple[int, int]]:
        """
        The ranges written since the last snapshot, the image no longer
        written: once written back (an image's map shows a copy-on-write only
        after it), its map against the snapshot's.
        """
        if not self._current or self._stopped:
            raise DeviceError(f"{self.description}: not recording")
        fd = _open(self.path, os.O_RDONLY, self.description)
        try:
            os.fsync(fd)
            after = fileExtents(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        before = self._currentMap or _mapping(self._current)
        size = max(size, os.stat(self._current).st_size)
        return changedRanges(before, after, size)

    def _stop(self) -> None:
        self._stopped = True
        current, self._current = self._current, ""
        self._currentMap = None
        if current:
            _remove(current)

    def _snapshot(self) -> str:
        """A reflink copy of the image now: its path."""
        path = f"{self._base}.{self._generation}.snap"
        self._generation += 1
        source = _open(self.path, os.O_RDONLY, self.description)
        try:
            target = _open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.description, 0o600
            )
            try:
                fcntl.ioctl(target, FICLONE, source)
            except OSError as e:
                os.close(target)
                _remove(path)
                raise DeviceError(_cloneFailure(self.path, e))
            os.close(target)
        finally:
            os.close(source)
        return path


def _mapping(path: str) -> list[Extent]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fileExtents(fd)
    finally:
        os.close(fd)


def _open(path: str, flags: int, what: str, mode: int = 0o600) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as e:
        raise DeviceError(f"{what}: cannot open {path}: {e.strerror}")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _cloneFailure(path: str, error: OSError) -> str:
    if error.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
        return (
            f"{path} is not on a filesystem with reflinks (FICLONE: "
            f"{error.strerror}); reflink=1 needs XFS made with reflink=1, or btrfs"
        )
    return f"cannot snapshot {path} (FICLONE: {error.strerror})"
