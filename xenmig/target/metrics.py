"""What the target's core reports for metrics, and the Prometheus figures made of it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from xenmig.target.session import TargetSession
from xenmig.target.summary import PHASES, MigrationSummary

#: Upper bounds (seconds) of the phase duration buckets: a vTPM's READY phase
#: takes milliseconds, a large disk's RECEIVING an hour.
PHASE_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    *(10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
)
#: Upper bounds (seconds) of the paused window buckets: what the VM's
#: downtime budget is counted in.
PAUSED_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
    *(1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0),
)
#: The label of a device kind this daemon has no handler for (a refused Prepare).
OTHER_KIND = "other"


class MigrationMetrics:
    """
    What the target's core reports about its migrations, as it happens; this
    one keeps nothing (a core without metrics).  L{PrometheusMetrics} counts.
    """

    def opened(self, session: TargetSession) -> None:
        """A session opened (its Prepare accepted every device)."""

    def ended(self, summary: MigrationSummary) -> None:
        """A migration ended (COMMITTED, ABORTED), or a Prepare was REFUSED."""

    def peerRefused(self) -> None:
        """The peers file refused a peer (a connection's handshake or a command)."""


class ConnectionCounts(Protocol):
    """What the metrics read of a listener's L{xenmig.limits.ConnectionGate}."""

    @property
    def open(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def pendingHandshakes(self) -> int: ...


class PrometheusMetrics(MigrationMetrics):
    """
    The daemon's figures in a registry of its own (L{registry}), for the
    ``--metrics`` endpoint: counted at the core's reports, and, for what is
    live (sessions, staging, connections), read when scraped.  Everything
    runs in the reactor's thread, scrapes included.

    @param kinds: the device kinds this daemon has handlers for: label values
        come from them only (any other kind is L{OTHER_KIND}).
    """

    def __init__(self, kinds: Iterable[str] = ()) -> None:
        self.kinds = frozenset(kinds)
        self.registry = CollectorRegistry()
        self._live: dict[str, TargetSession] = {}
        #: Data bytes received by the migrations that have ended, by kind.
        self._receivedBefore: dict[str, int] = dict.fromkeys(self.kinds, 0)
        self._gates: list[ConnectionCounts] = []
        self.migrations = Counter(
            "xenmig_migrations",
            "Migrations that ended, by outcome (COMMITTED, ABORTED, or REFUSED: "
            "a Prepare that opened no session) and the kinds of their devices.",
            ["outcome", "kinds"],
            registry=self.registry,
        )
        self.refusedPeers = Counter(
            "xenmig_refused_peers",
            "Refusals of a peer by the peers file: at its connection's handshake "
            "and at each command it sends.",
            registry=self.registry,
        )
        self.phaseSeconds = Histogram(
            "xenmig_phase_duration_seconds",
            "Seconds a migration spent in each phase, observed when it ends.",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        for phase in PHASES:
            self.phaseSeconds.labels(phase=phase.value)
        self.pausedWindow = Histogram(
            "xenmig_paused_window_seconds",
            "Committed migrations: seconds from the first final-round record "
            "received to COMMITTED, when the VM is released to the toolstack.",
            buckets=PAUSED_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveFigures(self))

    def watchConnections(self, gate: ConnectionCounts) -> None:
        """Count the connections of a listener, and those its limits refused."""
        self._gates.append(gate)

    # -- what the core reports ---------------------------------------------------

    def opened(self, session: TargetSession) -> None:
        self._live[session.migrationId] = session

    def ended(self, summary: MigrationSummary) -> None:
        self._live.pop(summary.migrationId, None)
        for device in summary.devices:
            kind = self.kindLabel(device.kind)
            self._receivedBefore[kind] = self._receivedBefore.get(kind, 0) + (
                device.bytes
            )
        kinds = "+".join(sorted({self.kindLabel(k) for k in summary.kinds}))
        self.migrations.labels(outcome=summary.outcome, kinds=kinds or "none").inc()
        for phase, seconds in summary.durations:
            self.phaseSeconds.labels(phase=phase.value).observe(seconds)
        if summary.pausedWindow is not None:
            self.pausedWindow.observe(summary.pausedWindow)

    def peerRefused(self) -> None:
        self.refusedPeers.inc()

    # -- what is read when scraped -----------------------------------------------

    def kindLabel(self, kind: str) -> str:
        return kind if kind in self.kinds else OTHER_KIND

    def liveSessions(self) -> list[TargetSession]:
        """The sessions that have opened and whose end is not reported yet."""
        return list(self._live.values())

    def received(self) -> dict[str, int]:
        """Data bytes received so far, by kind: ended migrations and live ones."""
        total = dict(self._receivedBefore)
        for session in self._live.values():
            for slot in session.devices.values():
                kind = self.kindLabel(slot.description.kind)
                total[kind] = total.get(kind, 0) + slot.dataBytes
        return total

    def gates(self) -> list[ConnectionCounts]:
        return list(self._gates)


class _LiveFigures:
    """A collector of what L{PrometheusMetrics} reads when it is scraped."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return list(self._families({}, [], []))

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        return self._families(
            metrics.received(), metrics.liveSessions(), metrics.gates()
        )

    def _families(
        self,
        received: dict[str, int],
        sessions: list[TargetSession],
        gates: list[ConnectionCounts],
    ) -> Iterator[Metric]:
        counted = CounterMetricFamily(
            "xenmig_received_bytes",
            "Bytes of device state data received by the streams, by device kind "
            "(holes sent as zero records count nothing).",
            labels=["kind"],
        )
        for kind, count in sorted(received.items()):
            counted.add_metric([kind], count)
        yield counted
        active = GaugeMetricFamily(
            "xenmig_sessions",
            "Migrations running on this host, by phase.",
            labels=["phase"],
        )
        for phase in PHASES:
            active.add_metric(
                [phase.value], sum(1 for s in sessions if s.phase is phase)
            )
        yield active
        yield GaugeMetricFamily(
            "xenmig_staging_bytes",
            "Bytes of state data the streams of migrations not yet ended have "
            "delivered to their staging, to be installed or discarded.",
            value=sum(_dataBytes(s) for s in sessions),
        )
        yield from _connectionFamilies(gates)


def _dataBytes(session: TargetSession) -> int:
    return sum(slot.dataBytes for slot in session.devices.values())


def _connectionFamilies(gates: list[ConnectionCounts]) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "xenmig_refused_connections",
        "Connections closed at once by the connection limits, before any TLS "
        "handshake (--max-connections, --max-handshakes, --per-address-handshakes).",
        value=sum(g.refused for g in gates),
    )
    yield GaugeMetricFamily(
        "xenmig_open_connections",
        "Connections open on the daemon's port: control, streams, handshakes.",
        value=sum(g.open for g in gates),
    )
    yield GaugeMetricFamily(
        "xenmig_pending_handshakes",
        "Connections whose TLS handshake is in progress.",
        value=sum(g.pendingHandshakes for g in gates),
    )
