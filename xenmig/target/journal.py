"""The on-disk journal of target sessions, and recovery after a crash or restart."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from xenmig.errors import JournalUnavailable
from xenmig.fs import fsyncDirectory, removeTree
from xenmig.target.installs import reverse
from xenmig.target.migrationrecord import MigrationRecord
from xenmig.target.recordfiles import RecordFiles
from xenmig.target.session import Phase

log = Logger()

#: How many finished sessions the journal keeps for ``xenmig status``.
KEEP_FINISHED = 200

#: Seconds within which a noted record (L{Journal.note}) is written, unless a
#: write of its session comes first.
NOTE_DELAY = 1.0

#: Seconds before the journal tries again to make spare files, after a failure.
SPARES_RETRY = 60.0


class Journal:
    """
    One small file per session under ``STATE_DIR/sessions``, its record
    rewritten at each phase change: the JSON of its L{MigrationRecord}, in
    place, one ``fdatasync`` each (L{xenmig.target.recordfiles}).  Each record
    also lists the session's staging paths, so that a restarted daemon removes
    whatever an unfinished session left.

    A write either replaces the record durably or fails with
    L{JournalUnavailable} leaving the record as it was.  A record that failed
    stays due: every later write (of any session) first writes every due
    record, the newest of each session, and fails if it cannot.  So once any
    write succeeds, no file is older than what the daemon last decided; a
    caller that takes a failure as "not recorded" writes the record of what it
    decided instead (which replaces the failed one).

    Writes are committed in groups: one batch at a time goes to the thread
    pool; the writes asked for meanwhile (of any session) wait and go together
    in the next one, each session's newest record only; the files a batch
    makes new share one fsync of the directory.  No write is answered before
    its batch is durable.  Between batches, spare files for new sessions are
    made in another thread call.

    A change that recovery treats as it treats the session's last record
    (RECEIVING and READY recover as PREPARED does) is only I{noted}: written
    within L{NOTE_DELAY} seconds on ``clock``, unless a write of the session
    comes first and carries it.  A short migration (a vTPM's) then writes
    neither, and its commit's records do not queue behind them.
    """

    def __init__(
        self,
        directory: FilePath,
        runInThread: Callable[..., Deferred[Any]],
        clock: IReactorTime,
    ) -> None:
        self.directory = directory
        self.files = RecordFiles(directory.path)
        self._run = runInThread
        self._clock = clock
        self._noted: dict[str, bytes] = {}  # written by the timer, if still due
        self._timer: IDelayedCall | None = None
        self._queued: dict[str, _Write] = {}  # the next batch, by session
        self._writing: dict[str, _Write] = {}  # the batch under way
        self._flushing = False
        self._due: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._replenishing = False
        self._sparesRetryAt = 0.0

    def create(self) -> None:
        """Blocking, at start-up: make the directory, owner-only."""
        self.directory.makedirs(ignoreExistingDirectory=True)
        os.chmod(self.directory.path, 0o700)

    def write(self, migrationId: str, record: dict[str, Any]) -> Deferred[None]:
        """
        Write ``record`` after any earlier write of the same session; durable.

        A record is the whole session: a write still waiting for its batch
        writes the newer ``record`` instead (one write, not two), and fires
        its callers' Deferreds and this one's together.
        """
        self._forget(migrationId)  # this record is newer
        return self._enqueue(migrationId, _encode(record))

    def note(self, migrationId: str, record: dict[str, Any]) -> None:
        """
        Write ``record`` within L{NOTE_DELAY} seconds, unless a L{write} of the
        same session comes first: a change that a crash before it is durable
        loses nothing of (recovery treats the older record alike).  Nobody
        waits for it; a failure is logged and the record stays due.
        """
        self._noted[migrationId] = _encode(record)
        if self._timer is None:
            self._timer = self._clock.callLater(NOTE_DELAY, self._writeNoted)

    def _forget(self, migrationId: str) -> None:
        """Drop the noted record of ``migrationId`` (the timer with the last)."""
        if self._noted.pop(migrationId, None) is not None and not self._noted:
            assert self._timer is not None
            self._timer.cancel()
            self._timer = None

    def _writeNoted(self) -> None:
        self._timer = None
        noted, self._noted = self._noted, {}
        for migrationId, data in noted.items():  # one batch, if none is under way
            self._enqueue(migrationId, data, flush=False).addErrback(
                _notWritten, migrationId
            )
        if not self._flushing:
            self._flush()

    def _enqueue(
        self, migrationId: str, data: bytes, flush: bool = True
    ) -> Deferred[None]:
        written: Deferred[None] = Deferred()
        waiting = self._queued.get(migrationId)
        if waiting is not None:
            waiting.data = data
            waiting.callers.append(written)
        else:
            self._queued[migrationId] = _Write(data, [written])
        if flush and not self._flushing:
            self._flush()
        return written

    def _flush(self) -> None:
        """Send the queued writes to the thread pool as one batch."""
        batch, self._queued = self._queued, {}
        self._writing, self._flushing = batch, True
        records = {m: w.data for m, w in batch.items()}

        def settle(result: object) -> None:
            self._writing, self._flushing = {}, False
            for write in batch.values():
                for caller in write.callers:
                    if isinstance(result, Failure):
                        caller.errback(result)
                    else:
                        caller.callback(None)
            if self._queued and not self._flushing:
                self._flush()
            self._replenish()

        self._run(self._writeRecords, records).addBoth(settle)

    def _replenish(self) -> None:
        """Make spare files in a thread call once half are taken (one at a time)."""
        if self._replenishing or not self.files.wantsSpares:
            return
        if self._clock.seconds() < self._sparesRetryAt:
            return
        self._replenishing = True

        def done(result: object) -> None:
            self._replenishing = False
            if isinstance(result, Failure):
                self._sparesRetryAt = self._clock.seconds() + SPARES_RETRY
                _noSpares(result.value)

        self._run(self.files.makeSpares).addBoth(done)

    def _writeDue(self, migrationId: str, data: bytes) -> None:
        """Blocking: L{_writeRecords} of one record."""
        self._writeRecords({migrationId: data})

    def _writeRecords(self, records: dict[str, bytes]) -> None:
        """
        Blocking: make ``records`` the due records of their sessions, then
        write every due record, these last, and fsync the directory once if
        any made a new file.

        @raise JournalUnavailable: if one cannot be written (it stays due, and
            so do those after it).
        """
        with self._lock:
            self._due.update(records)
            order = [m for m in self._due if m not in records] + list(records)
            written: list[str] = []
            made: list[str] = []  # durable once the directory is fsynced
            error: JournalUnavailable | None = None
            for migrationId in order:
                try:
                    new = self.files.write(migrationId, self._due[migrationId])
                except OSError as e:
                    error = self._unavailable(migrationId, e)
                    break
                (made if new else written).append(migrationId)
            if made:
                try:
                    fsyncDirectory(self.directory.path)
                    written += made
                except OSError as e:
                    error = error or self._unavailable(made[-1], e)
                    for migrationId in made:  # made again by the next write
                        self.files.forget(migrationId)
            for migrationId in written:
                del self._due[migrationId]
            if error is not None:
                raise error

    def _unavailable(self, migrationId: str, e: OSError) -> JournalUnavailable:
        return JournalUnavailable(
            f"the state directory {self.directory.dirname()} cannot record "
            f"migration {migrationId}: {e.strerror or e}"
        )

    def withdraw(self, migrationId: str) -> Deferred[None]:
        """
        Drop the due record of ``migrationId``, after any write of it under
        way: a record that may never land (the Prepare it was for was refused
        because it could not be written).  What did land stays.
        """
        self._forget(migrationId)
        write = self._queued.get(migrationId) or self._writing.get(migrationId)

        def drop(_: object = None) -> None:
            with self._lock:
                self._due.pop(migrationId, None)

        if write is None:
            drop()
            return succeed(None)
        after: Deferred[None] = Deferred()
        write.callers.append(after)
        return after.addBoth(drop)

    @property
    def due(self) -> list[str]:
        """The migrations whose newest record is not written yet."""
        with self._lock:
            return sorted(self._due)

    def load(self) -> list[MigrationRecord]:
        """
        Blocking, at start-up: every readable session record, oldest first
        (an unreadable file is logged and removed); then spare files are made.
        """
        self.create()
        entries, unreadable = self.files.load()
        for name in unreadable:
            log.warn("journal {path} is unreadable; removed", path=name)
        records = []
        for migrationId, data in entries:
            try:
                records.append(MigrationRecord.fromJSON(json.loads(data)))
            except (ValueError, KeyError, TypeError):
                log.warn("journal of {id} is unreadable; removed", id=migrationId)
                self.files.remove(migrationId)
        records.sort(key=lambda r: r.started)
        try:
            self.files.makeSpares()
        except OSError as e:
            _noSpares(e)
        return records

    def recoverRecords(
        self, now: float, roots: Sequence[FilePath] = ()
    ) -> list[MigrationRecord]:
        """
        Blocking, at start-up: abort every session that had not committed,
        reverse an interrupted commit (what it installed at destinations
        inside ``roots`` is removed), remove staging, and return all records
        kept (oldest first) for status queries.  A record that cannot be
        written stays due (see the class): the next start-up redoes it.
        """
        records = [self._recovered(record, now, roots) for record in self.load()]
        for record in records[:-KEEP_FINISHED]:
            self.files.remove(record.migrationId)
        return records[-KEEP_FINISHED:]

    def recover(
        self, now: float, roots: Sequence[FilePath] = ()
    ) -> list[dict[str, Any]]:
        """L{recoverRecords}, as the JSON the journal files hold."""
        return [record.toJSON() for record in self.recoverRecords(now, roots)]

    def _recovered(
        self, record: MigrationRecord, now: float, roots: Sequence[FilePath]
    ) -> MigrationRecord:
        for path in record.staging or ():
            removeTree(path)
        if record.finished:
            return record
        reversal = None
        if record.phase is Phase.COMMITTING:
            # The source cannot have been told COMMITTED: that answer follows
            # the COMMITTED record.  Reversing is what it may have been told.
            reversal = reverse(record.installs, roots)
        record = record.abortedByRestart(now, reversal)
        log.warn(
            "migration {migration_id} aborted at start-up: {reason}",
            migration_id=record.migrationId,
            reason=record.reason,
        )
        try:
            self._writeDue(record.migrationId, _encode(record.toJSON()))
        except JournalUnavailable as e:
            log.error(
                "migration {migration_id}: {error}; the record is written later",
                migration_id=record.migrationId,
                error=str(e),
            )
        return record


class _Write:
    """A journal write: the record it writes, and the callers it answers."""

    def __init__(self, data: bytes, callers: list[Deferred[None]]) -> None:
        self.data = data
        self.callers = callers


def _notWritten(failure: Failure, migrationId: str) -> None:
    log.failure(
        "migration {migration_id}: a noted record is not journalled yet",
        failure,
        migration_id=migrationId,
    )


def _noSpares(error: object) -> None:
    log.warn(
        "the journal cannot make spare files ({error}): until it can, each new "
        "session's first record makes its file",
        error=getattr(error, "strerror", None) or str(error),
    )


def _encode(data: dict[str, Any]) -> bytes:
    # Compact: json's C encoder (an indent takes the pure-Python one).
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
