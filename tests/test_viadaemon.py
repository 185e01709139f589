"""``xenmig migrate --via-daemon``: the source host's daemon sends for the CLI."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from daemons import PKI, SERVER, Daemon
from twisted.protocols import amp

from xenmig.amp_commands import MAX_JSON
from xenmig.certificates import clientUseProblem
from xenmig.cli.viadaemon import MAX_OPTIONS, encodeBox
from xenmig.digest import hashFile
from xenmig.errors import BadSpec
from xenmig.toolstack.sendrequest import requestArgs

#: What no command line of this mode may import.
HEAVY = ("twisted", "OpenSSL", "cryptography", "zope", "service_identity", "attr")


#: Python's own list of what a process imports, on its stderr.
IMPORTTIME = {"PYTHONPROFILEIMPORTTIME": "1"}


def imported(stderr: str) -> set[str]:
    """The top-level packages a run imported, from its ``-X importtime`` lines."""
    return {
        line.split("|")[-1].strip().split(".")[0]
        for line in stderr.splitlines()
        if line.startswith("import time:")
    }


def xenmig(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xenmig.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Daemon]]:
    """A source host's daemon and a target's, each presenting a PKI host cert."""
    certs = PKI(tmp_path_factory.mktemp("pki"))
    target = Daemon(tmp_path_factory.mktemp("target"), certs).start()
    source = Daemon(tmp_path_factory.mktemp("source"), certs).start()
    yield source, target
    source.stop()
    target.stop()


def migrate(
    source: Daemon, target: Daemon, device: str, *extra: str, via: bool = True
) -> list[str]:
    """``xenmig migrate``'s arguments, via ``source``'s daemon or in-process."""
    how = ["--via-daemon", str(source.stateDir)] if via else target.targetArgs()[2:]
    return [
        "migrate",
        *how,
        "--target",
        f"127.0.0.1:{target.port}",
        "--device",
        device,
        *extra,
    ]


def shape(value: Any) -> Any:
    """A report's keys, recursively (its values vary from run to run)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__ if value is not None else None


def test_migrates_a_file(hosts: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    """Via the daemon: the file installed, digest checked, the report as in-process."""
    source, target = hosts
    original = tmp_path / "state.bin"
    original.write_bytes(os.urandom(300 * 1024))
    reports = {}
    for via in (True, False):
        installed = target.dest / f"state-{via}.bin"
        device = f"file:blob:path={original},target={installed}"
        how = migrate(source, target, device, "--domain", f"vm-{via}", via=via)
        done = xenmig(*how, "--json", env={**os.environ, **IMPORTTIME})
        assert done.returncode == 0, done.stderr
        assert hashFile(installed) == hashFile(original)
        reports[via] = json.loads(done.stdout)
        heavy = imported(done.stderr).intersection(HEAVY)
        assert bool(heavy) != via, heavy  # in-process imports them, via never
    assert reports[True]["devices"][0]["digest"] == hashFile(original).hex
    assert shape(reports[True]) == shape(reports[False])
    assert reports[True]["installed"] == [str(target.dest / "state-True.bin")]
    # Without --json: the same phase lines and summary as in-process.
    again = xenmig(
        *migrate(
            source,
            target,
            f"file:b:path={original},target={target.dest / 'c'}",
            "--domain",
            "vm-c",
        )
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("committed migration ")
    assert f"installed {target.dest / 'c'}" in again.stdout
    assert "xenmig migrate: committed: the VM now belongs to the target" in again.stderr


def test_relative_device_path_is_the_callers(
    hosts: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    """A device path relative to the caller's directory is the caller's."""
    source, target = hosts
    (tmp_path / "rel.bin").write_bytes(b"relative" * 1000)
    installed = target.dest / "rel.bin"
    device = f"file:rel:path=rel.bin,target={installed}"
    done = xenmig(*migrate(source, target, device, "--domain", "vm-rel"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert installed.read_bytes() == b"relative" * 1000


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_cli_gone_or_interrupted_aborts_both_sides(
    hosts: tuple[Daemon, Daemon], tmp_path: Path, sig: int
) -> None:
    """The CLI killed (or Ctrl-C) mid-transfer aborts the migration on both sides."""
    source, target = hosts
    original = tmp_path / "slow.bin"
    original.write_bytes(os.urandom(2 * 1024 * 1024))
    installed = target.dest / f"slow-{sig}.bin"
    mid = f"cut-{sig}"
    argv = migrate(
        source,
        target,
        f"file:slow:path={original},target={installed}",
        "--domain",
        f"vm-{sig}",
        "--migration-id",
        mid,
        "--bandwidth",
        "64K",
    )
    cli = subprocess.Popen(
        [sys.executable, "-m", "xenmig.cli.main", *argv],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert cli.stderr is not None
    for line in cli.stderr:
        if "transferring the final state" in line:
            break
    cli.send_signal(sig)
    out, err = cli.communicate(timeout=30)
    if sig == signal.SIGINT:  # as in-process: said, exit status 1
        assert cli.returncode == 1
        assert f"migration {mid} aborted: interrupted on the source" in err
    else:
        assert cli.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status = xenmig("status", mid, "--state-dir", str(target.stateDir), "--json")
        if json.loads(status.stdout).get("phase") == "ABORTED":
            break
        time.sleep(0.1)
    assert json.loads(status.stdout)["phase"] == "ABORTED"
    assert not installed.exists()
    # the source daemon logs its side's end once the target has answered the abort
    said = f"migration {mid} sent for the local socket's caller: ABORTED"
    deadline = time.monotonic() + 15
    while said not in source.logPath.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert said in source.logPath.read_text()


def test_unsupported_option_is_refused(tmp_path: Path) -> None:
    """An option that cannot apply via the daemon is refused, named, at once."""
    done = xenmig(
        "migrate",
        "--via-daemon",
        str(tmp_path),
        "--target",
        "127.0.0.1:1",
        "--key",
        str(tmp_path / "k.pem"),
        "--domain",
        "vm",
        "--device",
        "file:b:path=/a,target=/b",
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "xenmig migrate: error: --key cannot apply with --via-daemon: the daemon "
        "sends as this host, with its own key"
    ]


def test_missing_daemon_named_and_standard_library_only(tmp_path: Path) -> None:
    """No daemon: one line naming the socket, exit 2; the standard library alone."""
    done = xenmig(
        "migrate",
        "--via-daemon",
        str(tmp_path),
        "--target",
        "127.0.0.1:1",
        "--domain",
        "vm",
        "--device",
        "file:b:path=/a,target=/b",
        "--json",
        env={**os.environ, **IMPORTTIME},
    )
    assert done.returncode == 2
    lines = [x for x in done.stderr.splitlines() if not x.startswith("import time:")]
    socket = tmp_path / "control.sock"
    assert lines == [
        f"xenmig migrate: error: no daemon socket at {socket}: is 'twistd xenmig' "
        f"running on this host with --state-dir {tmp_path}? (--via-daemon sends "
        f"through it)"
    ]
    assert json.loads(done.stdout)["error"]["code"] == "CONFIGURATION"
    assert "xenmig" in imported(done.stderr)
    assert not imported(done.stderr).intersection(HEAVY)


@pytest_twisted.ensureDeferred
async def test_older_daemon_is_named(tmp_path: Path) -> None:
    """A daemon that does not know SendMigration: a clear line naming its socket."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXServerEndpoint
    from twisted.internet.protocol import Factory
    from twisted.internet.utils import getProcessOutputAndValue

    path = str(tmp_path / "control.sock")
    endpoint = UNIXServerEndpoint(reactor, path)
    port = await endpoint.listen(Factory.forProtocol(amp.AMP))
    try:
        argv = ["migrate", "--via-daemon", path, "--target", "127.0.0.1:1"]
        argv += ["--domain", "vm", "--device", "file:b:path=/a,target=/b"]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "xenmig.cli.main", *argv], env=dict(os.environ)
        )
    finally:
        await port.stopListening()
    assert code == 2
    assert err.decode().splitlines() == [
        f"xenmig migrate: error: the daemon at {path} cannot send migrations (it is "
        f"older than this xenmig): upgrade it, or migrate without --via-daemon"
    ]


def test_box_codec_is_amps() -> None:
    """The command line's box codec writes what Twisted's AMP parser reads."""
    box = {
        b"_command": b"xenmig-send-migration",
        b"_ask": b"1",
        b"options": b"x" * 70000,
    }
    with pytest.raises(ValueError):
        encodeBox(box)
    box[b"options"] = b"{}" * 100
    [parsed] = amp.parseString(encodeBox(box))
    assert dict(parsed) == box
    assert MAX_OPTIONS == MAX_JSON  # what the daemon's JSON argument takes


def test_request_with_unknown_option_is_refused() -> None:
    """A daemon given an option it does not know says so (an older daemon)."""
    with pytest.raises(BadSpec, match="does not know the option.* frobnicate"):
        requestArgs({"frobnicate": True})
    with pytest.raises(BadSpec, match="option target is missing"):
        requestArgs({})


def serverOnly(key: Any) -> x509.Certificate:
    """A self-signed certificate for TLS servers only."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(key, hashes.SHA256())
    )


def test_server_only_certificate_cannot_send(tmp_path: Path) -> None:
    """A certificate for servers only is found unfit for a client, and said why."""
    server = serverOnly(ec.generate_private_key(ec.SECP256R1()))
    assert "clientAuth" in (clientUseProblem(server) or "")
    issued = PKI(tmp_path).ca / f"{SERVER}.pem"
    assert clientUseProblem(x509.load_pem_x509_certificate(issued.read_bytes())) is None


def test_bars_on_a_terminal(hosts: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    """On a terminal the command draws the daemon's progress as bars, to 100 %."""
    import pty

    source, target = hosts
    original = tmp_path / "bars.bin"
    original.write_bytes(os.urandom(64 * 1024))
    device = f"file:blob:path={original},target={target.dest / 'bars.bin'}"
    parent, child = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "xenmig.cli.main"]
            + migrate(source, target, device, "--domain", "vm-bars"),
            stderr=child,
            stdout=subprocess.PIPE,
            timeout=60,
        )
        os.close(child)
        drawn = b""
        while True:
            try:
                data = os.read(parent, 65536)
            except OSError:  # the terminal's other end closed: all read
                break
            if not data:
                break
            drawn += data
    finally:
        os.close(parent)
    assert done.returncode == 0
    text = drawn.decode()
    assert "blob [####################] 100% 64.0 KiB / 64.0 KiB" in text
    assert "xenmig migrate: committed: the VM now belongs to the target" in text


def test_client_file_key_and_its_override(tmp_path: Path) -> None:
    """``via-daemon`` in client.toml makes it the default; --no-via-daemon undoes it."""
    config = tmp_path / "client.toml"
    config.write_text('via-daemon = "state"\nca = "ca.pem"\ncert = "c.pem"\n')
    argv = ["--config", str(config), "migrate", "--target", "127.0.0.1:1"]
    argv += ["--domain", "vm", "--device", "file:b:path=/a,target=/b"]
    via = xenmig(*argv)  # the file's ca and cert are not refused: they are its
    assert via.returncode == 2
    assert f"no daemon socket at {tmp_path / 'state' / 'control.sock'}" in via.stderr
    config.write_text("via-daemon = true\n")
    assert "no daemon socket at /var/lib/xenmig/control.sock" in xenmig(*argv).stderr
    inProcess = xenmig(*argv, "--no-via-daemon")
    assert inProcess.returncode == 2
    assert "--ca and --cert are required with --target" in inProcess.stderr


@pytest_twisted.ensureDeferred
async def test_unfit_certificate_is_said_to_every_caller(tmp_path: Path) -> None:
    """A daemon whose certificate cannot be a TLS client refuses to send, saying why."""
    from cryptography.hazmat.primitives import serialization
    from twisted.internet import reactor

    from xenmig.toolstack.localsender import LocalSender

    key = ec.generate_private_key(ec.SECP256R1())
    cert, keyFile = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(serverOnly(key).public_bytes(serialization.Encoding.PEM))
    keyFile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ca = PKI(tmp_path / "pki").ca / "ca.pem"
    sender = LocalSender.fromFiles(reactor, str(cert), str(keyFile), str(ca))
    events: list[dict[str, Any]] = []
    code = await sender.send({}, events.append).done
    assert code == 2
    assert events == [
        {
            "type": "error",
            "code": "CONFIGURATION",
            "message": f"--via-daemon: the daemon's certificate {cert} cannot "
            f"authenticate a TLS client: its extended key usage leaves out TLS "
            f"client authentication (clientAuth); issue one for both uses (xenmig "
            f"pki issue does)",
        }
    ]


def test_the_daemon_keeps_its_connection_for_the_next(
    hosts: tuple[Daemon, Daemon], proxies: Any, tmp_path: Path
) -> None:
    """
    Two migrations sent by the daemon to one target, a moment apart: the
    second rides the control connection the first left open (the state
    inline on it too), so the target sees one connection for both.
    """
    source, target = hosts
    proxy = proxies(target)
    original = tmp_path / "state.bin"
    original.write_bytes(os.urandom(4096))
    for n in range(2):
        installed = target.dest / f"kept-{n}.bin"
        done = xenmig(
            "migrate", "--via-daemon", str(source.stateDir), "--target", proxy.listen,
            "--device", f"file:blob:path={original},target={installed}",
            "--domain", f"vm-kept-{n}",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert hashFile(installed) == hashFile(original)
    assert proxy.stats()["connections"] == 1
