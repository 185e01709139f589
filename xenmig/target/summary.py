"""MigrationSummary: the one line a target logs when a migration ends, or is refused."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from xenmig.limits import bounded
from xenmig.target.session import FINAL, Phase, TargetSession

log = Logger()

#: The outcome of a Prepare that opened no session.
REFUSED = "REFUSED"
#: The phases before a migration's end, in the order it goes through them.
PHASES = (Phase.PREPARED, Phase.RECEIVING, Phase.READY, Phase.COMMITTING)
#: The longest text a field taken from a refused Prepare keeps.
MOST_CHARS = 200
#: The most devices of a refused Prepare that its summary names.
MOST_DEVICES = 64

#: The line, in parts: each applies when its field has something to say.
_LINE = (
    "migration {migration_id} {outcome}: {domain} from {peer}; {bytes_received} "
    "bytes received in {duration:.3f} s ({durations}); devices: {devices}"
)
_PAUSED = "; paused window {paused_window:.3f} s"
_REASON = "; reason: {reason}"


class DeviceTotals(list[dict[str, Any]]):
    """
    The devices of a migration as a log field: a list of ``{kind, name,
    bytes}`` (a JSON list), written ``kind:name N bytes, ...`` in text.
    """

    def __str__(self) -> str:
        return (
            ", ".join(f"{d['kind']}:{d['name']} {d['bytes']} bytes" for d in self)
            or "none"
        )


class PhaseDurations(dict[str, float]):
    """
    Seconds spent in each phase, as a log field: a JSON object keyed by phase,
    written ``PHASE 0.123 s, ...`` in text.
    """

    def __str__(self) -> str:
        return (
            ", ".join(f"{phase} {seconds:.3f} s" for phase, seconds in self.items())
            or "no phase"
        )


@dataclass(frozen=True)
class DeviceTotal:
    """One device in a summary: its kind, its name and the data bytes received."""

    kind: str
    name: str
    bytes: int


@dataclass(frozen=True)
class MigrationSummary:
    """
    What a migration came to on this host, once over: COMMITTED or ABORTED
    (a session's end), or REFUSED (a Prepare that opened no session).
    Durations are in seconds of the target's clock.
    """

    migrationId: str
    domain: str
    peer: str
    outcome: str
    reason: str
    devices: tuple[DeviceTotal, ...]
    #: Seconds in each phase it went through, in order.
    durations: tuple[tuple[Phase, float], ...]
    #: Seconds from its Prepare to its end.
    duration: float
    #: Committed only: seconds from the first final-round record received to
    #: COMMITTED, when the VM is released (see doc/daemon.md, Metrics).
    pausedWindow: float | None = None

    @property
    def bytesReceived(self) -> int:
        return sum(device.bytes for device in self.devices)

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(device.kind for device in self.devices)

    @classmethod
    def ofSession(cls, session: TargetSession) -> MigrationSummary:
        """The summary of a session that has ended (COMMITTED or ABORTED)."""
        assert session.phase in FINAL, session.phase
        entered = list(session.entered.items())
        durations = tuple(
            (phase, after - start)
            for (phase, start), (_, after) in zip(entered, entered[1:], strict=False)
            if phase in PHASES
        )
        end = session.entered[session.phase]
        paused = None
        if session.phase is Phase.COMMITTED and session.finalRoundAt is not None:
            paused = max(0.0, end - session.finalRoundAt)
        return cls(
            migrationId=session.migrationId,
            domain=session.domain,
            peer=session.peer,
            outcome=session.phase.value,
            reason=session.reason,
            devices=tuple(
                DeviceTotal(slot.description.kind, slot.name, slot.dataBytes)
                for slot in session.devices.values()
            ),
            durations=durations,
            duration=end - session.started,
            pausedWindow=paused,
        )

    @classmethod
    def ofRefusal(
        cls,
        migrationId: Any,
        domain: Any,
        peer: str,
        devices: Any,
        reason: str,
        duration: float = 0.0,
    ) -> MigrationSummary:
        """
        The summary of a refused Prepare, from its arguments as they came
        (they may be what made it refused: each is cut to a bounded length).
        """
        return cls(
            migrationId=_text(migrationId),
            domain=_text(domain),
            peer=peer,
            outcome=REFUSED,
            reason=reason,
            devices=tuple(_offered(devices)),
            durations=(),
            duration=duration,
        )

    def fields(self) -> dict[str, Any]:
        """The fields of its log event (what a JSON log carries)."""
        return {
            "migration_id": self.migrationId,
            "domain": self.domain,
            "peer": self.peer,
            "outcome": self.outcome,
            "reason": self.reason,
            "devices": DeviceTotals(
                {"kind": d.kind, "name": d.name, "bytes": d.bytes} for d in self.devices
            ),
            "bytes_received": self.bytesReceived,
            "durations": PhaseDurations(
                (phase.value, round(seconds, 6)) for phase, seconds in self.durations
            ),
            "duration": round(self.duration, 6),
            "paused_window": (
                None if self.pausedWindow is None else round(self.pausedWindow, 6)
            ),
        }

    def log(self) -> None:
        """Log it: one info event of the namespace C{xenmig.target.summary}."""
        line = _LINE
        if self.pausedWindow is not None:
            line += _PAUSED
        if self.reason:
            line += _REASON
        log.info(line, **self.fields())


def _text(value: Any) -> str:
    return bounded(value if isinstance(value, str) else repr(value), MOST_CHARS)


def _offered(devices: Any) -> Iterable[DeviceTotal]:
    """The kind and name of each device a Prepare offered, as far as it says."""
    if not isinstance(devices, Sequence) or isinstance(devices, str | bytes):
        return []
    return [
        DeviceTotal(_text(d.get("kind", "")), _text(d.get("name", "")), 0)
        for d in devices[:MOST_DEVICES]
        if isinstance(d, dict)
    ]
