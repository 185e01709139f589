"""
Configuration files: the daemon's (``twistd xenmig --config``), the client's
(``client.toml``) and ``xenmig config check``, with the real daemon and CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import CLIENT, PKI, SERVER, Daemon, MiB, sparseFile

from xenmig import tap
from xenmig.cli import main as cli
from xenmig.cli.clientconfig import readClientFiles, userConfig
from xenmig.clients.processes import daemonArgv, freePort
from xenmig.digest import hashFile
from xenmig.errors import ConfigurationError
from xenmig.target.configfile import readDaemonFile, settingsChanged

EXAMPLES = Path(__file__).resolve().parent.parent / "doc" / "examples"


def xenmig(*args: str, env: dict[str, str] | None = None) -> Any:
    """Run the real ``xenmig`` command line; the completed process (text)."""
    return subprocess.run(
        [sys.executable, "-m", "xenmig.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


class ConfiguredDaemon(Daemon):
    """A real daemon whose only xenmig option is ``--config`` (and ``extra``)."""

    def __init__(self, root: Path, certs: PKI, config: Path, *extra: str) -> None:
        super().__init__(root, certs, *extra)
        self.config = config

    def argv(self) -> list[str]:
        return daemonArgv(
            ["--config", str(self.config), *self.extra], str(self.logPath)
        )


def daemonExample(directory: Path, certs: PKI, port: int) -> Path:
    """
    doc/examples/xenmigd.toml made to run here: a free port on 127.0.0.1,
    relative paths to the certificates and the state directory, a real root,
    this test's peer and metrics port.
    """
    (directory / "dest").mkdir(parents=True, exist_ok=True)
    (directory / "tls").symlink_to(certs.ca)
    text = (EXAMPLES / "xenmigd.toml").read_text()
    for old, new in [
        ("port = 8002", f"port = {port}"),
        ('"192.0.2.12"', '"127.0.0.1"'),
        ('"/var/lib/xenmig"', '"state"'),
        ('"/srv/vms"', f'"{directory / "dest"}"'),
        ('"/etc/xenmig/ca.pem"', '"tls/ca.pem"'),
        ('"/etc/xenmig/node2.pem"', f'"tls/{SERVER}.pem"'),
        ('"/etc/xenmig/node2.key"', f'"tls/{SERVER}.key"'),
        ("/usr/local/sbin/xenmig-committed", f"touch {directory / 'committed'}"),
        ("127.0.0.1:9100", f"127.0.0.1:{freePort()}"),
        ("node1.example.org", CLIENT),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    path = directory / "xenmigd.toml"
    path.write_text(text)
    return path


def clientExample(home: Path, certs: PKI, port: int) -> dict[str, str]:
    """doc/examples/client.toml under ``home/xenmig``: the environment to use it."""
    text = (EXAMPLES / "client.toml").read_text()
    for old, new in [
        ("/etc/xenmig/ca.pem", str(certs.ca / "ca.pem")),
        ("/etc/xenmig/node1.pem", str(certs.ca / f"{CLIENT}.pem")),
        ("/etc/xenmig/node1.key", str(certs.ca / f"{CLIENT}.key")),
        ("port = 8002", f"port = {port}"),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    (home / "xenmig").mkdir(parents=True)
    (home / "xenmig" / "client.toml").write_text(text)
    return {**os.environ, "XDG_CONFIG_HOME": str(home)}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def configured(
    tmp_path_factory: pytest.TempPathFactory, certs: PKI
) -> Iterator[ConfiguredDaemon]:
    """A daemon started from doc/examples/xenmigd.toml with only ``--config``."""
    root = tmp_path_factory.mktemp("configured")
    port = freePort()
    running = ConfiguredDaemon(root, certs, daemonExample(root, certs, port))
    running.port = port
    running.start()
    yield running
    running.stop()


# -- the daemon's file ---------------------------------------------------------------


def test_daemon_runs_from_the_example_file_alone(
    configured: ConfiguredDaemon, tmp_path: Path, certs: PKI
) -> None:
    """
    A daemon started with only ``--config`` (the doc's example) takes a
    migration from ``xenmig migrate`` given only --target, --domain and
    --device, the rest from the doc's client.toml under XDG_CONFIG_HOME.
    """
    lines = configured.logPath.read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]  # log-format = "json"
    assert (
        f"peers file {configured.config}: 2 peer(s) may migrate to this host" in texts
    )
    assert f"xenmig daemon ready: listening on 127.0.0.1:{configured.port}" in texts
    env = clientExample(tmp_path / "home", certs, configured.port)
    source = sparseFile(tmp_path / "disk.img", 3 * MiB, [(0, MiB), (2 * MiB, 3 * MiB)])
    destination = configured.root / "dest" / "disk.img"
    result = xenmig(
        "migrate",
        "--target",
        "127.0.0.1",
        "--domain",
        "vm-config",
        "--device",
        f"file:blob:path={source},target={destination}",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    stderr = result.stderr.splitlines()
    assert f"of vm-config to 127.0.0.1:{configured.port}: preparing" in stderr[0]
    assert stderr[-1] == "xenmig migrate: committed: the VM now belongs to the target"
    assert hashFile(str(destination)) == hashFile(str(source))
    assert (configured.root / "state" / "sessions").is_dir()
    hooked = configured.root / "committed"  # on-commit = "touch ..."
    deadline = time.monotonic() + 10
    while not hooked.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hooked.exists()


def test_command_line_overrides_the_file(tmp_path: Path, certs: PKI) -> None:
    """``--port`` on the command line wins over the file's port."""
    filePort, commandPort = freePort(), freePort()
    daemon = ConfiguredDaemon(
        tmp_path,
        certs,
        daemonExample(tmp_path, certs, filePort),
        "--port",
        str(commandPort),
        "--log-format",
        "text",
    )
    try:
        daemon.start()
        log = daemon.logPath.read_text()
        assert f"listening on 127.0.0.1:{commandPort}" in log
        assert f":{filePort}" not in log
    finally:
        daemon.stop()


def test_options_say_where_each_value_comes_from(tmp_path: Path, certs: PKI) -> None:
    """Options read the file, the command line overrides it, and each has a source."""
    path = daemonExample(tmp_path, certs, 8100)
    options = tap.Options()
    options.parseOptions(["--config", str(path), "--max-sessions", "3"])
    assert options["port"] == 8100
    assert options["max-sessions"] == 3
    assert options["receive-timeout"] == 3600.0
    assert options["ca"] == str(tmp_path / "tls" / "ca.pem")
    assert options["state-dir"] == str(tmp_path / "state")
    assert options["allow-root"] == [str(tmp_path / "dest")]
    assert options["peers"] == str(path) and options.peersInConfig
    assert options.sources["port"] == str(path)
    assert options.sources["max-sessions"] == "command line"
    assert options.sources["idle-timeout"] == "default"


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            "max-sessions = 16",
            "max-session = 4",
            "unknown key 'max-session' (did you mean 'max-sessions'?)",
        ),
        (
            "receive-timeout = 3600",
            'receive-timeout = "1h"',
            "receive-timeout must be a number, not a string ('1h')",
        ),
        (
            f'cert = "tls/{SERVER}.pem"',
            'cert = "missing.pem"',
            "cert = 'missing.pem': {dir}/missing.pem does not exist",
        ),
    ],
)
def test_bad_file_stops_the_daemon(
    tmp_path: Path, certs: PKI, old: str, new: str, message: str
) -> None:
    """A bad key, type or file stops the start with one line naming file and key."""
    path = daemonExample(tmp_path, certs, freePort())
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    daemon = ConfiguredDaemon(tmp_path, certs, path)
    daemon.spawn()
    assert daemon.process is not None
    assert daemon.process.wait(timeout=30) == 1
    lines = daemon.output().strip().splitlines()
    assert lines[-1] == f"xenmig: {path}: " + message.format(dir=tmp_path)


def test_peers_in_the_file_and_a_peers_file_are_refused(tmp_path: Path) -> None:
    """[[peer]] tables and a peers = FILE in one file: one line saying to choose."""
    (tmp_path / "peers.toml").write_text("")
    path = tmp_path / "xenmigd.toml"
    path.write_text('peers = "peers.toml"\n[[peer]]\nidentity = "a.test"\n')
    with pytest.raises(ConfigurationError, match="not both"):
        readDaemonFile(str(path), tap.Options().settingKinds())


def test_a_reload_names_the_settings_it_does_not_apply(tmp_path: Path) -> None:
    """settingsChanged names what changed in the file since the start, or None."""
    kinds = tap.Options().settingKinds()
    path = tmp_path / "xenmigd.toml"
    path.write_text('port = 8002\n[[peer]]\nidentity = "a.test"\n')
    started = readDaemonFile(str(path), kinds)
    path.write_text('port = 8002\n[[peer]]\nidentity = "b.test"\n')
    assert settingsChanged(started, kinds) is None
    path.write_text('port = 8003\nmax-sessions = 2\n[[peer]]\nidentity = "b.test"\n')
    changed = settingsChanged(started, kinds)
    assert changed is not None
    assert changed.startswith(f"{path}: max-sessions, port changed since the start")


# -- the client's files --------------------------------------------------------------


def test_later_client_files_override_earlier(tmp_path: Path) -> None:
    """The user's file overrides the system's; each value remembers its file."""
    system, user = tmp_path / "system.toml", tmp_path / "user.toml"
    system.write_text('ca = "ca.pem"\nbusy-timeout = 60\nport = 9000\n')
    user.write_text("busy-timeout = 30.5\n")
    settings = readClientFiles(
        [str(system), str(tmp_path / "none.toml"), str(user)], cli.parser()
    )
    assert settings.read == (str(system), str(user))
    assert settings.values == {
        "ca": str(tmp_path / "ca.pem"),
        "busy-timeout": 30.5,
        "port": 9000,
    }
    assert settings.sources["busy-timeout"] == str(user)
    assert settings.sources["ca"] == str(system)


def test_user_file_follows_xdg_config_home() -> None:
    """$XDG_CONFIG_HOME/xenmig/client.toml, else ~/.config/xenmig/client.toml."""
    assert userConfig({"XDG_CONFIG_HOME": "/x"}) == "/x/xenmig/client.toml"
    home = os.path.expanduser("~")
    assert userConfig({}) == f"{home}/.config/xenmig/client.toml"


@pytest.mark.parametrize(
    "text, message",
    [
        ('sever-name = "a"', "unknown key 'sever-name' (did you mean 'server-name'?)"),
        ("busy-timeout = -1", "busy-timeout = '-1': '-1' must be more than 0"),
        ('insecure-plaintext = "yes"', "insecure-plaintext must be true or false"),
        ("port = 70000", "port must be 1-65535, not 70000"),
    ],
)
def test_bad_client_file_exits_2(tmp_path: Path, text: str, message: str) -> None:
    """A bad client.toml: exit 2, one line naming file and key; --json an object."""
    (tmp_path / "xenmig").mkdir()
    path = tmp_path / "xenmig" / "client.toml"
    path.write_text(text + "\n")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    result = xenmig("status", "--json", env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0].startswith(f"xenmig: error: {path}: {message}")
    error = json.loads(result.stdout)
    assert error["error"]["code"] == "CONFIGURATION"
    assert error["exit_status"] == 2


def test_command_line_overrides_client_file(tmp_path: Path, certs: PKI) -> None:
    """--cert on the command line wins over client.toml's (a missing one here)."""
    env = clientExample(tmp_path, certs, 1)
    missing = tmp_path / "missing.pem"
    result = xenmig(
        "migrate",
        "--target",
        "127.0.0.1",
        "--cert",
        str(missing),
        "--domain",
        "vm",
        "--device",
        f"file:b:path={tmp_path / 'a'},target={tmp_path / 'b'}",
        env=env,
    )
    assert result.returncode == 2
    assert f"certificate file {missing} does not exist" in result.stderr


# -- xenmig config check -------------------------------------------------------------


def test_config_check_daemon_file(tmp_path: Path, certs: PKI) -> None:
    """``config check`` recognises a daemon file, and says each value and its source."""
    path = daemonExample(tmp_path, certs, 8100)
    result = xenmig("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"daemon configuration: valid; read {path}"
    assert any(line.split() == ["port", "=", "8100", f"({path})"] for line in lines), (
        lines
    )
    assert any(
        line.split() == ["idle-timeout", "=", "60.0", "(default)"] for line in lines
    )
    report = json.loads(xenmig("config", "check", "--json", str(path)).stdout)
    assert report["kind"] == "daemon" and report["valid"]
    assert report["settings"]["peers"] == {"value": str(path), "source": str(path)}
    assert report["settings"]["allow-root"]["value"] == [str(tmp_path / "dest")]


def test_config_check_finds_what_start_would(tmp_path: Path, certs: PKI) -> None:
    """A peer root outside allow-root fails the check as it would fail the start."""
    path = daemonExample(tmp_path, certs, 8100)
    path.write_text(path.read_text() + 'roots = ["/"]\n')
    result = xenmig("config", "check", "--daemon", "--json", str(path))
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "CONFIGURATION"
    assert "root / is not inside the daemon's allowed roots" in error["message"]
    assert "xenmig config: error:" in result.stderr


def test_config_check_client_files(tmp_path: Path, certs: PKI) -> None:
    """Without FILE, ``config check`` reads the client files the CLI would."""
    env = clientExample(tmp_path, certs, 8123)
    path = tmp_path / "xenmig" / "client.toml"
    result = xenmig("config", "check", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "client"
    assert report["files"] == [str(path)]
    settings = report["settings"]
    assert settings["port"] == {"value": 8123, "source": str(path)}
    assert settings["cert"] == {
        "value": str(certs.ca / f"{CLIENT}.pem"),
        "source": str(path),
    }
    assert settings["server-name"] == {"value": None, "source": "default"}
    text = xenmig("config", "check", str(path)).stdout
    assert text.splitlines()[0] == f"client configuration: valid; read {path}"


def test_peers_in_the_file_are_read_again(tmp_path: Path) -> None:
    """The [[peer]] tables of the daemon's file load, and load again when changed."""
    from twisted.python.filepath import FilePath

    from xenmig.target.authz import PolicySource

    path = tmp_path / "xenmigd.toml"
    path.write_text('port = 8002\nmax-sessions = 4\n[[peer]]\nidentity = "a.test"\n')
    settings = tap.Options().settingKinds()
    source = PolicySource(str(path), [FilePath(str(tmp_path))], (), settings)
    assert [e.identity for e in source.load().entries] == ["a.test"]
    path.write_text('port = 8002\n[[peer]]\nidentity = "b.test"\n')
    assert source.reload()
    assert [e.identity for e in source.policy.entries] == ["b.test"]
    path.write_text('prot = 8002\n[[peer]]\nidentity = "c.test"\n')
    assert not source.reload()  # an unknown key: the peers in force stay
    assert [e.identity for e in source.policy.entries] == ["b.test"]


def test_a_named_client_file_must_exist(tmp_path: Path) -> None:
    """``xenmig --config FILE``: a missing FILE exits 2 naming it."""
    missing = tmp_path / "client.toml"
    result = xenmig("--config", str(missing), "kinds")
    assert result.returncode == 2
    assert result.stderr == (
        f"xenmig: error: client configuration file {missing} does not exist\n"
    )
