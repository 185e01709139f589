"""MigrationHistory: the migrations a target knows, live and finished; their status."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenmig.amp_commands import MAX_JSON
from xenmig.errors import (
    DuplicateMigration,
    InvalidTransition,
    MigrationAborted,
    NotAuthorized,
    UnknownMigration,
)
from xenmig.limits import bounded
from xenmig.target.journal import KEEP_FINISHED, Journal
from xenmig.target.migrationrecord import MigrationRecord
from xenmig.target.session import FINAL, TargetSession

log = Logger()

#: Finished sessions kept as live objects; older ones become records.
KEEP_IN_MEMORY = 32


class MigrationHistory:
    """
    Every migration this host knows: the sessions (running, and the newest
    L{KEEP_IN_MEMORY} finished ones), and the L{MigrationRecord}s of older
    finished migrations (the newest L{KEEP_FINISHED}), from the journal, from
    refused Prepares and from pruned sessions.  What changes is written to the
    L{Journal}.  It answers which session an id names, and the status that
    C{QueryMigration} and C{ListMigrations} show.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.sessions: dict[str, TargetSession] = {}
        self.records: dict[str, MigrationRecord] = {}
        #: The record last sent to the journal of each session kept live: the
        #: journal's own facts (installs, claim, hook) are carried from it.
        self._journalled: dict[str, MigrationRecord] = {}

    # -- what it holds -----------------------------------------------------------------

    def opened(self, session: TargetSession) -> None:
        """Keep a session that has just opened (its PREPARED record is durable)."""
        self.sessions[session.migrationId] = session

    def journalled(self, record: MigrationRecord) -> Deferred[None]:
        """
        Journal ``record``; a Deferred firing once it is durable, or failing
        with JournalUnavailable if the state directory cannot take it.
        """
        return self.journal.write(record.migrationId, record.toJSON())

    def withdrawn(self, migrationId: str) -> Deferred[None]:
        """A record that could not be written is no longer wanted (L{journalled})."""
        return self.journal.withdraw(migrationId)

    def changed(self, session: TargetSession, staging: Sequence[str]) -> Deferred[None]:
        """
        Journal the session as it is now, with its ``staging`` paths; a
        Deferred firing once that is durable (failing with JournalUnavailable).
        """
        return self.write(self.recordOf(session, staging))

    def noted(self, session: TargetSession, staging: Sequence[str]) -> None:
        """
        Note the session as it is now (see L{Journal.note}): a change that
        recovery treats as it treats the record before it.
        """
        record = self.recordOf(session, staging)
        self._journalled[record.migrationId] = record
        self.journal.note(record.migrationId, record.toJSON())

    def recordOf(
        self, session: TargetSession, staging: Sequence[str] | None = None
    ) -> MigrationRecord:
        """
        The record of a live session as it is now: its status, and the facts
        of the record last journalled for it (staging too, unless given).
        """
        base = self._journalled.get(session.migrationId)
        return MigrationRecord.ofSession(session, staging, base)

    def write(self, record: MigrationRecord) -> Deferred[None]:
        """
        Send ``record`` to the journal as the newest of its migration; a
        Deferred firing once it is durable, or failing with JournalUnavailable
        (it then stays due: see L{Journal}).
        """
        if record.migrationId in self.sessions:
            self._journalled[record.migrationId] = record
        elif record.migrationId in self.records:
            self.records[record.migrationId] = record
        return self.journal.write(record.migrationId, record.toJSON())

    def recovered(self, record: MigrationRecord) -> None:
        """Keep a record the journal had at start-up."""
        self.records[record.migrationId] = record

    def refused(self, record: MigrationRecord) -> None:
        """Keep and journal the record of a refused Prepare."""
        self.records[record.migrationId] = record
        self.prune()
        self._write(record)

    def record(self, migrationId: str) -> MigrationRecord | None:
        """The record of a finished migration no longer kept as a session."""
        return self.records.get(migrationId)

    def claim(self, migrationId: str, claimed: bool = True) -> Deferred[None]:
        """
        Journal that the commit of ``migrationId`` is taken by a toolstack (or,
        ``claimed`` false, that it is not: a claim that could not be recorded
        or answered); a Deferred firing once durable, failing with
        JournalUnavailable.  A session comes first: a record under the same id
        is an older, refused Prepare of it.
        """
        session = self.sessions.get(migrationId)
        record = self.records.get(migrationId)
        if session is not None:
            record = self.recordOf(session)
        if record is None:
            return succeed(None)
        return self.write(replace(record, claimed=claimed))

    def hookDelivered(self, migrationId: str) -> Deferred[None]:
        """Journal that the ``--on-commit`` hook of ``migrationId`` has run."""
        session = self.sessions.get(migrationId)
        record = self.records.get(migrationId)
        if session is not None:
            record = self.recordOf(session)
        if record is None:
            return succeed(None)
        return self.write(record.hookDelivered())

    def _write(self, record: MigrationRecord) -> None:
        def failed(failure: Failure) -> None:
            log.failure(
                "migration {migration_id}: journal write failed",
                failure,
                migration_id=record.migrationId,
            )

        self.write(record).addErrback(failed)

    def prune(self) -> None:
        """Keep finished sessions as records, and only the most recent ones."""
        finished = sorted(
            (s for s in self.sessions.values() if s.phase in FINAL),
            key=lambda s: s.updated,
        )
        for session in finished[:-KEEP_IN_MEMORY]:
            self.records[session.migrationId] = self.recordOf(session)
            del self.sessions[session.migrationId]
            self._journalled.pop(session.migrationId, None)
        for migrationId in sorted(self.records, key=lambda k: self.records[k].started)[
            :-KEEP_FINISHED
        ]:
            del self.records[migrationId]

    # -- which session -----------------------------------------------------------------

    def checkNew(self, migrationId: str) -> None:
        """
        @raise DuplicateMigration: if ``migrationId`` was used here (a refused
            Prepare's id may be used again).
        """
        record = self.records.get(migrationId)
        if migrationId in self.sessions or (record is not None and not record.refused):
            raise DuplicateMigration(f"migration {migrationId} already exists here")

    def session(self, migrationId: str, peer: str | None = None) -> TargetSession:
        """
        The session, if ``peer`` (when given) is the host that prepared it.

        @raise InvalidTransition: if it committed and is kept only as a record.
        @raise MigrationAborted: if it aborted and is kept only as a record.
        @raise UnknownMigration: if this host does not know it.
        @raise NotAuthorized: if it is another peer's.
        """
        session = self.sessions.get(migrationId)
        if session is None:
            record = self.records.get(migrationId)
            if record is not None and record.committed:
                raise InvalidTransition(f"migration {migrationId} has committed")
            if record is not None:
                raise MigrationAborted(
                    f"migration {migrationId} was aborted: {record.reason}"
                )
            raise UnknownMigration(f"no migration {migrationId!r} on this host")
        if peer is not None and peer != session.peer:
            raise NotAuthorized(
                f"migration {migrationId} belongs to {session.peer}, not {peer}"
            )
        return session

    # -- status ------------------------------------------------------------------------

    def status(self, migrationId: str, viewer: str | None = None) -> dict[str, Any]:
        """
        The status of a migration, as the wire carries it; a ``viewer`` (None:
        anyone) sees only its own migrations.

        @raise UnknownMigration: if there is none, or not the viewer's.
        """
        status: dict[str, Any] | None = None
        if migrationId in self.sessions:
            status = self.sessions[migrationId].status().toJSON()
        elif migrationId in self.records:
            status = self.records[migrationId].toJSON()
        if status is None or not _visible(status, viewer):
            raise UnknownMigration(
                f"no migration {bounded(repr(migrationId), 200)} on this host"
            )
        return status

    def newest(self, limit: int, viewer: str | None = None) -> list[dict[str, Any]]:
        """
        The statuses of the most recent migrations, newest first: at most
        ``limit``, and no more than fit in one AMP answer (``viewer``: see
        L{status}).
        """
        statuses = {k: r.toJSON() for k, r in self.records.items()}
        statuses.update({k: s.status().toJSON() for k, s in self.sessions.items()})
        visible = [s for s in statuses.values() if _visible(s, viewer)]
        ordered = sorted(visible, key=lambda s: s.get("started", 0))[::-1]
        chosen: list[dict[str, Any]] = []
        budget = MAX_JSON - 1024
        for status in ordered[: max(1, min(limit, KEEP_FINISHED))]:
            budget -= len(json.dumps(status)) + 2
            if budget < 0:
                break
            chosen.append(status)
        return chosen


def _visible(status: dict[str, Any], viewer: str | None) -> bool:
    return viewer is None or status.get("peer") == viewer
