"""The journal's files: records rewritten in place, torn writes, spares, old files."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from test_journal import onDisk
from twisted.internet import task
from twisted.logger import capturedLogs, formatEvent
from twisted.python.filepath import FilePath

from xenmig.target import recordfiles
from xenmig.target.journal import SPARES_RETRY, Journal
from xenmig.target.recordfiles import (
    REGION,
    SPARES,
    RecordFiles,
    decode,
    encode,
)
from xenmig.testing import SteppedThreads


def record(mid: str, phase: str, padding: int = 0) -> bytes:
    return json.dumps(
        {"migration_id": mid, "phase": phase, "x": "." * padding}
    ).encode()


def regions(path: Path) -> list[int | None]:
    """The sequence number in each region of a file (None: no valid entry)."""
    data = path.read_bytes()
    half = len(data) // 2
    entries = [decode(data, start, start + half) for start in (0, half)]
    return [None if entry is None else entry.seq for entry in entries]


class Syncs:
    """What the files fsync: files (fsync, fdatasync) and the directory."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[str] = []
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._counting(name, real))
        real = recordfiles.fsyncDirectory
        monkeypatch.setattr(
            recordfiles, "fsyncDirectory", self._counting("directory", real)
        )

    def _counting(self, name: str, real: Any) -> Any:
        def counting(*args: Any) -> Any:
            self.seen.append(name)
            return real(*args)

        return counting

    def take(self) -> list[str]:
        seen, self.seen = self.seen, []
        return seen


@pytest.fixture
def files(tmp_path: Path) -> RecordFiles:
    """Record files after a start-up: the spares made."""
    made = RecordFiles(str(tmp_path))
    assert made.load() == ([], [])
    made.makeSpares()
    return made


def test_aRecordIsRewrittenInPlaceWithOneDataSync(
    files: RecordFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A new session's first record goes into a spare (renamed, no directory
    fsync); each later one into the other region of the same file, whose size
    and inode never change: one fdatasync each, nothing else.
    """
    syncs = Syncs(monkeypatch)
    assert files.write("m1", record("m1", "PREPARED")) is False
    assert syncs.take() == ["fdatasync"]
    path = tmp_path / "m1.journal"
    inode, size = path.stat().st_ino, path.stat().st_size
    assert size == 2 * REGION and files.spares == SPARES - 1
    assert regions(path) == [0, None]
    for seq, phase in enumerate(("COMMITTING", "COMMITTED"), start=1):
        assert files.write("m1", record("m1", phase)) is False
        assert syncs.take() == ["fdatasync"]
        assert onDisk(tmp_path) == {"m1": phase} and seq in regions(path)
    assert (path.stat().st_ino, path.stat().st_size) == (inode, size)
    assert regions(path) == [2, 1]  # the regions take turns
    assert path.read_bytes().startswith(b"xenmig-journal m1 2 ")  # cat shows it
    assert not list(tmp_path.glob("*.tmp"))


def test_aTornWriteLeavesTheRecordBefore(files: RecordFiles, tmp_path: Path) -> None:
    """
    A crash in the middle of writing a record spoils only the region it was
    writing: the reader takes the other, the record before.  A flipped bit
    anywhere in an entry fails its CRC alike.  The next write goes on.
    """
    files.write("m1", record("m1", "PREPARED"))
    files.write("m1", record("m1", "COMMITTING"))
    path = tmp_path / "m1.journal"
    torn = encode("m1", 2, record("m1", "COMMITTED"))
    with open(path, "r+b") as f:  # half of seq 2, into region 0 where it goes
        f.write(torn[: len(torn) // 2])
    assert onDisk(tmp_path) == {"m1": "COMMITTING"}
    data = bytearray(path.read_bytes())
    data[REGION + 60] ^= 0x01  # a bit of seq 1's record
    path.write_bytes(bytes(data))
    assert onDisk(tmp_path) == {}  # neither region is valid now
    data[REGION + 60] ^= 0x01
    path.write_bytes(bytes(data))

    restarted = RecordFiles(str(tmp_path))
    records, unreadable = restarted.load()
    assert [mid for mid, _ in records] == ["m1"] and unreadable == []
    assert json.loads(records[0][1])["phase"] == "COMMITTING"
    assert restarted.write("m1", record("m1", "ABORTED")) is False
    assert onDisk(tmp_path) == {"m1": "ABORTED"} and regions(path) == [2, 1]


def test_aRecordStillUnderItsSparesNameIsFound(
    files: RecordFiles, tmp_path: Path
) -> None:
    """
    Until a directory fsync makes a spare's rename durable, a crash may leave
    the session's record under the spare's name: start-up finds it by the id
    in its frame, renames it, and keeps the other spares.
    """
    spares = sorted(p.name for p in tmp_path.glob(".spare-*"))
    files.write("m1", record("m1", "PREPARED"))
    [taken] = set(spares) - {p.name for p in tmp_path.glob(".spare-*")}
    os.rename(tmp_path / "m1.journal", tmp_path / taken)  # the rename is lost

    restarted = RecordFiles(str(tmp_path))
    records, unreadable = restarted.load()
    assert [mid for mid, _ in records] == ["m1"] and unreadable == []
    assert (tmp_path / "m1.journal").exists() and not (tmp_path / taken).exists()
    assert restarted.spares == SPARES - 1
    restarted.makeSpares()
    assert restarted.spares == SPARES
    assert restarted.write("m1", record("m1", "ABORTED")) is False
    assert onDisk(tmp_path) == {"m1": "ABORTED"}


def test_withoutASpareANewFileHasRoomForTheRecordToDouble(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    With no spare (none made, or too small for the record) a session's file is
    made whole, durable once the directory is fsynced (the write says so),
    with regions of twice its first record; a record that outgrows them makes
    the file again, larger.
    """
    files = RecordFiles(str(tmp_path))
    syncs = Syncs(monkeypatch)
    assert files.write("m1", record("m1", "PREPARED")) is True
    assert syncs.take() == ["fsync"]  # the caller fsyncs the directory
    assert (tmp_path / "m1.journal").stat().st_size == 2 * REGION
    large = record("big", "PREPARED", padding=3 * REGION)
    assert files.write("big", large) is True
    size = (tmp_path / "big.journal").stat().st_size
    assert size >= 4 * len(large) and size % REGION == 0
    assert files.write("big", record("big", "COMMITTING", padding=3 * REGION)) is False
    assert files.write("big", record("big", "COMMITTED", padding=9 * REGION)) is True
    assert onDisk(tmp_path) == {"big": "COMMITTED", "m1": "PREPARED"}
    assert not list(tmp_path.glob("*.tmp"))


def test_startUpReadsOldFilesAndRemovesWhatItCannotRead(tmp_path: Path) -> None:
    """
    An older version's ``ID.json`` is read and rewritten in this form; files
    with no valid record, and leftover temporary files, are removed.
    """
    (tmp_path / "old.json").write_bytes(record("old", "COMMITTED"))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.journal").write_bytes(b"xenmig-journal bad 0 5 00000000\nhello\n")
    (tmp_path / "m2.journal.tmp").write_bytes(b"half")
    files = RecordFiles(str(tmp_path))
    records, unreadable = files.load()
    assert records == [("old", record("old", "COMMITTED"))]
    assert unreadable == [str(tmp_path / "bad.journal"), str(tmp_path / "bad.json")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.journal"]
    assert files.write("old", record("old", "ABORTED")) is False
    assert onDisk(tmp_path) == {"old": "ABORTED"}


def test_sparesAreTakenOnceWhileMadeInAnotherThread(tmp_path: Path) -> None:
    """Spares made in one thread while another writes new sessions: each used once."""
    files = RecordFiles(str(tmp_path))
    files.load(spares=4)
    stop = threading.Event()

    def replenish() -> None:
        while not stop.is_set():
            files.makeSpares()

    maker = threading.Thread(target=replenish)
    maker.start()
    try:
        for n in range(60):
            files.write(f"m{n}", record(f"m{n}", "PREPARED"))
            files.write(f"m{n}", record(f"m{n}", "COMMITTED"))
    finally:
        stop.set()
        maker.join()
    assert onDisk(tmp_path) == {f"m{n}": "COMMITTED" for n in range(60)}
    inodes = {(tmp_path / f"m{n}.journal").stat().st_ino for n in range(60)}
    assert len(inodes) == 60


# -- the journal makes spares again between its batches ------------------------------


def test_theJournalMakesSparesAgainOnceHalfAreGone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Once half the spares are taken, the batch is followed by a thread call
    that makes them all again; one that fails is logged and tried again
    SPARES_RETRY later, and meanwhile new sessions make their own files.
    """
    threads, clock = SteppedThreads(), task.Clock()
    journal = Journal(FilePath(str(tmp_path)), threads, clock)
    journal.load()
    assert journal.files.spares == SPARES

    def prepare(mid: str) -> None:
        journal.write(mid, {"migration_id": mid, "phase": "PREPARED"})
        threads.run("_writeRecords")

    for n in range(SPARES // 2 - 1):
        prepare(f"m{n}")
        assert threads.names == []
    prepare("half")
    assert threads.names == ["makeSpares"] and journal.files.spares == SPARES // 2
    threads.run()
    assert journal.files.spares == SPARES

    def full(files: RecordFiles) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(RecordFiles, "makeSpares", full)
    for n in range(SPARES // 2):
        prepare(f"f{n}")
    with capturedLogs() as logged:
        threads.run("full")
    [warning] = [formatEvent(event) for event in logged]
    assert "cannot make spare files (No space left on device)" in warning
    prepare("later")
    assert threads.names == []  # not before SPARES_RETRY
    clock.advance(SPARES_RETRY)
    prepare("retried")
    assert threads.names == ["full"]
    assert len(onDisk(tmp_path)) == SPARES + 2
