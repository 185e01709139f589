"""
What the load benchmark makes of each migration (its outcome, from what the
client reports) and of a batch of them (latency percentiles, throughput, memory).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: How one migration ended, from the client's side.
COMMITTED = "committed"
#: The daemon declined it for load, saying so: a BUSY error, or (before BUSY
#: exists) DEVICE_REFUSED naming a sessions limit.
REFUSED = "refused"
#: A connection closed under it without an answer (a connection limit closes
#: a connection at once, before or during its TLS handshake).
RESET = "reset"
#: Anything else; its reason is kept.
FAILED = "failed"
STATUSES = (COMMITTED, REFUSED, RESET, FAILED)
#: The phases of a client's report, Prepare to Commit.
PHASES = ("prepare", "transfer", "commit")

#: The error code of a declared refusal for load (branch ``load``).
BUSY = "BUSY"
#: What a refusal for load says, in the words of main's DEVICE_REFUSED.
_REFUSAL_CLUES = ("retry later", "max-sessions", "retry after")
#: What a connection closed under a migration looks like, in any layer's words.
_RESET_CLUES = (
    "connection reset",
    "connection was closed",
    "connection to the other side was lost",
    "connectionlost",
    "connectiondone",
    "connection lost",
    "eof occurred",
    "unexpected eof",
    "unexpected_eof",
    "broken pipe",
    "closed the stream",
    "stream lost",
)


def classify(code: str | None, reason: str) -> str:
    """REFUSED, RESET or FAILED for a migration that did not commit."""
    text = reason.lower()
    if code == BUSY or BUSY in reason:
        return REFUSED
    if code in (None, "DEVICE_REFUSED") and any(c in text for c in _REFUSAL_CLUES):
        return REFUSED
    if any(clue in text for clue in _RESET_CLUES):
        return RESET
    return FAILED


def gist(reason: str, limit: int = 160) -> str:
    """``reason`` without its migration ids and domain names, to count alike ones."""
    reason = re.sub(r"\b[0-9a-f]{32}\b", "ID", reason)
    reason = re.sub(r"\b(vm|alone)[0-9-]+\b", "VM", reason)
    return reason[:limit]


def retriesIn(report: dict[str, Any]) -> int:
    """
    The retries a client's report counts (its ``retries``, at the top and per
    device: a number, a list of attempts or a mapping of counts); main's
    client retries nothing and reports none: 0.
    """

    def count(value: Any) -> int:
        if isinstance(value, bool) or value is None:
            return 0
        if isinstance(value, int):
            return value
        if isinstance(value, list | tuple):
            return len(value)
        if isinstance(value, dict):
            return sum(count(v) for v in value.values())
        return 0

    total = count(report.get("retries"))
    for device in report.get("devices") or []:
        if isinstance(device, dict):
            total += count(device.get("retries"))
    return total


@dataclass(frozen=True)
class Outcome:
    """One migration as its client saw it."""

    status: str
    #: Prepare to the Commit's answer (committed migrations only).
    seconds: float | None = None
    retries: int = 0
    reason: str = ""
    #: State bytes the client sent (every device, every round).
    bytes: int = 0
    #: Seconds of each phase the report times (prepare, transfer, commit).
    phases: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fromReport(
        cls, report: dict[str, Any], committed: bool, code: str | None = None
    ) -> Outcome:
        """From a client's report (``xenmig migrate --json``, or the API's)."""
        retries = retriesIn(report)
        sent = sum(d.get("bytes") or 0 for d in report.get("devices") or [])
        durations = report.get("durations") or {}
        phases = {p: durations[p] for p in PHASES if durations.get(p) is not None}
        if committed:
            total = durations["total"]
            return cls(COMMITTED, total, retries, "", sent, phases)
        reason = str(report.get("reason") or "")
        code = code or report.get("error_code") or report.get("code")
        return cls(classify(code, reason), None, retries, reason, sent, phases)

    def toJSON(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "seconds": self.seconds,
            "retries": self.retries,
            "reason": self.reason,
            "bytes": self.bytes,
            "phases": self.phases,
        }

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> Outcome:
        return cls(
            data["status"],
            data["seconds"],
            data["retries"],
            data["reason"],
            data["bytes"],
            data["phases"],
        )


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile (0.99: the value 99 % of them do not exceed)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class Batch:
    """One scenario run against one daemon: its outcomes and figures."""

    scenario: str
    limits: str
    #: Concurrent migrations started, and devices of each.
    count: int
    devices: int
    #: Batches run one after another (each of ``count`` at once).
    runs: int = 1
    outcomes: list[Outcome] = field(default_factory=list)
    #: Seconds from starting the first migration to the end of the last.
    wall: float = 0.0
    #: Prepare-to-Commit seconds of the same migration run alone (the reference).
    alone: list[float] = field(default_factory=list)
    aloneNote: str = "the same migration, alone"
    #: The daemon's resident memory once ready, and just before the batch
    #: (after the reference runs).
    daemonStartRSS: int = 0
    daemonIdleRSS: int = 0
    daemonPeakRSS: int = 0
    daemonCPU: float = 0.0
    clientCPU: float = 0.0
    clientPeakRSS: int = 0
    #: Connection refusals the daemon logged, by the limit it named.
    loggedRefusals: dict[str, int] = field(default_factory=dict)
    options: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Every figure, for the table and ``--json``."""
        counts = Counter(o.status for o in self.outcomes)
        seconds = [o.seconds for o in self.outcomes if o.seconds is not None]
        committed = [o for o in self.outcomes if o.status == COMMITTED]
        sent = sum(o.bytes for o in committed)
        alone = statistics.median(self.alone) if self.alone else None
        p99 = percentile(seconds, 0.99)
        reasons = Counter(gist(o.reason) for o in self.outcomes if o.reason)
        # Memory a glibc heap took stays taken: the growth from the start is
        # an upper bound of what the batch needed (the reference runs included).
        extra = max(0, self.daemonPeakRSS - self.daemonStartRSS)
        return {
            "scenario": self.scenario,
            "limits": self.limits,
            "daemon_options": self.options,
            "migrations": self.count,
            "devices_each": self.devices,
            "runs": self.runs,
            **{status: counts[status] for status in STATUSES},
            "retries": sum(o.retries for o in self.outcomes),
            "p50_s": percentile(seconds, 0.50),
            "p99_s": p99,
            "max_s": max(seconds) if seconds else None,
            "alone_s": alone,
            "alone_is": self.aloneNote,
            "p50_by_phase_s": {
                phase: percentile(
                    [o.phases[phase] for o in committed if phase in o.phases], 0.5
                )
                for phase in PHASES
            },
            "p99_over_alone": p99 / alone if p99 and alone else None,
            "wall_s": self.wall,
            "migrations_per_s": counts[COMMITTED] / self.wall if self.wall else None,
            "mb_per_s": sent / self.wall / 1e6 if self.wall else None,
            "daemon_start_rss": self.daemonStartRSS,
            "daemon_idle_rss": self.daemonIdleRSS,
            "daemon_peak_rss": self.daemonPeakRSS,
            "rss_per_migration": extra / self.count if self.count else None,
            "rss_per_stream": extra / (self.count * self.devices)
            if self.count and self.devices
            else None,
            "daemon_cpu_s": self.daemonCPU,
            "client_cpu_s": self.clientCPU,
            "client_peak_rss": self.clientPeakRSS,
            "logged_connection_refusals": self.loggedRefusals,
            "reasons": dict(reasons.most_common(5)),
        }
