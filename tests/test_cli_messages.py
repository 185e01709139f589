"""
What the command line says when it fails, against real daemons over real TLS:
each message names what failed and what to do, and ``--json`` carries a code.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from corrupting import CorruptingRelay
from daemons import CLIENT, PKI, Daemon, MiB, denseFile

from xenmig.clients.processes import freePort
from xenmig.digest import hashFile


def xenmig(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m xenmig.cli.main ARGS``; the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "xenmig.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, certs: PKI) -> Iterator[Daemon]:
    """One real TLS daemon for the module (target.test, 127.0.0.1)."""
    running = Daemon(tmp_path_factory.mktemp("daemon"), certs).start()
    yield running
    running.stop()


def identity(certs: PKI, ca: str = "ca", cert: str = "ca") -> list[str]:
    """--ca from the CA directory ``ca``, --cert and --key from ``cert``."""
    return [
        "--ca",
        str(certs.directory / ca / "ca.pem"),
        "--cert",
        str(certs.directory / cert / f"{CLIENT}.pem"),
        "--key",
        str(certs.directory / cert / f"{CLIENT}.key"),
    ]


def migrate(
    target: str, *options: str, tmp: Path, size: int = MiB, to: Path | None = None
) -> Any:
    """
    ``xenmig migrate`` of one file device to ``target``, installed as ``to``
    (by default outside the daemon's allowed roots: it refuses the device).
    """
    source = tmp / "state.img"
    if not source.exists():
        denseFile(source, size)
    device = f"file:blob:path={source},target={to or tmp / 'never' / 'x.img'}"
    return xenmig(
        "migrate", "--target", target, *options, "--domain", "vm", "--device", device
    )


def aborted(result: Any) -> str:
    """The reason of the one ``aborted:`` line (exit status 1)."""
    assert result.returncode == 1, result.stderr
    lines = [x for x in result.stderr.splitlines() if " aborted: " in x]
    assert len(lines) == 1, result.stderr
    return lines[0].split(" aborted: ", 1)[1]


# -- reaching the daemon ---------------------------------------------------------------


def test_nothing_listening(certs: PKI, tmp_path: Path) -> None:
    """A port nobody listens on: the HOST:PORT, and where to look."""
    port = freePort()
    reason = aborted(migrate(f"127.0.0.1:{port}", *identity(certs), tmp=tmp_path))
    assert reason == (
        f"nothing accepts connections on 127.0.0.1:{port} (connection refused): is "
        f"the xenmig daemon running on 127.0.0.1, listening on port {port} (twistd "
        f"xenmig --port) and on that address (--interface)? is a firewall rejecting "
        f"the port?"
    )


def test_plaintext_client_against_tls(daemon: Daemon, tmp_path: Path) -> None:
    """--insecure-plaintext against a TLS daemon: it speaks TLS, fix one side."""
    target = f"127.0.0.1:{daemon.port}"
    reason = aborted(migrate(target, "--insecure-plaintext", tmp=tmp_path))
    assert reason == (
        f"{target} speaks TLS, and this side was given --insecure-plaintext: give "
        f"--ca, --cert and --key instead (--insecure-plaintext works only with a "
        f"daemon started with it too, on loopback)"
    )
    assert "closed cleanly" not in reason


# -- certificates ----------------------------------------------------------------------


def test_name_mismatch_names_the_certificate(
    daemon: Daemon, certs: PKI, tmp_path: Path
) -> None:
    """A host the certificate does not name: the names it holds, --server-name."""
    reason = aborted(
        migrate(f"localhost:{daemon.port}", *identity(certs), tmp=tmp_path)
    )
    assert reason.startswith(
        "the target's certificate (CN=target.test) names DNS:target.test, "
        "IP:127.0.0.1, not localhost: give --server-name with one of them"
    )


def test_name_mismatch_with_server_name(
    daemon: Daemon, certs: PKI, tmp_path: Path
) -> None:
    """With --server-name given, it is the name said to be wrong, not suggested."""
    result = migrate(
        f"127.0.0.1:{daemon.port}",
        *identity(certs),
        "--server-name",
        "wrong.test",
        tmp=tmp_path,
    )
    reason = aborted(result)
    assert reason.startswith(
        "the target's certificate (CN=target.test) names DNS:target.test, "
        "IP:127.0.0.1, not wrong.test: --server-name wrong.test is not among them"
    )
    assert "give --server-name" not in reason


def test_target_from_another_ca(daemon: Daemon, certs: PKI, tmp_path: Path) -> None:
    """This host refuses the target: which CA its chain ends at, and which --ca."""
    ca = certs.rogue / "ca.pem"
    options = identity(certs, ca="rogue")
    reason = aborted(migrate(f"127.0.0.1:{daemon.port}", *options, tmp=tmp_path))
    assert reason.startswith(
        "this host does not trust the target's certificate: its chain ends at "
        "CN=xenmig CA (sha256 "
    )
    assert f"check --ca {ca} here: it must hold the CA that issued" in reason
    assert "self-signed certificate" not in reason


def test_client_from_another_ca(daemon: Daemon, certs: PKI, tmp_path: Path) -> None:
    """The target refuses this host: whose certificate, which file, which --ca."""
    cert = certs.rogue / f"{CLIENT}.pem"
    options = identity(certs, cert="rogue")
    reason = aborted(migrate(f"127.0.0.1:{daemon.port}", *options, tmp=tmp_path))
    assert reason.startswith(
        f"the target 127.0.0.1:{daemon.port} refused this host's certificate "
        f"CN={CLIENT}, issued by CN=xenmig CA (--cert {cert}): it does not chain "
        f"to a CA of the target's --ca"
    )
    assert "tlsv1 alert" not in reason


# -- bytes altered on the way ----------------------------------------------------------


@pytest.fixture
def relay(daemon: Daemon) -> Iterator[Any]:
    """A function making a CorruptingRelay to the daemon (closed afterwards)."""
    made: list[CorruptingRelay] = []

    def make(connection: int, direction: str, offset: int) -> CorruptingRelay:
        made.append(
            CorruptingRelay(("127.0.0.1", daemon.port), connection, direction, offset)
        )
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_corrupted_handshake(certs: PKI, relay: Any, tmp_path: Path) -> None:
    """A byte flipped in the handshake: what OpenSSL detected, not "check --ca"."""
    faulty = relay(0, "down", 20)  # in the ServerHello's random
    result = migrate(
        f"127.0.0.1:{faulty.port}",
        *identity(certs),
        "--server-name",
        "127.0.0.1",
        tmp=tmp_path,
    )
    reason = aborted(result)
    assert faulty.flipped.is_set()
    assert reason.startswith(
        f"the TLS handshake with 127.0.0.1:{faulty.port} failed: OpenSSL detected "
    )
    assert reason.endswith(
        ": the bytes were altered on the way (a faulty link, or a proxy or "
        "middlebox between the hosts)"
    )
    assert "--ca" not in reason


def test_corrupted_stream_says_the_targets_reason(
    daemon: Daemon, certs: PKI, relay: Any, tmp_path: Path
) -> None:
    """A byte flipped in a state stream, without resuming: the target's reason,
    not "Broken pipe"."""
    faulty = relay(1, "up", 200_000)  # connection 1: the device's stream
    result = migrate(
        f"127.0.0.1:{faulty.port}",
        *identity(certs),
        "--server-name",
        "127.0.0.1",
        "--json",
        "--no-resume",
        tmp=tmp_path,
        size=16 * MiB,
        to=daemon.dest / "corrupted.img",
    )
    reason = aborted(result)
    assert faulty.flipped.is_set()
    assert reason.startswith("the target aborted: the stream of device blob was cut ")
    assert "(TLS detected: decryption failed or bad record mac" in reason
    assert reason.endswith(
        ": the bytes were altered on the way (a faulty link, or a "
        "proxy or middlebox between the hosts))"
    )
    assert "Broken pipe" not in reason
    error = json.loads(result.stdout)["error"]
    assert error == {"code": "MIGRATION_ABORTED", "message": reason}


def test_corrupted_stream_is_opened_again(
    daemon: Daemon, certs: PKI, relay: Any, tmp_path: Path
) -> None:
    """A byte flipped in a state stream (TLS drops that connection): the stream is
    opened again after the last record the target took, and the migration commits
    with the digest of the source."""
    faulty = relay(1, "up", 200_000)  # connection 1: the device's stream
    destination = daemon.dest / "reopened.img"
    result = migrate(
        f"127.0.0.1:{faulty.port}",
        *identity(certs),
        "--server-name",
        "127.0.0.1",
        "--json",
        tmp=tmp_path,
        size=16 * MiB,
        to=destination,
    )
    assert result.returncode == 0, result.stderr
    assert faulty.flipped.is_set()
    report = json.loads(result.stdout)
    assert report["reconnections"]["streams"] == 1
    assert "opening it again" in result.stderr
    assert hashFile(str(destination)) == hashFile(str(tmp_path / "state.img"))


# -- --json: an error object on every failure ----------------------------------------


def test_json_usage_error() -> None:
    """A bad command line with --json prints a USAGE error object too."""
    result = xenmig("migrate", "--json", "--target", "host:99999")
    assert result.returncode == 2
    assert json.loads(result.stdout) == {
        "error": {
            "code": "USAGE",
            "message": "argument --target: 'host:99999': the port must be 1-65535",
        },
        "exit_status": 2,
    }
    assert result.stderr.startswith("xenmig migrate: error: argument --target")


def test_json_configuration_error(tmp_path: Path) -> None:
    """A missing certificate with --json: a CONFIGURATION error object, exit 2."""
    missing = tmp_path / "missing.pem"
    result = xenmig(
        "status",
        "--json",
        "--target",
        "127.0.0.1:1",
        "--ca",
        str(missing),
        "--cert",
        str(missing),
    )
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"] == {
        "code": "CONFIGURATION",
        "message": f"certificate file {missing} does not exist",
    }


def test_json_refused_device_has_the_wire_code(
    daemon: Daemon, certs: PKI, tmp_path: Path
) -> None:
    """A device the target refuses: the report's error carries DEVICE_REFUSED."""
    result = migrate(
        f"127.0.0.1:{daemon.port}", *identity(certs), "--json", tmp=tmp_path
    )
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["error"]["code"] == "DEVICE_REFUSED"
    assert "outside the allowed roots" in report["error"]["message"]
    assert report["reason"] == report["error"]["message"]


def test_json_status_failure(certs: PKI) -> None:
    """``status --json`` that cannot connect prints an error object (exit 1)."""
    port = freePort()
    result = xenmig(
        "status", "--json", "--target", f"127.0.0.1:{port}", *identity(certs)
    )
    assert result.returncode == 1
    answer = json.loads(result.stdout)
    assert answer["error"]["code"] == "CONNECTION_REFUSED"
    assert answer["exit_status"] == 1
    assert f"127.0.0.1:{port}" in answer["error"]["message"]


def test_json_committed_report_has_no_error(
    daemon: Daemon, certs: PKI, tmp_path: Path
) -> None:
    """A committed migration's report says ``"error": null``."""
    source = denseFile(tmp_path / "ok.img", MiB)
    result = xenmig(
        "migrate",
        "--target",
        f"127.0.0.1:{daemon.port}",
        *identity(certs),
        "--domain",
        "vm-ok",
        "--json",
        "--device",
        f"file:blob:path={source},target={daemon.dest / 'ok.img'}",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["error"] is None


def test_json_await_timeout_has_a_code(daemon: Daemon) -> None:
    """``await --json`` that times out says so with PHASE_TIMEOUT."""
    result = xenmig(
        "await",
        "--domain",
        "vm-never",
        "--timeout",
        "0.5",
        "--json",
        "--state-dir",
        str(daemon.stateDir),
    )
    assert result.returncode == 1
    answer = json.loads(result.stdout)
    assert answer["committed"] is False
    assert answer["error"] == {"code": "PHASE_TIMEOUT", "message": answer["reason"]}


def test_stale_local_socket(tmp_path: Path) -> None:
    """A socket whose daemon stopped: which, and how to start it again."""
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "control.sock"))
    stale.close()
    result = xenmig("status", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == (
        f"xenmig status: error: nothing listens on {tmp_path / 'control.sock'} "
        f"(connection refused): the daemon that made it has stopped; start 'twistd "
        f"xenmig' with --state-dir {tmp_path} again\n"
    )
