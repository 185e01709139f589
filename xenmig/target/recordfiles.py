"""
The journal's files: a session's record rewritten in place, one ``fdatasync`` a write.

A session's file, ``ID.journal``, has two regions of equal size (4 KiB, or room
for twice its first record, whichever is more: a commit's record adds each
device's install), written as zeros when the file is made and fsynced with its
directory.  Each later record is written whole into one region, and the
regions take turns: writing over written blocks changes no metadata, so an
``fdatasync`` of that one block makes it durable.  That costs a tenth of a
millisecond on an ext4 disk, where a temporary file's fsync, its rename and the
directory's fsync cost half a millisecond to a millisecond, three times in a
short migration (PREPARED, COMMITTING, COMMITTED).

Each record is framed with the session's id, a sequence number, its length and a
CRC-32: a write torn by a crash spoils only the region it was writing, and the
other region still holds the record before.  A reader takes the valid region with
the higher sequence number.  The frame is a line of text, so ``cat`` shows the
JSON record under it::

    xenmig-journal m1 4 612 5d1c3a0b
    {"devices":[...],"migration_id":"m1","phase":"COMMITTED",...}

A new session takes a I{spare}: a file made earlier, durable and empty, named
``.spare-*.journal``.  Its first record is written in place like any other and
the file is then renamed to ``ID.journal``; until a directory fsync makes that
rename durable, a crash leaves the record under the spare's name, and the reader
finds it there (by the id in its frame).  The journal makes spares again
between its batches.  Without a spare (all taken, or none made), and for a
record too large for its file, the file is replaced whole: a temporary file,
fsynced and renamed, durable once the caller fsyncs the directory.

A full disk does not stop what the files already hold: a session's records are
written in its own preallocated blocks, so a migration prepared before the
state directory filled up still records its commit.  Only a new file (a new
session once the spares are gone, a record that outgrew its file) needs new
space.

Files of older versions, one JSON record each (``ID.json``), are read and
rewritten in this form at start-up.
"""

from __future__ import annotations

import os
import secrets
import threading
import zlib
from dataclasses import dataclass

from twisted.python.filepath import FilePath

from xenmig.fs import fsyncDirectory, unlinkQuietly, writeAtomically

#: The size of each of a file's two regions, unless a record needs more.
REGION = 4096
#: How many spare files the journal keeps ready for new sessions.
SPARES = 8
SUFFIX = ".journal"
_SPARE = ".spare-"
_LEGACY = ".json"
_MAGIC = b"xenmig-journal "
_HEADER_MAX = 160


@dataclass
class _File:
    """A session's file: where it is, its newest sequence number, its region size."""

    path: str
    seq: int
    region: int


@dataclass(frozen=True)
class Entry:
    """A record as a file holds it: whose, its sequence number, the record."""

    migrationId: str
    seq: int
    record: bytes


def encode(migrationId: str, seq: int, record: bytes) -> bytes:
    """The framed ``record`` of ``migrationId``, unpadded."""
    header = b"%s %d %d" % (migrationId.encode("ascii"), seq, len(record))
    crc = zlib.crc32(record, zlib.crc32(header))
    return b"%s%s %08x\n%s\n" % (_MAGIC, header, crc, record)


def decode(data: bytes, start: int, end: int) -> Entry | None:
    """The entry framed at ``start`` within ``data[start:end]``; None if not valid."""
    if not data.startswith(_MAGIC, start):
        return None
    newline = data.find(b"\n", start, min(end, start + _HEADER_MAX))
    if newline < 0:
        return None
    fields = data[start + len(_MAGIC) : newline].split(b" ")
    if len(fields) != 4:
        return None
    try:
        seq, length, crc = int(fields[1]), int(fields[2]), int(fields[3], 16)
        migrationId = fields[0].decode("ascii")
    except ValueError:
        return None
    body = newline + 1
    record = data[body : body + length]
    header = b" ".join(fields[:3])
    if (
        length < 0
        or body + length + 1 > end
        or data[body + length : body + length + 1] != b"\n"
        or zlib.crc32(record, zlib.crc32(header)) != crc
    ):
        return None
    return Entry(migrationId, seq, record)


def newest(data: bytes) -> Entry | None:
    """The valid entry with the higher sequence number of a file's two regions."""
    region = len(data) // 2
    found = [decode(data, start, start + region) for start in (0, region)]
    valid = [entry for entry in found if entry is not None]
    return max(valid, key=lambda entry: entry.seq, default=None)


def readRecords(directory: str) -> dict[str, bytes]:
    """
    Blocking, and changing nothing: the newest record of each session in
    ``directory``, by id (files of older versions included).
    """
    found: dict[str, Entry] = {}
    for _, entry in _scan(directory):
        if entry is not None and (
            entry.migrationId not in found or entry.seq > found[entry.migrationId].seq
        ):
            found[entry.migrationId] = entry
    return {mid: entry.record for mid, entry in sorted(found.items())}


def _scan(directory: str) -> list[tuple[str, Entry | None]]:
    """Each journal file's name and newest entry (None: none valid)."""
    scanned: list[tuple[str, Entry | None]] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return scanned
    for name in names:
        if not name.endswith((SUFFIX, _LEGACY)):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
        except OSError:
            scanned.append((name, None))
            continue
        if name.endswith(_LEGACY):
            legacy = data.strip()
            valid = legacy.startswith(b"{") and legacy.endswith(b"}")
            entry = Entry(name[: -len(_LEGACY)], -1, legacy) if valid else None
            scanned.append((name, entry))
        else:
            scanned.append((name, newest(data)))
    return scanned


class RecordFiles:
    """
    The journal's files in one directory; blocking, for the journal's thread.

    L{write} is called by one thread at a time (the journal's batch, or its
    start-up); L{makeSpares} may run in another thread meanwhile.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        #: How many spares L{makeSpares} keeps ready (none until L{load}).
        self.wanted = 0
        self._files: dict[str, _File] = {}
        self._spares: list[str] = []
        self._lock = threading.Lock()

    def path(self, migrationId: str) -> str:
        return os.path.join(self.directory, migrationId + SUFFIX)

    @property
    def spares(self) -> int:
        """How many spares are ready."""
        with self._lock:
            return len(self._spares)

    @property
    def wantsSpares(self) -> bool:
        """
        Whether half the spares are gone: L{makeSpares} then makes them all
        again, together (one journal commit of the filesystem, not one each).
        """
        return self.wanted > 0 and self.spares <= self.wanted // 2

    def write(self, migrationId: str, record: bytes) -> bool:
        """
        Make ``record`` the newest of ``migrationId``: durable on return, or,
        if this returns True, once the directory is fsynced (a new file).

        @raise OSError: it could not; the session's file holds its record before.
        """
        known = self._files.get(migrationId)
        seq = 0 if known is None else known.seq + 1
        entry = encode(migrationId, seq, record)
        if known is not None and len(entry) <= known.region:
            try:
                _writeRegion(known.path, seq % 2 * known.region, entry, known.region)
            except FileNotFoundError:
                pass  # removed from under the journal: made again below
            else:
                known.seq = seq
                return False
        # Room for the record to double (a commit's adds its installs).
        region = -(-2 * len(entry) // REGION) * REGION
        while region == REGION and (spare := self._takeSpare()) is not None:
            try:
                _writeRegion(spare, 0, entry, REGION)
                os.replace(spare, self.path(migrationId))
            except FileNotFoundError:
                continue  # removed from under the journal
            except OSError:
                unlinkQuietly(spare)  # never used again: it may hold this record
                raise
            self._files[migrationId] = _File(self.path(migrationId), seq, REGION)
            return False
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        _replaceFile(self.path(migrationId), seq % 2 * region, entry, 2 * region)
        self._files[migrationId] = _File(self.path(migrationId), seq, region)
        return True

    def forget(self, migrationId: str) -> None:
        """Make the session's next record a new file (this one may not be durable)."""
        self._files.pop(migrationId, None)

    def remove(self, migrationId: str) -> None:
        """Remove the session's file (a record that is no longer kept)."""
        self._files.pop(migrationId, None)
        unlinkQuietly(self.path(migrationId))

    def _takeSpare(self) -> str | None:
        with self._lock:
            return self._spares.pop() if self._spares else None

    def makeSpares(self) -> None:
        """
        Make spares until L{wanted} are ready, each durable (zeros written and
        fsynced, renamed, the directory fsynced) before it is handed out.

        @raise OSError: if one cannot be made (those made are kept).
        """
        made: list[str] = []
        try:
            while self.spares + len(made) < self.wanted:
                path = os.path.join(
                    self.directory, _SPARE + secrets.token_hex(8) + SUFFIX
                )
                _replaceFile(path, 0, b"", 2 * REGION)
                made.append(path)
        finally:
            if made:
                fsyncDirectory(self.directory)
                with self._lock:
                    self._spares.extend(made)

    def load(self, spares: int = SPARES) -> tuple[list[tuple[str, bytes]], list[str]]:
        """
        Blocking, at start-up: every session's newest record, by id, and the
        paths of the files that hold no valid record (removed, as leftover
        temporary files are).  Records found under a spare's name are renamed
        to their session's; files of older versions are rewritten in this form.
        From now on L{makeSpares} keeps ``spares`` ready.
        """
        self._files.clear()
        with self._lock:
            self._spares.clear()
        unreadable: list[str] = []
        chosen: dict[str, tuple[str, Entry]] = {}
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(".tmp"):  # an interrupted replace
                unlinkQuietly(os.path.join(self.directory, name))
        for name, entry in _scan(self.directory):
            path = os.path.join(self.directory, name)
            if entry is None:
                if name.startswith(_SPARE) and os.path.getsize(path) == 2 * REGION:
                    with self._lock:
                        self._spares.append(path)
                    continue
                unreadable.append(path)
                unlinkQuietly(path)
                continue
            before = chosen.get(entry.migrationId)
            if before is not None and before[1].seq >= entry.seq:
                unlinkQuietly(path)  # an older copy (a rename not yet durable)
                continue
            if before is not None:
                unlinkQuietly(os.path.join(self.directory, before[0]))
            chosen[entry.migrationId] = (name, entry)
        for migrationId, (name, entry) in chosen.items():
            path = os.path.join(self.directory, name)
            if name.endswith(_LEGACY):
                self.write(migrationId, entry.record)
                unlinkQuietly(path)
                continue
            if path != self.path(migrationId):
                os.replace(path, self.path(migrationId))
            region = os.path.getsize(self.path(migrationId)) // 2
            self._files[migrationId] = _File(self.path(migrationId), entry.seq, region)
        fsyncDirectory(self.directory)
        records = [(mid, entry.record) for mid, (_, entry) in sorted(chosen.items())]
        self.wanted = spares
        return records, unreadable


def _writeRegion(path: str, offset: int, entry: bytes, region: int) -> None:
    """Blocking: write ``entry`` padded to ``region`` at ``offset``; fdatasync."""
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(entry.ljust(region, b"\0"))
        while view:  # a short write (a disk filling up) is not the end
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _replaceFile(path: str, offset: int, entry: bytes, size: int) -> None:
    """
    Blocking: replace ``path`` with a file of ``size`` zeros holding ``entry``
    at ``offset`` (L{writeAtomically}); durable once the directory is fsynced.
    """
    data = bytearray(size)
    data[offset : offset + len(entry)] = entry
    writeAtomically(FilePath(path), bytes(data), syncDirectory=False)
