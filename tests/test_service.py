"""
The shipped systemd unit, ``xenmig service install``, and sd_notify: the real
daemon tells a real notification socket when it is ready, reloads and stops.
"""

from __future__ import annotations

import configparser
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import PKI, Daemon

from xenmig.cli.servicecmd import findTwistd, shippedUnit
from xenmig.target.notify import SystemdNotifier
from xenmig.testing import requirePrograms


def xenmig(*args: str) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "xenmig.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def unitKeys(text: str) -> dict[str, dict[str, str]]:
    """A unit's sections and keys (each key once: the unit repeats none)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return {name: dict(parser[name]) for name in parser.sections()}


# -- the unit --------------------------------------------------------------------


def test_shipped_unit_has_what_an_operator_expects() -> None:
    """The unit runs twistd in the foreground from the config file, hardened."""
    service = unitKeys(shippedUnit())["Service"]
    assert service["ExecStart"] == (
        "/usr/bin/twistd --nodaemon --pidfile= xenmig --config /etc/xenmig/xenmigd.toml"
    )
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Type"] == "notify"
    assert service["StateDirectory"] == "xenmig"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/xenmig"
    assert service["PrivateTmp"] == "yes"
    assert service["NoNewPrivileges"] == "yes"
    assert "CAP_SYS_ADMIN" not in service["CapabilityBoundingSet"]
    # doc/daemon.md's Sizing: --max-connections + sessions x devices + 64
    assert int(service["LimitNOFILE"]) >= 1100 + 16 * 64 + 64


def test_install_writes_a_unit_systemd_accepts(tmp_path: Path) -> None:
    """``service install --unit-dir`` writes a unit that systemd-analyze verifies."""
    config = tmp_path / "xenmigd.toml"
    (tmp_path / "vms").mkdir()
    config.write_text(f'state-dir = "state"\nallow-root = ["{tmp_path}/vms"]\n')
    result = xenmig(
        "service", "install", "--unit-dir", str(tmp_path), "--config", str(config)
    )
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "xenmig.service"
    assert result.stdout.splitlines() == [
        f"wrote {unit}",
        "next: systemctl daemon-reload && systemctl enable --now xenmig",
    ]
    service = unitKeys(unit.read_text())["Service"]
    assert service["ExecStart"] == (
        f"{findTwistd()} --nodaemon --pidfile= xenmig --config {config}"
    )
    assert service["ReadWritePaths"] == f"{tmp_path}/state {tmp_path}/vms"
    requirePrograms("systemd-analyze")
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr == "", verify.stderr


def test_install_dry_run_writes_nothing(tmp_path: Path) -> None:
    """``--dry-run`` prints the unit and where it would go, and writes nothing."""
    missing = tmp_path / "none.toml"
    result = xenmig(
        "service",
        "install",
        "--prefix",
        str(tmp_path),
        "--config",
        str(missing),
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    assert f"--config {missing}" in result.stdout
    assert "ReadWritePaths=/var/lib/xenmig\n" in result.stdout
    where = f"{tmp_path}/etc/systemd/system/xenmig.service"
    assert result.stderr == f"xenmig service: dry run: would write {where}\n"
    assert list(tmp_path.iterdir()) == []


def test_install_refuses_a_bad_config(tmp_path: Path) -> None:
    """A config file that does not read: exit 2 naming it, no unit written."""
    config = tmp_path / "xenmigd.toml"
    config.write_text("state_dir = 'x'\n")
    result = xenmig(
        "service", "install", "--unit-dir", str(tmp_path), "--config", str(config)
    )
    assert result.returncode == 2
    assert (
        f"{config}: unknown key 'state_dir' (did you mean 'state-dir'?)"
        in result.stderr
    )
    assert not (tmp_path / "xenmig.service").exists()


# -- sd_notify -------------------------------------------------------------------


@pytest.fixture
def notifications(tmp_path: Path) -> Iterator[socket.socket]:
    """A unix datagram socket standing for systemd's notification socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(20)
    yield sock
    sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def test_daemon_notifies_ready_reload_and_stop(
    tmp_path: Path, notifications: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY=1 once the port accepts; RELOADING=1 then READY=1 on SIGHUP; STOPPING=1."""
    certs = PKI(tmp_path / "pki")
    daemon = Daemon(tmp_path / "daemon", certs)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    daemon.spawn()
    try:
        ready = receive(notifications)
        assert accepts(daemon.port)
        assert ready == ["READY=1", f"STATUS=listening on 127.0.0.1:{daemon.port}"]
        os.kill(daemon.pid, signal.SIGHUP)  # no peers file: nothing to reload
        reloading = receive(notifications)
        assert reloading[0] == "RELOADING=1"
        assert reloading[1].startswith("MONOTONIC_USEC=")
        assert receive(notifications) == ["READY=1", "STATUS=nothing to reload"]
        assert daemon.alive() and accepts(daemon.port)
        os.kill(daemon.pid, signal.SIGTERM)
        assert receive(notifications)[0] == "STOPPING=1"
        assert daemon.process is not None
        # twistd ends by the signal it got (systemd counts SIGTERM as clean)
        assert daemon.process.wait(timeout=20) == -signal.SIGTERM
    finally:
        daemon.stop()


def test_notifier_reaches_an_abstract_socket() -> None:
    """An address starting with '@' is an abstract socket, as systemd gives it."""
    name = f"xenmig-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        environ = {"NOTIFY_SOCKET": "@" + name, "PATH": "/bin"}
        notifier = SystemdNotifier.fromEnvironment(environ)
        assert environ == {"PATH": "/bin"}  # not passed on to child programs
        assert notifier.ready("serving")
        assert receive(sock) == ["READY=1", "STATUS=serving"]
    finally:
        sock.close()


def test_notifier_without_socket_does_nothing(tmp_path: Path) -> None:
    """No NOTIFY_SOCKET: nothing sent; a socket gone: logged, not raised."""
    assert not SystemdNotifier.fromEnvironment({}).ready("x")
    assert not SystemdNotifier(str(tmp_path / "gone")).stopping("x")
