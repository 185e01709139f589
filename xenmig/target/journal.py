"""The on-disk journal of target sessions, and recovery after a crash or restart."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from xenmig.fs import removeTree, writeAtomically
from xenmig.target.migrationrecord import MigrationRecord

log = Logger()

#: How many finished sessions the journal keeps for ``xenmig status``.
KEEP_FINISHED = 200


class Journal:
    """
    One small JSON file per session under ``STATE_DIR/sessions``, rewritten
    atomically at each phase change: the JSON of its L{MigrationRecord}.  Each
    record also lists the session's staging paths, so that a restarted daemon
    removes whatever an unfinished session left.
    """

    def __init__(
        self,
        directory: FilePath,
        runInThread: Callable[..., Deferred[Any]],
    ) -> None:
        self.directory = directory
        self._run = runInThread
        self._pending: dict[str, Deferred[None]] = {}

    def create(self) -> None:
        """Blocking, at start-up: make the directory, owner-only."""
        self.directory.makedirs(ignoreExistingDirectory=True)
        os.chmod(self.directory.path, 0o700)

    def path(self, migrationId: str) -> FilePath:
        return self.directory.child(migrationId + ".json")

    def write(self, migrationId: str, record: dict[str, Any]) -> Deferred[None]:
        """Write ``record`` after any earlier write of the same session; durable."""
        data = _encode(record)
        path = self.path(migrationId)
        # Each write has its own turn: a Deferred of ours that fires (with None,
        # never failing) once it is written, and that the next write waits on.
        previous = self._pending.get(migrationId)
        turn: Deferred[None] = Deferred()
        self._pending[migrationId] = turn
        written: Deferred[None] = Deferred()

        def settle(result: object) -> None:
            if self._pending.get(migrationId) is turn:
                del self._pending[migrationId]
            turn.callback(None)
            if isinstance(result, Failure):
                written.errback(result)
            else:
                written.callback(None)

        def write(_: object = None) -> None:
            self._run(_writeRecord, path, data).addBoth(settle)

        if previous is None:
            write()
        else:
            previous.addCallback(write)
        return written

    def load(self) -> list[MigrationRecord]:
        """Blocking, at start-up: every readable session record, oldest first."""
        self.create()
        records = []
        for child in sorted(self.directory.globChildren("*.json")):
            try:
                records.append(MigrationRecord.fromJSON(json.loads(child.getContent())))
            except (OSError, ValueError, KeyError, TypeError):
                log.warn("journal {path} is unreadable; removed", path=child.path)
                child.remove()
        records.sort(key=lambda r: r.started)
        return records

    def recoverRecords(self, now: float) -> list[MigrationRecord]:
        """
        Blocking, at start-up: abort every session that had not committed, remove
        its staging, and return all records kept (oldest first) for status queries.
        """
        records = [self._recovered(record, now) for record in self.load()]
        for record in records[:-KEEP_FINISHED]:
            self.path(record.migrationId).remove()
        return records[-KEEP_FINISHED:]

    def recover(self, now: float) -> list[dict[str, Any]]:
        """L{recoverRecords}, as the JSON the journal files hold."""
        return [record.toJSON() for record in self.recoverRecords(now)]

    def _recovered(self, record: MigrationRecord, now: float) -> MigrationRecord:
        for path in record.staging or ():
            removeTree(path)
        if record.finished:
            return record
        record = record.abortedByRestart(now)
        log.warn(
            "migration {migration_id} aborted at start-up: {reason}",
            migration_id=record.migrationId,
            reason=record.reason,
        )
        writeAtomically(self.path(record.migrationId), _encode(record.toJSON()))
        return record


def _encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, indent=1).encode()


def _writeRecord(path: FilePath, data: bytes) -> None:
    """Blocking: write one journal file, making its directory if need be."""
    os.makedirs(path.dirname(), mode=0o700, exist_ok=True)
    writeAtomically(path, data)
