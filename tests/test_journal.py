"""The journal's group commit: writes of many sessions share a batch and its fsync."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from xenmig.errors import JournalUnavailable
from xenmig.target import journal as journalfile
from xenmig.target.journal import NOTE_DELAY, Journal
from xenmig.target.recordfiles import RecordFiles, readRecords
from xenmig.testing import SteppedThreads


def record(mid: str, phase: str) -> dict[str, Any]:
    return {"migration_id": mid, "phase": phase}


def outcomes(d: Any) -> list[Any]:
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def onDisk(directory: Path) -> dict[str, str]:
    return {
        mid: json.loads(data)["phase"]
        for mid, data in readRecords(str(directory)).items()
    }


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories the journal fsyncs, in order."""
    seen: list[str] = []
    real = journalfile.fsyncDirectory

    def counting(path: str) -> None:
        seen.append(path)
        real(path)

    monkeypatch.setattr(journalfile, "fsyncDirectory", counting)
    return seen


def test_writesMadeDuringABatchGoTogetherInTheNext(
    tmp_path: Path, fsyncs: list[str]
) -> None:
    """
    While one batch is written, the writes of other sessions wait, each
    session's newest record only; they go in one thread call with one fsync of
    the directory, and none is answered before its batch is durable.
    """
    threads = SteppedThreads()
    journal = Journal(FilePath(str(tmp_path)), threads, task.Clock())
    first = outcomes(journal.write("m0", record("m0", "PREPARED")))
    assert threads.names == ["_writeRecords"]
    later = [
        outcomes(journal.write(f"m{n}", record(f"m{n}", "PREPARED")))
        for n in range(1, 5)
    ]
    newer = outcomes(journal.write("m1", record("m1", "RECEIVING")))
    assert threads.names == ["_writeRecords"]  # the others wait for it
    threads.run()
    assert first == [None] and all(seen == [] for seen in later + [newer])
    assert onDisk(tmp_path) == {"m0": "PREPARED"}
    assert threads.names == ["_writeRecords"]  # the next batch, all of them
    threads.run()
    assert all(seen == [None] for seen in later + [newer])
    assert onDisk(tmp_path) == {
        "m0": "PREPARED",
        "m1": "RECEIVING",
        "m2": "PREPARED",
        "m3": "PREPARED",
        "m4": "PREPARED",
    }
    assert fsyncs == [str(tmp_path)] * 2  # one per batch, not one per record
    assert not threads.waiting and not list(tmp_path.glob("*.tmp"))


def test_aGroupCommittedJournalSurvivesACrash(tmp_path: Path) -> None:
    """
    A crash while a batch waits loses only unanswered writes: a restarted
    journal finds every answered record, and aborts each unfinished one.
    """
    threads = SteppedThreads()
    journal = Journal(FilePath(str(tmp_path)), threads, task.Clock())
    answered = [
        outcomes(journal.write("m1", record("m1", "PREPARED"))),
        outcomes(journal.write("m2", record("m2", "PREPARED"))),
    ]
    threads.run()
    threads.run()
    assert answered == [[None], [None]]
    lost = outcomes(journal.write("m1", record("m1", "READY")))
    assert threads.crash() and lost == []  # killed before its batch ran
    restarted = Journal(FilePath(str(tmp_path)), SteppedThreads(), task.Clock())
    records = {r.migrationId: r for r in restarted.recoverRecords(now=100.0)}
    assert sorted(records) == ["m1", "m2"]
    assert all(r.phase.value == "ABORTED" for r in records.values())
    assert onDisk(tmp_path) == {"m1": "ABORTED", "m2": "ABORTED"}


def test_aFailedRecordFailsItsBatchAndStaysDue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A record that cannot be written fails every write of its batch (none is
    older on disk than what was decided) and is written first by the next.
    """
    threads = SteppedThreads()
    journal = Journal(FilePath(str(tmp_path)), threads, task.Clock())
    outcomes(journal.write("m0", record("m0", "PREPARED")))
    waiting = [
        outcomes(journal.write("m1", record("m1", "PREPARED"))),
        outcomes(journal.write("m2", record("m2", "PREPARED"))),
    ]
    threads.run()
    real = RecordFiles.write

    def full(files: RecordFiles, migrationId: str, data: bytes) -> bool:
        if migrationId == "m2":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(files, migrationId, data)

    monkeypatch.setattr(RecordFiles, "write", full)
    threads.run()
    for seen in waiting:
        assert isinstance(seen[0], Failure) and seen[0].check(JournalUnavailable)
        assert "cannot record migration m2: No space left" in str(seen[0].value)
    assert journal.due == ["m2"]
    monkeypatch.setattr(RecordFiles, "write", real)
    later = outcomes(journal.write("m3", record("m3", "PREPARED")))
    threads.run()
    assert later == [None] and journal.due == []
    assert onDisk(tmp_path) == {"m0": "PREPARED", "m1": "PREPARED", "m2": "PREPARED",
                                "m3": "PREPARED"}  # fmt: skip


# -- noted records: the phases that recover as the record before them -----------------


def test_aNotedRecordIsWrittenWithinTheDelay(tmp_path: Path) -> None:
    """
    A noted record waits for nothing and nobody waits for it: it is written in
    one batch once NOTE_DELAY has passed, with every other session's noted then.
    """
    threads, clock = SteppedThreads(), task.Clock()
    journal = Journal(FilePath(str(tmp_path)), threads, clock)
    outcomes(journal.write("m1", record("m1", "PREPARED")))
    threads.run()
    journal.note("m1", record("m1", "RECEIVING"))
    journal.note("m2", record("m2", "READY"))
    journal.note("m1", record("m1", "READY"))  # the newest of a session only
    clock.advance(NOTE_DELAY * 0.9)
    assert threads.names == [] and onDisk(tmp_path) == {"m1": "PREPARED"}
    clock.advance(NOTE_DELAY * 0.1)
    assert threads.names == ["_writeRecords"]
    threads.run()
    assert onDisk(tmp_path) == {"m1": "READY", "m2": "READY"}
    assert not threads.waiting and not clock.getDelayedCalls()


def test_aWriteOfTheSessionCarriesItsNotedRecord(
    tmp_path: Path, fsyncs: list[str]
) -> None:
    """
    A write of a session before its noted record is due replaces it: the noted
    record is never written, and the timer goes once nothing else is noted.
    """
    threads, clock = SteppedThreads(), task.Clock()
    journal = Journal(FilePath(str(tmp_path)), threads, clock)
    journal.note("m1", record("m1", "READY"))
    journal.note("m2", record("m2", "RECEIVING"))
    committing = outcomes(journal.write("m1", record("m1", "COMMITTING")))
    threads.run()
    assert committing == [None] and onDisk(tmp_path) == {"m1": "COMMITTING"}
    assert len(clock.getDelayedCalls()) == 1  # m2's is still to come
    outcomes(journal.withdraw("m2"))
    assert not clock.getDelayedCalls()
    clock.advance(NOTE_DELAY)
    assert threads.names == [] and onDisk(tmp_path) == {"m1": "COMMITTING"}
    assert fsyncs == [str(tmp_path)]


def test_aNotedRecordThatFailsStaysDue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full directory at the timer: logged, and due for the next write."""
    threads, clock = SteppedThreads(), task.Clock()
    journal = Journal(FilePath(str(tmp_path)), threads, clock)
    real = RecordFiles.write

    def full(files: RecordFiles, migrationId: str, data: bytes) -> bool:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(RecordFiles, "write", full)
    journal.note("m1", record("m1", "RECEIVING"))
    clock.advance(NOTE_DELAY)
    threads.run()
    assert journal.due == ["m1"] and onDisk(tmp_path) == {}
    monkeypatch.setattr(RecordFiles, "write", real)
    outcomes(journal.write("m2", record("m2", "PREPARED")))
    threads.run()
    assert journal.due == []
    assert onDisk(tmp_path) == {"m1": "RECEIVING", "m2": "PREPARED"}
