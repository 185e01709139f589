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
    @property
    def retries(self) -> int: ...
    @property
    def bandwidth(self) -> int | None: ...
    @property
    def policy(self) -> Any: ...


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
        "retries": migration.retries,
        "bandwidth_limit": migration.bandwidth,
        "downtime": downtimeReport(migration, paused),
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


def downtimeReport(
    migration: ReportedMigration, paused: float | None
) -> dict[str, Any] | None:
    """
    With a maximum downtime: the limit, the largest of the devices' estimates
    of their final round (seconds), each device's, and the paused window.
    """
    limit = getattr(migration.policy, "maxDowntime", None)
    if limit is None:
        return None
    estimates = {
        run.name: _rounded(getattr(run.policy, "estimate", None))
        for run in migration.devices.values()
        if run.policy is not None
    }
    known = [e for e in estimates.values() if e is not None]
    return {
        "limit": limit,
        "estimate": max(known) if known else None,
        "estimates": estimates,
        "fallback": migration.policy.fallback,
        "exceeded": any(
            getattr(run.policy, "exceeded", False) for run in migration.devices.values()
        ),
        "paused_window": paused,
    }


def _rounded(seconds: float | None) -> float | None:
    if seconds is None or seconds == float("inf"):
        return None
    return round(seconds, 6)


def deviceReport(run: DeviceRun) -> dict[str, Any]:
    """One device's part of the report: bytes, rounds, digest and seconds."""
    seconds = None
    if run.started is not None and run.finished is not None:
        seconds = round(run.finished - run.started, 6)
    report = {
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
    if any(run.roundFigures or []):
        report["round_figures"] = [dict(f) for f in run.roundFigures or []]
    return report
