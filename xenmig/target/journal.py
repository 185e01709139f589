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

log = Logger()

#: How many finished sessions the journal keeps for ``xenmig status``.
KEEP_FINISHED = 200


class Journal:
    """
    One small JSON file per session under ``STATE_DIR/sessions``, rewritten
    atomically at each phase change.  Each record also lists the session's staging
    paths, so that a restarted daemon removes whatever an unfinished session left.
    """

    def __init__(
        self,
        directory: FilePath,
        runInThread: Callable[..., Deferred[Any]],
    ) -> None:
        self.directory = directory
        self._run = runInThread
        self._pending: dict[str, Deferred[None]] = {}
        directory.makedirs(ignoreExistingDirectory=True)
        os.chmod(directory.path, 0o700)

    def path(self, migrationId: str) -> FilePath:
        return self.directory.child(migrationId + ".json")

    def write(self, migrationId: str, record: dict[str, Any]) -> Deferred[None]:
        """Write ``record`` after any earlier write of the same session; durable."""
        data = json.dumps(record, sort_keys=True, indent=1).encode()
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
            self._run(writeAtomically, path, data).addBoth(settle)

        if previous is None:
            write()
        else:
            previous.addCallback(write)
        return written

    def load(self) -> list[dict[str, Any]]:
        """Blocking, at start-up: every readable session record, oldest first."""
        records = []
        for child in sorted(self.directory.globChildren("*.json")):
            try:
                records.append(json.loads(child.getContent()))
            except (OSError, ValueError):
                log.warn("journal {path} is unreadable; removed", path=child.path)
                child.remove()
        records.sort(key=lambda r: r.get("started", 0))
        return records

    def recover(self, now: float) -> list[dict[str, Any]]:
        """
        Blocking, at start-up: abort every session that had not committed, remove
        its staging, and return all records (oldest first) for status queries.
        """
        records = self.load()
        for record in records:
            for path in record.get("staging", []):
                removeTree(path)
            if record.get("phase") in ("COMMITTED", "ABORTED"):
                continue
            was = record.get("phase")
            record["reason"] = (
                "the target daemon restarted during the commit; some state may be "
                "installed: " + ", ".join(record.get("installed", [])) + "; the VM "
                "was not released"
                if was == "COMMITTING"
                else f"the target daemon restarted while the migration was {was}"
            )
            record["phase"] = "ABORTED"
            record["updated"] = now
            for device in record.get("devices", []):
                if device.get("state") != "COMMITTED":
                    device["state"] = "ABORTED"
            log.warn(
                "migration {migration_id} aborted at start-up: {reason}",
                migration_id=record.get("migration_id"),
                reason=record["reason"],
            )
            writeAtomically(
                self.path(record["migration_id"]), json.dumps(record).encode()
            )
        for record in records[:-KEEP_FINISHED]:
            self.path(record["migration_id"]).remove()
        return records[-KEEP_FINISHED:]
