"""
Bandwidth limits end to end, into real ``twistd xenmig`` daemons over mutual
TLS: a migration's own (``xenmig migrate --bandwidth``, the Python API with
either stream sender) and the daemon's for all incoming streams
(``--max-bandwidth``).  The checks are that a limit is applied (a migration
takes at least most of size / limit), never how fast anything is: that is
measured in bench/bench_bandwidth.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from daemons import PKI, Daemon, MiB, denseFile, settled
from twisted.internet import reactor
from twisted.python import usage

from xenmig import tap
from xenmig.digest import hashFile
from xenmig.model import DeviceSpec
from xenmig.source.client import MigrationClient

#: The limit the tests apply, and what they send: a few seconds' worth.
LIMIT = 2 * MiB


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, certs: PKI) -> Iterator[Daemon]:
    running = Daemon(tmp_path_factory.mktemp("daemon"), certs).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, certs: PKI) -> Iterator[Daemon]:
    """A daemon that receives at most 2 MiB/s over all its streams."""
    root = tmp_path_factory.mktemp("limited")
    running = Daemon(root, certs, "--max-bandwidth", "2M").start()
    yield running
    running.stop()


def xenmig(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xenmig.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def migrateFiles(
    daemon: Daemon, tmp_path: Path, name: str, sizes: list[int], *options: str
) -> tuple[subprocess.CompletedProcess[str], float, list[tuple[Path, Path]]]:
    """``xenmig migrate --json`` of a file device per size; result, seconds, files."""
    files = []
    devices = []
    for number, size in enumerate(sizes):
        source = denseFile(tmp_path / f"{name}{number}.img", size)
        destination = daemon.dest / f"{name}{number}.img"
        files.append((source, destination))
        devices += ["--device", f"file:f{number}:path={source},target={destination}"]
    started = time.monotonic()
    result = xenmig(
        "migrate",
        *daemon.targetArgs(),
        "--domain",
        name,
        "--json",
        *devices,
        *options,
    )
    return result, time.monotonic() - started, files


def test_migration_bandwidth_is_applied(daemon: Daemon, tmp_path: Path) -> None:
    """``migrate --bandwidth 2M`` of two files (6 MiB in all) shares 2 MiB/s
    between their streams: the transfer takes at least 0.8 x 3 s, the report
    and the display give the limit, and both files arrive intact."""
    result, _, files = migrateFiles(
        daemon, tmp_path, "capped", [3 * MiB, 3 * MiB], "--bandwidth", "2M"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bandwidth_limit"] == LIMIT
    assert report["durations"]["transfer"] >= 0.8 * (6 * MiB / LIMIT)
    assert "bandwidth limited to 2.0 MiB/s" in result.stderr
    for source, destination in files:
        assert hashFile(str(destination)) == hashFile(str(source))


def test_daemon_bandwidth_is_applied(limited: Daemon, tmp_path: Path) -> None:
    """A daemon with ``--max-bandwidth 2M`` receives 5 MiB in no less than
    0.8 x 2.5 s, intact; it says its limit at start-up."""
    result, _, [(source, destination)] = migrateFiles(
        limited, tmp_path, "daemoncap", [5 * MiB]
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bandwidth_limit"] is None
    assert report["durations"]["transfer"] >= 0.8 * (5 * MiB / LIMIT)
    assert hashFile(str(destination)) == hashFile(str(source))
    assert f"limited to {LIMIT} bytes/s" in limited.logPath.read_text()


@pytest_twisted.ensureDeferred
async def test_api_bandwidth_with_twisted_sender(
    daemon: Daemon, certs: PKI, tmp_path: Path
) -> None:
    """``MigrationClient.prepare(bandwidth=)`` paces Twisted's stream sender
    too (no ssl context: streams through the reactor)."""
    source = denseFile(tmp_path / "api.img", 4 * MiB)
    destination = daemon.dest / "api.img"
    client = MigrationClient(reactor, "127.0.0.1", daemon.port, tls=certs.clientTLS())
    assert client.streamEndpoint is None
    spec = DeviceSpec.parse(f"file:f:path={source},target={destination}")
    started = time.monotonic()
    migration = await client.prepare("api", [spec], bandwidth=LIMIT)
    await migration.transfer()
    await migration.commit()
    assert time.monotonic() - started >= 0.8 * (4 * MiB / LIMIT)
    assert migration.report()["bandwidth_limit"] == LIMIT
    assert hashFile(str(destination)) == hashFile(str(source))
    await settled(reactor)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--bandwidth", "fast"], "argument --bandwidth: bandwidth 'fast' is not"),
        (["--bandwidth", "10K"], "below the lowest accepted, 64K bytes per second"),
        (["--max-downtime", "300"], "argument --max-downtime: duration '300' is"),
        (["--max-downtime", "300ms"], "--max-downtime needs --live"),
        (["--downtime-fallback", "pause"], "--downtime-fallback needs --max-downtime"),
    ],
)
def test_bad_limits_are_refused(
    options: list[str], message: str, tmp_path: Path
) -> None:
    """Bad limits on the command line exit 2 naming the option, nothing sent."""
    source = denseFile(tmp_path / "x.img", 4096)
    result = xenmig(
        "migrate",
        "--target",
        "127.0.0.1:9",
        "--insecure-plaintext",
        "--domain",
        "vm",
        "--device",
        f"file:f:path={source},target={tmp_path / 'y.img'}",
        *options,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(
    "value, message",
    [("lots", "--max-bandwidth: bandwidth 'lots' is not"), ("0", "below the lowest")],
)
def test_bad_daemon_bandwidth_is_refused(value: str, message: str) -> None:
    """``twistd xenmig --max-bandwidth`` refuses a bad rate, saying why."""
    options = tap.Options()
    with pytest.raises(usage.UsageError, match=message):
        options.parseOptions(["--insecure-plaintext", "--max-bandwidth", value])
    good = tap.Options()
    good.parseOptions(["--insecure-plaintext", "--max-bandwidth", "1G"])
    assert good["max-bandwidth"] == 1024 * MiB
    assert tap._config(good).maxBandwidth == 1024 * MiB
