"""MigrationRecord: what the journal writes and the history keeps of a migration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from xenmig.model import DeviceDescription, DeviceOffer, DeviceProgress, MigrationStatus
from xenmig.target.gate import Release
from xenmig.target.installs import Install, Reversal
from xenmig.target.session import FINAL, DeviceState, Phase, TargetSession

#: The ``--on-commit`` hook of a committed migration has yet to run (to its end).
HOOK_PENDING = "pending"
#: ... has run (whatever its exit status).
HOOK_DONE = "done"


@dataclass(frozen=True)
class MigrationRecord:
    """
    One migration as the journal writes it at every phase change and as the
    history keeps it once finished: its status (what C{QueryMigration}
    answers) and the journal's own facts.  L{toJSON} is the journal file's
    content and, for a finished migration, the status on the wire; the
    optional keys (``staging``, ``claimed``, ``refused``, ``installs``,
    ``hook``) appear only when set.
    """

    migrationId: str
    domain: str
    phase: Phase
    peer: str = ""
    reason: str = ""
    started: float = 0.0
    updated: float = 0.0
    devices: tuple[DeviceProgress, ...] = ()
    installed: tuple[str, ...] = ()
    #: Every staging path the session may have created (None: not recorded).
    staging: tuple[str, ...] | None = None
    #: A toolstack's C{AwaitRestored} took this commit: it releases no VM again.
    claimed: bool = False
    #: Prepare refused it: its id may be prepared again.
    refused: bool = False
    #: What its commit installs, written before it installs anything.
    installs: tuple[Install, ...] = ()
    #: Whether the ``--on-commit`` hook of this commit has run: HOOK_PENDING,
    #: HOOK_DONE, or None (no hook was configured when it committed).
    hook: str | None = None

    @classmethod
    def ofSession(
        cls,
        session: TargetSession,
        staging: Sequence[str] | None = None,
        base: MigrationRecord | None = None,
    ) -> MigrationRecord:
        """
        The record of ``session`` as it is now: its status, with ``staging`` if
        given, and the journal's own facts of ``base`` (its previous record).
        """
        # One construction per phase change (a journal write): no intermediate records.
        fields = _statusFields(session.status())
        if staging is not None:
            fields["staging"] = tuple(staging)
        return cls(**fields) if base is None else replace(base, **fields)

    @classmethod
    def ofStatus(cls, status: MigrationStatus) -> MigrationRecord:
        return cls(**_statusFields(status))

    @classmethod
    def refusal(
        cls,
        migrationId: str,
        domain: str,
        peer: str,
        descriptions: Sequence[DeviceDescription],
        offers: Sequence[DeviceOffer],
        now: float,
    ) -> MigrationRecord:
        """
        The record of a refused Prepare: ABORTED, each refused device REFUSED
        with its handler's reason, the others ABORTED.
        """
        reasons = {o.name: o.reason for o in offers}
        refused = "; ".join(o.reason for o in offers if not o.accepted)
        devices = tuple(
            DeviceProgress(
                name=d.name,
                kind=d.kind,
                state=(
                    DeviceState.REFUSED if reasons.get(d.name) else DeviceState.ABORTED
                ).value,
                bytesDone=0,
                bytesExpected=d.size,
                reason=reasons.get(d.name, ""),
            )
            for d in descriptions
        )
        return cls(
            migrationId=migrationId,
            domain=domain,
            phase=Phase.ABORTED,
            peer=peer,
            reason="refused at Prepare: " + refused,
            started=now,
            updated=now,
            devices=devices,
            staging=(),
            refused=True,
        )

    # -- what it says ----------------------------------------------------------------

    @property
    def committed(self) -> bool:
        return self.phase is Phase.COMMITTED

    @property
    def finished(self) -> bool:
        return self.phase in FINAL

    def release(self) -> Release:
        """What the resume gate hands the toolstack for this (committed) migration."""
        return Release(self.migrationId, self.domain, self.installed)

    def claim(self) -> MigrationRecord:
        """The same record, its commit taken by a toolstack."""
        return replace(self, claimed=True)

    def abortedByRestart(
        self, now: float, reversal: Reversal | None = None
    ) -> MigrationRecord:
        """
        What a restarted daemon makes of this unfinished record: ABORTED, with
        the reason the operator reads, and every device ABORTED.  An
        interrupted commit (COMMITTING) comes with the L{Reversal} of its
        installs: what it had installed at destinations is gone, and only
        what a component holds (never released) stays in ``installed``.
        """
        installs = self.installs
        installed = self.installed
        if self.phase is Phase.COMMITTING:
            reversal = reversal or Reversal(self.installs)
            installs = reversal.installs
            installed = tuple(i for i in installed if i not in reversal.removed)
            reason = (
                "the target daemon stopped during the commit, before COMMITTED "
                "was recorded (a crash, or killed); the commit was reversed: "
                + reversal.summary()
                + "; the VM was not released"
            )
        else:
            reason = (
                f"the target daemon restarted while the migration was "
                f"{self.phase.value}"
            )
        devices = tuple(
            d
            if d.state == DeviceState.ABORTED.value
            else replace(d, state=DeviceState.ABORTED.value)
            for d in self.devices
        )
        return replace(
            self,
            phase=Phase.ABORTED,
            reason=reason,
            updated=now,
            devices=devices,
            installs=installs,
            installed=installed,
        )

    def hookDelivered(self) -> MigrationRecord:
        """The same record, its ``--on-commit`` hook run."""
        return replace(self, hook=HOOK_DONE)

    @property
    def hookPending(self) -> bool:
        """Whether it committed and its hook has yet to run to its end."""
        return self.committed and self.hook == HOOK_PENDING

    # -- JSON ------------------------------------------------------------------------

    def status(self) -> MigrationStatus:
        return MigrationStatus(
            migrationId=self.migrationId,
            domain=self.domain,
            phase=self.phase.value,
            peer=self.peer,
            reason=self.reason,
            started=self.started,
            updated=self.updated,
            devices=self.devices,
            installed=self.installed,
        )

    def toJSON(self) -> dict[str, Any]:
        """The journal's (and the wire's) form of this record."""
        data = self.status().toJSON()
        if self.staging is not None:
            data["staging"] = list(self.staging)
        if self.claimed:
            data["claimed"] = True
        if self.refused:
            data["refused"] = True
        if self.installs:
            data["installs"] = [i.toJSON() for i in self.installs]
        if self.hook is not None:
            data["hook"] = self.hook
        return data

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> MigrationRecord:
        """
        The inverse of L{toJSON}; a key other than ``migration_id`` and
        ``phase`` may be missing (it takes its default).

        @raise KeyError, TypeError, ValueError: if ``data`` is not a record.
        """
        staging = data.get("staging")
        return cls(
            migrationId=str(data["migration_id"]),
            domain=data.get("domain", ""),
            phase=Phase(data["phase"]),
            peer=data.get("peer", ""),
            reason=data.get("reason", ""),
            started=data.get("started", 0.0),
            updated=data.get("updated", 0.0),
            devices=tuple(_progress(d) for d in data.get("devices", [])),
            installed=tuple(data.get("installed", [])),
            staging=None if staging is None else tuple(staging),
            claimed=bool(data.get("claimed", False)),
            refused=bool(data.get("refused", False)),
            installs=tuple(Install.fromJSON(i) for i in data.get("installs", [])),
            hook=data.get("hook"),
        )


def _statusFields(status: MigrationStatus) -> dict[str, Any]:
    """The fields of a record that come from a session's status."""
    return {
        "migrationId": status.migrationId,
        "domain": status.domain,
        "phase": Phase(status.phase),
        "peer": status.peer,
        "reason": status.reason,
        "started": status.started,
        "updated": status.updated,
        "devices": status.devices,
        "installed": status.installed,
    }


def _progress(data: dict[str, Any]) -> DeviceProgress:
    return DeviceProgress(
        name=data["name"],
        kind=data.get("kind", ""),
        state=data["state"],
        bytesDone=data.get("bytes_done", 0),
        bytesExpected=data.get("bytes_expected", 0),
        rate=data.get("rate", 0.0),
        digest=data.get("digest", ""),
        reason=data.get("reason", ""),
    )
