"""
``xenmig migrate --live --max-downtime`` of a disk a "guest" process writes to,
into a real daemon over mutual TLS: the VM is paused only once the final round
is estimated to fit, and when it never fits within the rounds allowed, the
migration aborts before the pause (or, with ``--downtime-fallback pause``,
pauses anyway and says so).  How close the paused window comes to the target
is measured in bench/bench_bandwidth.py, not asserted here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from daemons import PKI, Daemon, MiB, eventually, settled, sparseFile
from test_disk_e2e import WRITER, live, migrate
from twisted.internet import reactor

from xenmig.digest import hashFile


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, certs: PKI) -> Iterator[Daemon]:
    running = Daemon(tmp_path_factory.mktemp("daemon"), certs).start()
    yield running
    running.stop()


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Callable[[Path], subprocess.Popen[bytes]]]:
    """Start the guest writer on an image; killed (by pid) and reaped afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(image: Path) -> subprocess.Popen[bytes]:
        ready = tmp_path / "writer-ready"
        started.append(
            subprocess.Popen([sys.executable, "-c", WRITER, str(image), str(ready)])
        )
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


async def liveWithDowntime(
    daemon: Daemon, tmp_path: Path, writer: Any, name: str, *options: str
) -> tuple[dict[str, Any], Any, subprocess.Popen[bytes], Path, Path]:
    """A live migration of a written-to 64 MiB disk with ``options``; its report."""
    image = sparseFile(tmp_path / f"{name}.img", 64 * MiB, [(0, 24 * MiB)])
    guest = writer(image)
    await eventually(
        reactor, (tmp_path / "writer-ready").exists, what="the writer's first write"
    )
    destination = daemon.dest / f"{name}.img"
    client = migrate(
        daemon,
        *options,
        *live(tmp_path, image, destination, name, writer=guest.pid),
    )
    await client.ended
    return client.report(), client, guest, image, destination


@pytest_twisted.ensureDeferred
async def test_max_downtime_honoured(
    daemon: Daemon, tmp_path: Path, writer: Any
) -> None:
    """With a maximum downtime the rounds can meet, the VM is paused once the
    estimate fits; the report gives the limit, the estimate and the window, and
    the target image equals the source at the pause."""
    report, client, guest, image, destination = await liveWithDowntime(
        daemon, tmp_path, writer, "fits", "--max-downtime", "5s", "--max-rounds", "6"
    )
    assert report["exit_status"] == 0, client.stderr
    downtime = report["downtime"]
    assert downtime["limit"] == 5.0
    assert 0 < downtime["estimate"] <= 5.0
    assert downtime["estimates"]["d0"] == downtime["estimate"]
    assert downtime["exceeded"] is False
    assert downtime["paused_window"] == report["paused_window"] > 0
    assert "final round estimated at" in client.stderr
    assert "(max downtime 5.00 s)" in client.stderr
    atPause = (tmp_path / "paused.digest").read_text()
    assert hashFile(str(destination)).hex == atPause == hashFile(str(image)).hex
    assert guest.poll() is None  # stopped by the pause, not gone
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_max_downtime_never_met_aborts_before_the_pause(
    daemon: Daemon, tmp_path: Path, writer: Any
) -> None:
    """A maximum downtime no round can meet aborts after the rounds allowed,
    with the estimate and the limit; the VM was never paused, the target keeps
    nothing."""
    report, client, guest, image, destination = await liveWithDowntime(
        daemon,
        tmp_path,
        writer,
        "never",
        "--max-downtime",
        "1ms",
        "--max-rounds",
        "2",
    )
    assert report["exit_status"] == 1, client.stderr
    error = report["error"]
    assert error["code"] == "DOWNTIME_NOT_MET"
    assert "device d0: the final round would take an estimated" in error["message"]
    assert (
        "over the maximum downtime 1 ms after 2 pre-copy round(s)" in (error["message"])
    )
    assert report["live"]["pause"] is None
    assert "the VM was not paused: it keeps running here" in client.stderr
    assert not (tmp_path / "paused.digest").exists()
    assert len(report["devices"][0]["rounds"]) == 2
    assert not destination.exists()
    assert daemon.leftovers() == []
    status = await daemon.status(reactor, "never")
    assert status["phase"] == "ABORTED"
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_max_downtime_fallback_pauses_anyway(
    daemon: Daemon, tmp_path: Path, writer: Any
) -> None:
    """With ``--downtime-fallback pause`` the round limit pauses the VM anyway;
    the report marks the limit exceeded and the migration commits."""
    report, client, guest, image, destination = await liveWithDowntime(
        daemon,
        tmp_path,
        writer,
        "anyway",
        "--max-downtime",
        "1ms",
        "--max-rounds",
        "2",
        "--downtime-fallback",
        "pause",
    )
    assert report["exit_status"] == 0, client.stderr
    assert report["downtime"]["exceeded"] is True
    assert report["downtime"]["estimate"] > 0.001
    assert "paused anyway" in client.stderr
    assert len(report["devices"][0]["rounds"]) == 2
    atPause = (tmp_path / "paused.digest").read_text()
    assert hashFile(str(destination)).hex == atPause
    await settled(reactor)
