"""End to end: what an operator sees of a real daemon, its log lines and its metrics."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent

sys.path.insert(0, os.path.dirname(__file__))

from daemons import PKI, Daemon, MiB, denseFile, eventually, settled  # noqa: E402

from xenmig.clients.processes import freePort  # noqa: E402
from xenmig.errors import DeviceRefused  # noqa: E402
from xenmig.model import DeviceSpec  # noqa: E402

SIZE = 3 * MiB
#: What Twisted's chatter looks like in a text log (at debug).
CHATTER_TEXTS = (
    "Starting factory",
    "Stopping factory",
    "connection established",
    "connection lost",
    " starting on ",
    "Port Closed",
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


async def migrate(daemon: Daemon, tmp_path: Path) -> str:
    """One committed migration of a 3 MiB file; its id."""
    source = denseFile(tmp_path / "source.img", SIZE)
    spec = DeviceSpec.parse(f"file:blob:path={source},target={daemon.dest / 'x'}")
    migration = await daemon.client(reactor).prepare("vm1", [spec])
    await migration.transfer()
    await migration.commit()
    return migration.migrationId


async def refusedPrepare(daemon: Daemon, tmp_path: Path) -> None:
    """A Prepare the file handler refuses: its destination is outside the roots."""
    source = denseFile(tmp_path / "other.img", 4096)
    spec = DeviceSpec.parse(f"file:blob:path={source},target=/etc/xenmig-nowhere")
    with pytest.raises(DeviceRefused):
        await daemon.client(reactor).prepare("vm2", [spec])


class Body(Protocol):
    """Collects a response's body; ``done`` fires with it."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self.parts))


async def scrape(port: int) -> dict[str, float]:
    """GET /metrics: every sample as ``name{label=value,...}``: value."""
    agent = Agent(reactor)
    url = f"http://127.0.0.1:{port}/metrics".encode()
    response = await agent.request(b"GET", url)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    body = Body()
    response.deliverBody(body)
    text = (await body.done).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


@pytest_twisted.ensureDeferred
async def test_theMetricsOfARealDaemon(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    """--metrics serves counters and histograms that moved with the migrations."""
    port = freePort()
    daemon = daemons("--metrics", f"127.0.0.1:{port}", "--per-address-handshakes", "2")
    daemon.start()
    before = await scrape(port)
    assert before["xenmig_received_bytes_total{kind=file}"] == 0
    assert before["xenmig_phase_duration_seconds_count{phase=PREPARED}"] == 0

    migrationId = await migrate(daemon, tmp_path)
    await refusedPrepare(daemon, tmp_path)
    after = await scrape(port)

    assert after["xenmig_migrations_total{kinds=file,outcome=COMMITTED}"] == 1
    assert after["xenmig_migrations_total{kinds=file,outcome=REFUSED}"] == 1
    assert after["xenmig_received_bytes_total{kind=file}"] == SIZE
    for phase in ("PREPARED", "RECEIVING", "READY", "COMMITTING"):
        assert after[f"xenmig_phase_duration_seconds_count{{phase={phase}}}"] == 1
    assert after["xenmig_phase_duration_seconds_sum{phase=RECEIVING}"] > 0
    assert after["xenmig_paused_window_seconds_count{}"] == 1
    assert 0 < after["xenmig_paused_window_seconds_sum{}"] < 30
    assert after["xenmig_paused_window_seconds_bucket{le=+Inf}"] == 1
    assert after["xenmig_sessions{phase=RECEIVING}"] == 0
    assert after["xenmig_staging_bytes{}"] == 0
    assert after["xenmig_refused_peers_total{}"] == 0

    # Three connections that never begin their TLS handshake: the third is
    # one more than --per-address-handshakes, and refused at once.
    held = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(3)]
    try:
        refused = await eventually(
            reactor,
            lambda: _refusedConnections(port),
            what="a refused connection",
        )
        assert refused["xenmig_refused_connections_total{}"] == 1
        assert refused["xenmig_pending_handshakes{}"] == 2
    finally:
        for connection in held:
            connection.close()

    # The default level: the migration's lines, and no connection chatter.
    log = daemon.logPath.read_text()
    [summary] = [
        line for line in log.splitlines() if f"{migrationId} COMMITTED" in line
    ]
    assert f"migration {migrationId} COMMITTED: vm1 from source.test" in summary
    assert f"devices: file:blob {SIZE} bytes; paused window" in summary
    assert [line for line in log.splitlines() if _chatter(line)] == []
    await settled(reactor)


async def _refusedConnections(port: int) -> dict[str, float] | None:
    samples = await scrape(port)
    return samples if samples["xenmig_refused_connections_total{}"] else None


def _chatter(line: str) -> bool:
    return any(text in line for text in CHATTER_TEXTS)


@pytest_twisted.ensureDeferred
async def test_theJSONLogOfARealDaemon(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    """--log-format json: one object a line, the summary's fields among them."""
    daemon = daemons("--log-format", "json", "--log-level", "debug").start()
    migrationId = await migrate(daemon, tmp_path)
    await refusedPrepare(daemon, tmp_path)

    events = [json.loads(line) for line in daemon.logPath.read_text().splitlines()]
    summaries = [e for e in events if e["namespace"] == "xenmig.target.summary"]
    [committed, refused] = summaries
    assert committed["migration_id"] == migrationId
    assert (committed["domain"], committed["peer"]) == ("vm1", "source.test")
    assert (committed["outcome"], committed["reason"]) == ("COMMITTED", "")
    assert committed["devices"] == [{"kind": "file", "name": "blob", "bytes": SIZE}]
    assert committed["bytes_received"] == SIZE
    assert list(committed["durations"]) == [
        "PREPARED",
        "RECEIVING",
        "READY",
        "COMMITTING",
    ]
    assert committed["duration"] >= sum(committed["durations"].values()) - 1e-5
    assert 0 < committed["paused_window"] <= committed["duration"]
    assert committed["text"].startswith(f"migration {migrationId} COMMITTED")
    assert refused["outcome"] == "REFUSED"
    assert "/etc/xenmig-nowhere" in refused["reason"]
    assert all({"time", "level", "namespace", "text"} <= set(e) for e in events)
    ours = [e for e in events if e["namespace"].startswith("xenmig.target.session")]
    assert ours and all(e["migration_id"] == migrationId for e in ours)
    # At debug, Twisted's chatter is there too (the default level hides it).
    assert any(e["namespace"] == "twisted.protocols.amp" for e in events)
    await settled(reactor)


def test_aMetricsPortInUseStopsTheStart(daemons: Callable[..., Daemon]) -> None:
    """A --metrics port that cannot be bound is one clear line, exit 1."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        daemon = daemons("--metrics", str(port))
        daemon.spawn()
        assert daemon.process is not None
        assert daemon.process.wait(timeout=30) == 1
    assert f"cannot listen on 127.0.0.1:{port} for --metrics" in daemon.output()
