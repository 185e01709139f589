"""
Migrations between namespaced hosts (L{nethosts}): over IPv6 with IPv6-SAN
certificates, through a fault proxy that stalls, and over a link that goes down.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemons import MiB, denseFile
from faultproxy import FaultProxy
from nethosts import Host, HostPKI, NetDaemon, Network, hostPort

from xenmig.digest import hashFile


class Bed:
    """A source host and a target host with a daemon, and what they share."""

    def __init__(self, network: Network, tmp: Path, *daemonArgs: str, **kw: Any):
        self.network = network
        self.tmp = tmp
        self.source: Host = network.addHost("source")
        self.target: Host = network.addHost("target")
        self.certs = HostPKI(tmp / "pki")
        self.certs.forHost(self.source)
        self.daemon = NetDaemon(
            tmp / "target", self.certs, self.target, *daemonArgs, **kw
        )
        self.proxy: FaultProxy | None = None

    def withProxy(self) -> FaultProxy:
        """A fault proxy in the router: the source reaches the daemon through it."""
        self.proxy = FaultProxy.start(
            self.network,
            hostPort(self.source.routerIPv4, 9002),
            self.daemon.target(),
            str(self.tmp / "proxy.sock"),
        )
        return self.proxy

    def migrate(self, target: str, *extra: str, timeout: float = 60) -> Any:
        """``xenmig migrate`` on the source host; the completed process."""
        return self.source.xenmig(
            "migrate",
            "--target",
            target,
            *self.certs.tlsArgs("source.test"),
            *extra,
            timeout=timeout,
        )

    def status(self, migrationId: str) -> dict[str, Any]:
        """``xenmig status ID --json`` on the target host (its local socket)."""
        done = self.target.xenmig(
            "status", migrationId, "--state-dir", str(self.daemon.stateDir), "--json"
        )
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.daemon.stop()


def fileDevice(source: Path, destination: Path) -> str:
    return f"file:blob:path={source},target={destination}"


def test_ipv6_migration_between_hosts(network: Network, tmp_path: Path) -> None:
    """
    A dual-stack daemon takes a migration over IPv6 (an address in brackets and
    a name), verifying its IPv6-SAN certificate, and one over IPv4.
    """
    bed = Bed(network, tmp_path, interface="::")
    bed.daemon.start()
    try:
        assert "listening on [::]:8002" in bed.daemon.logPath.read_text()
        state = denseFile(tmp_path / "state.img", 2 * MiB)
        target6 = f"[{bed.target.ipv6}]:8002"
        bed.source.setHosts({"target.test": [bed.target.ipv6]})
        for number, (where, serverName) in enumerate(
            [
                (target6, None),  # the IP SAN fd77:0:2::2 is checked
                ("target.test:8002", None),  # resolved to its IPv6 address
                (bed.daemon.target(4), None),  # dual stack: IPv4 too
            ]
        ):
            destination = bed.daemon.dest / f"state{number}.img"
            result = bed.migrate(
                where,
                *(["--server-name", serverName] if serverName else []),
                "--domain",
                f"vm{number}",
                "--device",
                fileDevice(state, destination),
                "--json",
            )
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            assert report["phase"] == "COMMITTED"
            assert report["target"] == where
            assert hashFile(str(destination)) == hashFile(str(state))
        # the daemon saw the source by its IPv6 address
        log = bed.daemon.logPath.read_text()
        assert bed.source.ipv6 in log or "source.test" in log
        # an address the certificate does not carry is refused, naming what it has
        refused = bed.migrate(
            target6,
            "--server-name",
            "fd77:0:2::9",
            "--domain",
            "vm9",
            "--device",
            fileDevice(state, bed.daemon.dest / "no.img"),
        )
        assert refused.returncode == 1
        assert "TLS_NAME_MISMATCH" in refused.stderr or "names" in refused.stderr
        assert f"IP:{bed.target.ipv6}" in refused.stderr, refused.stderr
        assert not (bed.daemon.dest / "no.img").exists()
    finally:
        bed.close()


@pytest.mark.parametrize("side", ["source", "target"])
def test_stalled_stream_aborts_naming_phase_and_device(
    side: str, network: Network, tmp_path: Path
) -> None:
    """
    A stream the proxy stops forwarding mid-transfer fails with "no progress"
    for the device during the final transfer, on whichever side's time-out is
    shorter; the target ends ABORTED with nothing installed.
    """
    short, long = "1.5", "30"
    bed = Bed(network, tmp_path, "--stall-timeout", short if side == "target" else long)
    bed.daemon.start()
    proxy = bed.withProxy()
    try:
        proxy.set(stall_after=3 * MiB, directions=["up"])  # only the stream is large
        state = denseFile(tmp_path / "state.img", 12 * MiB)
        destination = bed.daemon.dest / "state.img"
        migrationId = f"stall-{side}"
        started = time.monotonic()
        result = bed.migrate(
            proxy.listen,
            "--server-name",
            bed.target.ipv4,
            "--stall-timeout",
            short if side == "source" else long,
            "--no-resume",  # a stall aborts (resuming, the stream is reopened)
            "--migration-id",
            migrationId,
            "--domain",
            "vm1",
            "--device",
            fileDevice(state, destination),
            "--json",
        )
        elapsed = time.monotonic() - started
        assert result.returncode == 1, result.stderr
        message = result.stderr
        code = json.loads(result.stdout)["error"]["code"]
        # the side that saw it: its own error; else the target's reason, fetched
        assert code == ("STREAM_STALLED" if side == "source" else "MIGRATION_ABORTED")
        assert "device blob: no progress for 1.5 s during the final transfer" in message
        if side == "source":
            assert f"(stream to target {proxy.listen})" in message
        else:
            assert "(stream from source 10.77.2.1:" in message  # the proxy
        assert "nothing was installed on the target" in message
        assert elapsed < 25, message
        status = bed.status(migrationId)
        assert status["phase"] == "ABORTED"
        assert "no progress for 1.5 s during the final transfer" in status["reason"]
        assert not destination.exists()
        assert bed.daemon.leftovers() == []
        assert proxy.stats()["bytes_up"] < 4 * MiB  # held from 3 MiB on
    finally:
        bed.close()


def test_link_down_mid_transfer_aborts(network: Network, tmp_path: Path) -> None:
    """
    The target's link goes down while a stream flows: the target aborts on its
    own progress time-out, the source stops on its own, nothing is installed.
    """
    bed = Bed(network, tmp_path, "--stall-timeout", "2")
    bed.daemon.start()
    proxy = bed.withProxy()
    try:
        proxy.set(rate=4 * MiB)
        state = denseFile(tmp_path / "state.img", 24 * MiB)
        destination = bed.daemon.dest / "state.img"
        migration = bed.source.popen(
            [
                sys.executable,
                "-m",
                "xenmig.cli.main",
                "migrate",
                "--target",
                proxy.listen,
                "--server-name",
                bed.target.ipv4,
                *bed.certs.tlsArgs("source.test"),
                "--stall-timeout",
                "2",
                "--no-resume",  # a stall aborts (resuming, the stream is reopened)
                "--migration-id",
                "linkdown",
                "--domain",
                "vm1",
                "--device",
                fileDevice(state, destination),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while proxy.stats()["bytes_up"] < 2 * MiB:
            assert time.monotonic() < deadline and migration.poll() is None
            time.sleep(0.05)
        bed.target.linkDown()
        down = time.monotonic()
        while bed.status("linkdown")["phase"] != "ABORTED":  # on its own
            assert time.monotonic() - down < 10
            time.sleep(0.2)
        assert time.monotonic() - down >= 2
        bed.target.linkUp()
        _, stderr = migration.communicate(timeout=40)
        assert migration.returncode == 1, stderr
        assert "device blob: no progress for 2 s during the final transfer" in stderr
        assert "nothing was installed on the target" in stderr
        assert not destination.exists()
        assert bed.daemon.leftovers() == []
    finally:
        bed.close()
