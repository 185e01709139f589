"""The report of a source migration: per-device figures and phase durations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from xenmig.source.device import DeviceRun


class ReportedMigration(Protocol):
    """What the report reads of a L{xenmig.source.migration.SourceMigration}."""

    @property
    def migrationId(self) -> str: ...
    @property
    def domain(self) -> str: ...
    @property
    def phase(self) -> Any: ...
    @property
    def reason(self) -> str: ...
    @property
    def installed(self) -> Sequence[str]: ...
    @property
    def times(self) -> Mapping[str, float]: ...
    @property
    def pausedAt(self) -> float | None: ...
    @property
    def devices(self) -> Mapping[str, DeviceRun]: ...


#: Each reported duration: from one mark of the migration's C{times} to another.
DURATIONS = {
    "prepare": ("prepare", "prepared"),
    "precopy": ("precopy", "precopied"),
    "transfer": ("transfer", "ready"),
    "commit": ("commit", "committed"),
    "total": ("prepare", "committed"),
}
#: Where "total" ends for a migration that did not commit (aborted or in doubt).
ENDED = "ended"


def migrationReport(migration: ReportedMigration) -> dict[str, Any]:
    """The JSON report: ids, per-device bytes and digests, phase durations."""
    times = migration.times

    def span(start: str, end: str) -> float | None:
        if start in times and end in times:
            return round(times[end] - times[start], 6)
        return None

    paused = None
    if migration.pausedAt is not None and "committed" in times:
        paused = round(times["committed"] - migration.pausedAt, 6)
    return {
        "migration_id": migration.migrationId,
        "domain": migration.domain,
        "phase": migration.phase.value,
        "reason": migration.reason,
        "installed": list(migration.installed),
        "durations": {
            name: span(*marks)
            if name != "total" or "committed" in times
            else span(marks[0], ENDED)
            for name, marks in DURATIONS.items()
        },
        "paused_window": paused,
        "devices": [deviceReport(run) for run in migration.devices.values()],
        "reconnections": reconnections(migration),
    }


def reconnections(migration: ReportedMigration) -> dict[str, int]:
    """
    The broken connections a resumable migration survived: its control
    connection's and its streams', and the stream bytes it sent again.
    """
    link = getattr(migration, "link", None)
    runs = migration.devices.values()
    return {
        "control": getattr(link, "reconnections", 0),
        "streams": sum(run.resent[1] for run in runs),
        "resent_bytes": sum(run.resent[0] for run in runs),
    }


def deviceReport(run: DeviceRun) -> dict[str, Any]:
    """One device's part of the report: bytes, rounds, digest and seconds."""
    seconds = None
    if run.started is not None and run.finished is not None:
        seconds = round(run.finished - run.started, 6)
    return {
        "name": run.name,
        "kind": run.spec.kind,
        "bytes": run.bytesSent,
        "data_bytes": run.sender.dataBytes if run.sender else 0,
        "expected": run.description.size if run.description else 0,
        "rounds": list(run.rounds or []),
        "digest": run.digest.hex if run.digest else None,
        "seconds": seconds,
        "reconnections": run.resent[1],
        "resent_bytes": run.resent[0],
    }
