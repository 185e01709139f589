"""The summary line of each migration, and the metrics the core reports to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from xenmig.digest import hashBytes
from xenmig.errors import DuplicateMigration, NotAuthorized, XenmigError
from xenmig.limits import ConnectionGate, ConnectionLimits
from xenmig.records import encodeData, encodeEnd, encodeRound, encodeStreamHeader
from xenmig.streamreceiver import StreamReceiver
from xenmig.target.authz import PolicySource
from xenmig.target.config import TargetConfig
from xenmig.target.core import MigrationTarget
from xenmig.target.metrics import PrometheusMetrics
from xenmig.target.summary import MigrationSummary
from xenmig.testing import MemoryKind

PEER = "source.test"
STATE = b"the state of a device, " * 10


class Host:
    """A target in memory, with a clock, its metrics, and synchronous threads."""

    def __init__(self, tmp_path: Path, peers: str | None = None) -> None:
        self.clock = task.Clock()
        self.clock.advance(1000)
        config = TargetConfig(FilePath(str(tmp_path / "state")))
        policy = None
        if peers is not None:
            path = tmp_path / "peers.toml"
            path.write_text(peers)
            policy = PolicySource(str(path), config.roots)
            policy.load()
        self.metrics = PrometheusMetrics(["memory"])
        self.target = MigrationTarget(
            self.clock,
            config,
            {"memory": MemoryKind()},
            maybeDeferred,
            policy=policy,
            metrics=self.metrics,
        )
        self.target.recover()

    def prepare(self, migrationId: str, *names: str, **params: Any) -> Any:
        devices = [
            {
                "kind": "memory",
                "name": name,
                "size": len(STATE),
                "precopy": False,
                "params": params,
            }
            for name in names or ("dev",)
        ]
        d = maybeDeferred(self.target.prepare, PEER, migrationId, "vm1", 1, devices)
        return outcome(d)

    def send(self, migrationId: str, device: str = "dev", final: bool = True) -> None:
        """The stream of ``device``: a final round, its state, END."""
        token = self.target.openStream(PEER, migrationId, device)
        session, name = self.target.claimToken(PEER, token)
        receiver = StreamReceiver(session, name, 60.0)
        receiver.makeConnection(StringTransport())
        digest = hashBytes(STATE)
        receiver.dataReceived(encodeStreamHeader())
        if final:
            receiver.dataReceived(b"".join(encodeRound(0, True)))
        self.clock.advance(0.5)
        receiver.dataReceived(b"".join(encodeData(0, STATE)))
        self.clock.advance(0.25)
        end = encodeEnd(len(STATE), digest.algorithm, digest.digest)
        receiver.dataReceived(b"".join(end))

    def commit(self, migrationId: str) -> Any:
        return outcome(maybeDeferred(self.target.commit, PEER, migrationId))

    def scrape(self) -> dict[str, float]:
        """Every sample of the metrics, as ``name{label=value,...}``: value."""
        text = generate_latest(self.metrics.registry).decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples


def outcome(d: Deferred[Any]) -> Any:
    """What a Deferred that has fired came to: its result, or its Failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "it has not fired"
    return results[0]


def summaries(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e["log_namespace"] == "xenmig.target.summary"]


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_aCommittedMigrationHasOneSummary(host: Host) -> None:
    """A committed migration logs one summary: devices, bytes, phases, window."""
    with capturedLogs() as events:
        host.prepare("m-1")
        host.clock.advance(2)
        host.send("m-1")
        host.clock.advance(3)
        host.commit("m-1")
    [line] = summaries(events)
    assert line["migration_id"] == "m-1"
    assert (line["domain"], line["peer"]) == ("vm1", PEER)
    assert (line["outcome"], line["reason"]) == ("COMMITTED", "")
    assert line["devices"] == [{"kind": "memory", "name": "dev", "bytes": len(STATE)}]
    assert line["bytes_received"] == len(STATE)
    assert line["durations"] == {
        "PREPARED": 2.0,
        "RECEIVING": 0.75,
        "READY": 3.0,
        "COMMITTING": 0.0,
    }
    assert line["duration"] == 5.75
    assert line["paused_window"] == 3.75  # the final round's record to COMMITTED
    assert formatEvent(line) == (
        f"migration m-1 COMMITTED: vm1 from {PEER}; {len(STATE)} bytes received "
        f"in 5.750 s (PREPARED 2.000 s, RECEIVING 0.750 s, READY 3.000 s, "
        f"COMMITTING 0.000 s); devices: memory:dev {len(STATE)} bytes; paused "
        f"window 3.750 s"
    )


def test_anAbortedMigrationHasOneSummaryWithItsReason(host: Host) -> None:
    """An aborted migration logs one summary, ABORTED, with the reason, no window."""
    with capturedLogs() as events:
        host.prepare("m-2", "a", "b")
        host.send("m-2", "a")
        host.clock.advance(host.target.timeouts.receiving)
    [line] = summaries(events)
    assert line["outcome"] == "ABORTED"
    assert "RECEIVING phase did not finish" in line["reason"]
    assert line["reason"] in formatEvent(line)
    assert [d["bytes"] for d in line["devices"]] == [len(STATE), 0]
    assert list(line["durations"]) == ["PREPARED", "RECEIVING"]
    assert line["paused_window"] is None
    assert "paused window" not in formatEvent(line)


def test_aPrepareRefusedByAHandlerIsSummarizedRefused(host: Host) -> None:
    """A Prepare a handler refuses logs one REFUSED summary naming its devices."""
    with capturedLogs() as events:
        host.prepare("m-3", "a", refuse="no room for it")
    [line] = summaries(events)
    assert (line["migration_id"], line["outcome"]) == ("m-3", "REFUSED")
    assert "no room for it" in line["reason"]
    assert line["devices"] == [{"kind": "memory", "name": "a", "bytes": 0}]
    assert line["durations"] == {}


def test_aPrepareRefusedAtOnceIsSummarizedRefused(tmp_path: Path) -> None:
    """A peer the peers file refuses: its Prepare is REFUSED, the peer counted."""
    host = Host(tmp_path, peers='[[peer]]\nidentity = "other.test"\n')
    with capturedLogs() as events:
        failure = host.prepare("m-4")
    assert isinstance(failure, Failure) and failure.check(NotAuthorized)
    [line] = summaries(events)
    assert (line["outcome"], line["peer"]) == ("REFUSED", PEER)
    scraped = host.scrape()
    assert scraped["xenmig_refused_peers_total{}"] == 1
    assert scraped["xenmig_migrations_total{kinds=memory,outcome=REFUSED}"] == 1


def test_aPrepareSentAgainIsNotASecondSummary(host: Host) -> None:
    """A Prepare of an id this host has is refused without a summary of its own."""
    host.prepare("m-5")
    host.send("m-5")
    host.commit("m-5")
    with capturedLogs() as events:
        failure = host.prepare("m-5")
    assert isinstance(failure, Failure) and failure.check(DuplicateMigration)
    assert summaries(events) == []


def test_garbageInARefusedPrepareIsBounded(host: Host) -> None:
    """A Prepare refused for its arguments is summarized with them cut short."""
    with capturedLogs() as events:
        failure = outcome(
            maybeDeferred(
                host.target.prepare, PEER, "x" * 5000, "vm1", 1, [{"kind": 7}, "junk"]
            )
        )
    assert isinstance(failure, Failure) and failure.check(XenmigError)
    [line] = summaries(events)
    assert len(line["migration_id"]) <= 200
    assert line["devices"] == [{"kind": "7", "name": "", "bytes": 0}]
    assert host.scrape()["xenmig_migrations_total{kinds=other,outcome=REFUSED}"] == 1


def test_theMetricsFollowTheMigrations(host: Host) -> None:
    """Counters, histograms and live gauges move with the core's migrations."""
    host.prepare("m-6")
    host.send("m-6")
    during = host.scrape()
    assert during["xenmig_sessions{phase=READY}"] == 1
    assert during["xenmig_staging_bytes{}"] == len(STATE)
    assert during["xenmig_received_bytes_total{kind=memory}"] == len(STATE)
    host.commit("m-6")
    host.prepare("m-7")
    outcome(Deferred.fromCoroutine(host.target.abort(None, "m-7", "changed my mind")))
    after = host.scrape()
    assert after["xenmig_sessions{phase=READY}"] == 0
    assert after["xenmig_staging_bytes{}"] == 0
    assert after["xenmig_received_bytes_total{kind=memory}"] == len(STATE)
    assert after["xenmig_migrations_total{kinds=memory,outcome=COMMITTED}"] == 1
    assert after["xenmig_migrations_total{kinds=memory,outcome=ABORTED}"] == 1
    assert after["xenmig_phase_duration_seconds_count{phase=PREPARED}"] == 2
    assert after["xenmig_phase_duration_seconds_count{phase=COMMITTING}"] == 1
    assert after["xenmig_phase_duration_seconds_sum{phase=RECEIVING}"] == 0.75
    assert after["xenmig_paused_window_seconds_count{}"] == 1
    assert after["xenmig_paused_window_seconds_sum{}"] == 0.75


def test_aConnectionGateIsCounted(host: Host) -> None:
    """The connections a listener's limits refused, and those open, are read live."""
    gate = ConnectionGate(ConnectionLimits(handshakesPerAddress=1), host.clock)
    host.metrics.watchConnections(gate)
    with capturedLogs():
        assert gate.admit("192.0.2.1")
        assert not gate.admit("192.0.2.1")
    scraped = host.scrape()
    assert scraped["xenmig_refused_connections_total{}"] == 1
    assert scraped["xenmig_open_connections{}"] == 1
    assert scraped["xenmig_pending_handshakes{}"] == 1


def test_eachMetricsHasItsOwnRegistry(tmp_path: Path) -> None:
    """Two daemons' metrics in one process count apart (no global registry)."""
    one, two = Host(tmp_path / "one"), Host(tmp_path / "two")
    one.prepare("m-8", refuse="no")
    assert one.scrape()["xenmig_migrations_total{kinds=memory,outcome=REFUSED}"] == 1
    assert not any(k.startswith("xenmig_migrations_total{") for k in two.scrape())


def test_aSummaryOfASessionNeedsItsEnd(host: Host) -> None:
    """Only an ended session has a summary."""
    host.prepare("m-9")
    with pytest.raises(AssertionError):
        MigrationSummary.ofSession(host.target.sessions["m-9"])
