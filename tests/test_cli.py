"""The ``xenmig`` command line: arguments, and real migrations into a real daemon."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from daemons import PKI, Daemon, MiB, sparseFile
from twisted.internet.task import Clock

from xenmig.cli import connection
from xenmig.cli import main as cli
from xenmig.clients.processes import ProcessFailed, runShell
from xenmig.digest import hashFile
from xenmig.model import DeviceProgress, MigrationStatus
from xenmig.toolstack import migratecommand
from xenmig.toolstack.progress import (
    ProgressDisplay,
    RateMeter,
    formatBytes,
    statusTable,
)


def xenmig(*args: str, cwd: Path | None = None, timeout: float = 60) -> Any:
    """Run ``python -m xenmig.cli.main ARGS``; the completed process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "xenmig.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, certs: PKI) -> Iterator[Daemon]:
    """One real ``twistd xenmig`` daemon for the module (distinct domains per test)."""
    running = Daemon(tmp_path_factory.mktemp("daemon"), certs).start()
    yield running
    running.stop()


def tlsArgs(daemon: Daemon) -> list[str]:
    return daemon.targetArgs()


def sourceFile(tmp_path: Path, name: str = "state.img") -> Path:
    """A 6 MiB file: data, a hole, data."""
    return sparseFile(tmp_path / name, 6 * MiB, [(0, MiB), (5 * MiB, 6 * MiB)])


def fileDevice(source: Path, destination: Path, name: str = "blob") -> str:
    return f"file:{name}:path={source},target={destination}"


# -- arguments and configuration errors ------------------------------------------------


def test_missing_cert_file_is_one_line_exit_2(tmp_path: Path, certs: PKI) -> None:
    """A --cert file that does not exist exits 2 with one line naming it."""
    result = xenmig(
        "migrate",
        "--target",
        "127.0.0.1:1",
        "--ca",
        str(certs.ca / "ca.pem"),
        "--cert",
        str(tmp_path / "missing.pem"),
        "--domain",
        "vm",
        "--device",
        fileDevice(tmp_path / "a", tmp_path / "b"),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"xenmig migrate: error: certificate file {tmp_path / 'missing.pem'} "
        f"does not exist"
    ]


@pytest.mark.parametrize(
    "device, message",
    [
        ("file", "is not KIND:NAME"),
        ("file:blob:path", "is not key=val"),
        ("nosuchkind:blob:path=a,target=b", "no device kind 'nosuchkind'"),
        ("file:blob:target=/x", "the file kind needs path=SOURCE_FILE"),
        (
            "disk:x:path=A,target=B,target-overwirte=yes,compres=yes",
            "unknown parameter(s) compres, target-overwirte (did you mean "
            "target-overwrite?)",
        ),
        ("file:blob:path=a,target=b,target-overwrite=maybe", "neither yes nor no"),
    ],
)
def test_bad_device_spec_exits_2(
    tmp_path: Path, certs: PKI, device: str, message: str
) -> None:
    """A malformed or unusable --device exits 2 with one line saying why."""
    result = xenmig(
        "migrate",
        "--target",
        "127.0.0.1:1",
        "--insecure-plaintext",
        "--domain",
        "vm",
        "--device",
        device,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


@pytest.mark.parametrize(
    "target",
    ["host:99999", "host:http", ":8002", "a b:1", "::1", "[::1", "[::1]8002", "[]:1"],
)
def test_bad_target_exits_2(target: str) -> None:
    """A --target that is not HOST:PORT exits 2 with one line."""
    result = xenmig(
        "migrate",
        "--target",
        target,
        "--insecure-plaintext",
        "--domain",
        "vm",
        "--device",
        "file:b:path=a,target=b",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "argument --target" in lines[0]


def test_live_needs_both_commands() -> None:
    """--live without --pause-command and --resume-command is a usage error."""
    result = xenmig(
        "migrate",
        "--target",
        "127.0.0.1:1",
        "--insecure-plaintext",
        "--domain",
        "vm",
        "--device",
        "file:b:path=a,target=b",
        "--live",
    )
    assert result.returncode == 2
    assert "--live needs --pause-command and --resume-command" in result.stderr


def test_tls_files_required_without_plaintext() -> None:
    """Without --ca/--cert (and no --insecure-plaintext) the command exits 2."""
    result = xenmig("status", "--target", "127.0.0.1:1")
    assert result.returncode == 2
    assert "--ca and --cert are required" in result.stderr


def test_parse_target() -> None:
    """HOST:PORT splits at the last colon; a bare host gets port 8002."""
    assert connection.parseTarget("hostb.example:9000") == ("hostb.example", 9000)
    assert connection.parseTarget("10.0.0.2") == ("10.0.0.2", 8002)
    assert connection.parseTarget("[2001:db8::1]:8003") == ("2001:db8::1", 8003)
    assert connection.parseTarget("[::1]") == ("::1", 8002)
    with pytest.raises(argparse.ArgumentTypeError, match=r"in brackets, as \[::1\]"):
        connection.parseTarget("::1")


def test_kinds_lists_file() -> None:
    """``xenmig kinds`` lists the built-in file kind with its summary."""
    result = xenmig("kinds")
    assert result.returncode == 0
    assert any(line.startswith("file ") for line in result.stdout.splitlines())


def test_pki_is_delegated(tmp_path: Path) -> None:
    """``xenmig pki init-ca`` writes the CA via xenmig.cli.pki."""
    result = xenmig("pki", "init-ca", "--dir", str(tmp_path / "ca"))
    assert result.returncode == 0
    assert (tmp_path / "ca" / "ca.pem").exists()


def test_status_without_daemon_exits_2(tmp_path: Path) -> None:
    """``status --state-dir`` where no daemon runs exits 2 naming the socket."""
    result = xenmig("status", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "no daemon socket at" in result.stderr


# -- migrations into a real daemon -----------------------------------------------------


def test_migrate_json_commits(daemon: Daemon, tmp_path: Path) -> None:
    """``migrate --json`` commits over mutual TLS; the report's digest is the file's."""
    source = sourceFile(tmp_path)
    destination = daemon.dest / "json.img"
    result = xenmig(
        "migrate",
        *tlsArgs(daemon),
        "--domain",
        "vm-json",
        "--device",
        fileDevice(source, destination),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    digest = hashFile(str(source))
    assert report["phase"] == "COMMITTED"
    assert report["exit_status"] == 0
    assert report["devices"][0]["digest"] == digest.hex
    assert report["devices"][0]["bytes"] == 6 * MiB
    assert report["installed"] == [str(destination)]
    assert set(report["durations"]) >= {"prepare", "transfer", "commit", "total"}
    assert hashFile(str(destination)) == digest


def test_refused_device_exits_1(daemon: Daemon, tmp_path: Path) -> None:
    """A destination outside the allowed roots: exit 1, the reason, nothing there."""
    source = sourceFile(tmp_path)
    destination = tmp_path / "outside" / "x.img"
    result = xenmig(
        "migrate",
        *tlsArgs(daemon),
        "--domain",
        "vm-refused",
        "--device",
        fileDevice(source, destination),
    )
    assert result.returncode == 1
    assert "outside the allowed roots" in result.stderr
    assert "the VM may be resumed here" in result.stderr
    assert not destination.exists()


def test_status_shows_committed_migration(daemon: Daemon, tmp_path: Path) -> None:
    """``status --state-dir`` lists a committed migration; ``status ID`` details it."""
    result = xenmig(
        "migrate",
        *tlsArgs(daemon),
        "--domain",
        "vm-status",
        "--migration-id",
        "status-1",
        "--device",
        fileDevice(sourceFile(tmp_path), daemon.dest / "status.img"),
    )
    assert result.returncode == 0, result.stderr
    table = xenmig("status", "--state-dir", str(daemon.stateDir))
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if "status-1" in line)
    assert "vm-status" in row and "COMMITTED" in row and "6.0 MiB / 6.0 MiB" in row
    detail = xenmig("status", "status-1", "--state-dir", str(daemon.stateDir), "--json")
    status = json.loads(detail.stdout)
    assert status["phase"] == "COMMITTED"
    assert status["installed"] == [str(daemon.dest / "status.img")]
    remote = xenmig("status", "status-1", *tlsArgs(daemon))
    assert remote.returncode == 0 and "phase      COMMITTED" in remote.stdout


def test_await_returns_after_commit(daemon: Daemon, tmp_path: Path) -> None:
    """``await --domain`` on the target exits 0 with the id once the domain commits."""
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xenmig.cli.main",
            "await",
            "--domain",
            "vm-await",
            "--state-dir",
            str(daemon.stateDir),
            "--timeout",
            "60",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        result = xenmig(
            "migrate",
            *tlsArgs(daemon),
            "--domain",
            "vm-await",
            "--migration-id",
            "await-1",
            "--device",
            fileDevice(sourceFile(tmp_path), daemon.dest / "await.img"),
        )
        assert result.returncode == 0, result.stderr
        out, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 0, err
    answer = json.loads(out)
    assert answer["migration_id"] == "await-1"
    assert answer["installed"] == [str(daemon.dest / "await.img")]
    again = xenmig(
        "await",
        "--domain",
        "vm-await",
        "--migration-id",
        "await-1",
        "--state-dir",
        str(daemon.stateDir),
        "--timeout",
        "5",
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("migration await-1 of vm-await committed\n")


def test_await_times_out(daemon: Daemon) -> None:
    """``await`` for a domain nothing migrates exits 1 with the time-out reason."""
    result = xenmig(
        "await",
        "--domain",
        "vm-never",
        "--state-dir",
        str(daemon.stateDir),
        "--timeout",
        "0.5",
    )
    assert result.returncode == 1
    assert result.stderr.startswith("xenmig await: vm-never: not restored: ")
    assert "within 0.5 s" in result.stderr


def test_await_says_the_daemon_went_away(tmp_path: Path, certs: PKI) -> None:
    """``await`` whose daemon dies says so, and how to learn the outcome."""
    stopping = Daemon(tmp_path / "gone", certs).start()
    try:
        waiter = subprocess.Popen(
            [sys.executable, "-m", "xenmig.cli.main", "await", "--domain", "vm-gone"]
            + ["--state-dir", str(stopping.stateDir), "--timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while "awaits the VM of vm-gone" not in stopping.logPath.read_text():
            assert time.monotonic() < deadline and waiter.poll() is None
            time.sleep(0.05)
        stopping.kill()
        _, err = waiter.communicate(timeout=30)
    finally:
        stopping.stop()
    assert waiter.returncode == 1
    assert err.startswith("xenmig await: vm-gone: not restored: the daemon ")
    assert "went away while this waited" in err and "xenmig status" in err
    assert "Connection was closed cleanly" not in err


def test_abort_during_live_pause(daemon: Daemon, tmp_path: Path) -> None:
    """``xenmig abort`` (run as the pause command) aborts: exit 1, VM resumed."""
    destination = daemon.dest / "aborted.img"
    resumed = tmp_path / "resumed"
    pause = (
        f"{sys.executable} -m xenmig.cli.main abort abort-1 --state-dir "
        f"{daemon.stateDir} --reason 'operator says no' > {tmp_path / 'abort.out'}"
    )
    result = xenmig(
        "migrate",
        *tlsArgs(daemon),
        "--domain",
        "vm-abort",
        "--migration-id",
        "abort-1",
        "--device",
        fileDevice(sourceFile(tmp_path), destination),
        "--live",
        "--pause-command",
        pause,
        "--resume-command",
        f"touch {resumed}",
    )
    assert result.returncode == 1
    assert (tmp_path / "abort.out").read_text() == "migration abort-1: ABORTED\n"
    assert "operator says no" in result.stderr
    assert resumed.exists()
    assert not destination.exists()
    status = xenmig("status", "abort-1", "--state-dir", str(daemon.stateDir), "--json")
    assert json.loads(status.stdout)["phase"] == "ABORTED"


def test_abort_unknown_migration_exits_1(daemon: Daemon) -> None:
    """``xenmig abort`` of an id the daemon does not know exits 1 saying so."""
    result = xenmig("abort", "no-such-id", "--state-dir", str(daemon.stateDir))
    assert result.returncode == 1
    assert "no migration 'no-such-id'" in result.stderr


def test_live_runs_pause_command(daemon: Daemon, tmp_path: Path) -> None:
    """``--live`` runs the pause command, then transfers and commits; no resume."""
    paused, resumed = tmp_path / "paused", tmp_path / "resumed"
    destination = daemon.dest / "live.img"
    result = xenmig(
        "migrate",
        *tlsArgs(daemon),
        "--domain",
        "vm-live",
        "--device",
        fileDevice(sourceFile(tmp_path), destination),
        "--live",
        "--max-rounds",
        "2",
        "--pause-command",
        f"touch {paused}",
        "--resume-command",
        f"touch {resumed}",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert paused.exists() and not resumed.exists()
    assert report["live"]["pause"]["status"] == 0
    assert report["paused_window"] is not None
    assert destination.exists()


def test_live_resumes_after_failure(daemon: Daemon, tmp_path: Path) -> None:
    """A failure after the pause (the source vanished) aborts and runs the resume."""
    source = sourceFile(tmp_path)
    resumed = tmp_path / "resumed"
    destination = daemon.dest / "live-fail.img"
    result = xenmig(
        "migrate",
        *tlsArgs(daemon),
        "--domain",
        "vm-live-fail",
        "--device",
        fileDevice(source, destination),
        "--live",
        "--pause-command",
        f"rm {source}",
        "--resume-command",
        f"touch {resumed}",
    )
    assert result.returncode == 1
    assert "the VM was resumed here" in result.stderr
    assert resumed.exists()
    assert not destination.exists()


def test_failed_pause_command_aborts(daemon: Daemon, tmp_path: Path) -> None:
    """A pause command that fails aborts the migration and runs the resume."""
    resumed = tmp_path / "resumed"
    result = xenmig(
        "migrate",
        *tlsArgs(daemon),
        "--domain",
        "vm-pause-fail",
        "--device",
        fileDevice(sourceFile(tmp_path), daemon.dest / "pause-fail.img"),
        "--live",
        "--pause-command",
        "exit 7",
        "--resume-command",
        f"touch {resumed}",
    )
    assert result.returncode == 1
    assert "exited with status 7" in result.stderr
    assert resumed.exists()
    assert not (daemon.dest / "pause-fail.img").exists()


# -- progress, tables and child processes (no daemon) ----------------------------------


def test_progress_bars_redraw_on_the_clock() -> None:
    """On a terminal the bars are redrawn each interval and stop with the display."""
    clock, out = Clock(), io.StringIO()
    done = {"blob": 0}
    display = ProgressDisplay(clock, out, bars=True, interval=1.0, width=200)
    display.start(lambda: [("blob", done["blob"], 4 * MiB)])
    done["blob"] = 2 * MiB
    clock.advance(1.0)
    done["blob"] = 4 * MiB
    clock.advance(1.0)
    display.stop()
    assert "  50% 2.0 MiB / 4.0 MiB 2.0 MiB/s" in out.getvalue()
    assert out.getvalue().rstrip().endswith("100% 4.0 MiB / 4.0 MiB 2.0 MiB/s")
    assert not clock.getDelayedCalls()


def test_progress_without_terminal_prints_phases_only() -> None:
    """Off a terminal only phase lines are written; no timer is started."""
    clock, out = Clock(), io.StringIO()
    display = ProgressDisplay(clock, out, bars=False, prefix="xenmig migrate")
    display.start(lambda: [("blob", 1, 2)])
    display.phase("committing")
    display.stop()
    assert out.getvalue() == "xenmig migrate: committing\n"
    assert not clock.getDelayedCalls()


def test_progress_fits_eighty_columns() -> None:
    """At 80 columns each bar fits in 79, ETA included: the bar narrows first."""
    clock, out = Clock(), io.StringIO()
    display = ProgressDisplay(clock, out, bars=True, width=80)
    sizes = {"xvda-system-disk": 1000 * 1024 * MiB, "tpm0": 20_000}
    done = dict.fromkeys(sizes, 0)
    display.start(lambda: [(name, done[name], sizes[name]) for name in sizes])
    for _ in range(3):
        done["xvda-system-disk"] += 900 * MiB
        clock.advance(1.0)
    lines = display.lines([(n, done[n], sizes[n]) for n in sizes], 3.0, 80)
    assert all(len(line) <= 79 for line in lines), lines
    assert lines[0].startswith("  xvda-system-disk [")
    assert lines[0].endswith("2.6 GiB / 1000.0 GiB 900.0 MiB/s  ETA 18:54")
    assert lines[1].index("[") == lines[0].index("[")  # one bar width for all
    narrow = display.lines([(n, done[n], sizes[n]) for n in sizes], 3.0, 60)
    assert narrow[0] == "  xvda-sy~   0% 2.6 GiB / 1000.0 GiB 900.0 MiB/s  ETA 18:54"
    display.stop()
    assert not clock.getDelayedCalls()


def test_final_round_counts_from_its_start() -> None:
    """After pre-copy, a device's final round starts at 0 B sent, not at 100%."""
    clock, out = Clock(), io.StringIO()
    sent = {"xvda": 64 * MiB, "tpm0": 0}  # pre-copy sent the whole disk
    sizes = {"xvda": 64 * MiB, "tpm0": 20_000}
    display = ProgressDisplay(clock, out, bars=True, interval=1.0, width=100)
    display.start(
        lambda: [(name, sent[name], sizes[name]) for name in sizes],
        continued="final round",
    )
    first = out.getvalue().splitlines()
    assert first[0] == "  xvda final round: 0 B sent 0 B/s"
    assert "100%" not in first[0]
    sent["xvda"] += 2 * MiB
    sent["tpm0"] = 10_000
    clock.advance(1.0)
    display.stop()
    last = out.getvalue().rpartition("\x1b[J")[2].splitlines()
    assert last[0] == "  xvda final round: 2.0 MiB sent 2.0 MiB/s"
    assert "  50% 9.8 KiB / 19.5 KiB" in last[1]


def test_rate_meter_resumes_after_more_bytes() -> None:
    """A device that sends again (another pre-copy round) gets a live rate again."""
    meter = RateMeter(window=2.0)
    meter.sample(0.0, 0, 100)
    assert meter.sample(1.0, 100, 100) == 100.0
    assert meter.sample(2.0, 100, 100) == 100.0
    assert meter.sample(3.0, 130, 100) == 15.0  # 30 bytes over the last 2 s


def test_rate_meter_freezes_at_completion() -> None:
    """A complete device keeps its average rate instead of decaying to zero."""
    meter = RateMeter(window=2.0)
    assert meter.sample(0.0, 0, 100) == 0.0
    assert meter.sample(1.0, 50, 100) == 50.0
    assert meter.sample(2.0, 100, 100) == 50.0
    assert meter.sample(10.0, 100, 100) == 50.0


def test_status_table_has_one_row_per_device() -> None:
    """The status table shows id, phase, peer and each device's bytes and reason."""
    status = MigrationStatus(
        "m1",
        "vm1",
        "ABORTED",
        "hosta",
        "cut off",
        0.0,
        0.0,
        (
            DeviceProgress("a", "file", "ABORTED", MiB, 2 * MiB),
            DeviceProgress("b", "file", "ABORTED", 0, MiB),
        ),
    )
    lines = statusTable([status]).splitlines()
    assert lines[0].split() == [
        "MIGRATION",
        "DOMAIN",
        "PHASE",
        "PEER",
        "DEVICE",
        "RECEIVED",
        "/",
        "SIZE",
        "RATE",
        "ETA",
        "REASON",
    ]
    assert lines[1].split()[:5] == ["m1", "vm1", "ABORTED", "hosta", "file:a"]
    assert lines[1].endswith("cut off")
    assert lines[2].split()[0] == "file:b"
    assert formatBytes(MiB) == "1.0 MiB"


@pytest_twisted.ensureDeferred
async def test_run_shell_reports_status() -> None:
    """runShell waits for /bin/sh -c and gives its exit status and output."""
    from twisted.internet import reactor

    child = await runShell(reactor, "echo hello; exit 4", timeout=10)
    assert child.status == 4
    assert child.tail() == "hello"


@pytest_twisted.ensureDeferred
async def test_run_shell_stops_a_command_that_hangs() -> None:
    """A command that outlives its time-out is terminated and reported."""
    from twisted.internet import reactor

    with pytest.raises(ProcessFailed, match="did not finish within 0.3 s"):
        await runShell(reactor, "exec sleep 30", timeout=0.3)


def test_sigterm_aborts_and_resumes(daemon: Daemon, tmp_path: Path) -> None:
    """SIGTERM to ``xenmig migrate`` aborts the migration on the target and resumes."""
    resumed = tmp_path / "resumed"
    destination = daemon.dest / "interrupted.img"
    result = xenmig(
        "migrate",
        *tlsArgs(daemon),
        "--domain",
        "vm-interrupted",
        "--migration-id",
        "interrupted-1",
        "--device",
        fileDevice(sourceFile(tmp_path), destination),
        "--live",
        "--pause-command",
        "kill -TERM $PPID",
        "--resume-command",
        f"touch {resumed}",
    )
    assert result.returncode == 1
    assert "aborted: interrupted on the source" in result.stderr
    assert resumed.exists()
    assert not destination.exists()
    status = xenmig(
        "status", "interrupted-1", "--state-dir", str(daemon.stateDir), "--json"
    )
    assert json.loads(status.stdout)["phase"] == "ABORTED"


def test_doc_covers_every_subcommand_and_option() -> None:
    """doc/cli.md has a section per subcommand naming only options it really has."""
    text = (Path(__file__).parent.parent / "doc" / "cli.md").read_text()
    heading = r"^## `xenmig (\w+)`\n(.*?)(?=^## |\Z)"
    sections = dict(re.findall(heading, text, re.M | re.S))
    subcommands = next(a for a in cli.parser()._actions if a.dest == "command")
    parsers: dict[str, Any] = subcommands.choices  # type: ignore[assignment]
    assert set(sections) == set(parsers)
    for name, section in sections.items():
        if name == "pki":  # its options belong to xenmig.cli.pki
            continue
        section = re.sub(r"systemctl [^\n`]*", "", section)  # another program's
        mentioned = set(re.findall(r"(--[a-z][a-z-]+)", section))
        assert mentioned <= options(parsers[name]), name


def options(parser: argparse.ArgumentParser) -> set[str]:
    """The options of a parser and of its own subcommands (``config check``)."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found |= options(child)
    return found


class FakeMigration:
    """A SourceMigration stand-in whose commit's answer never comes."""

    def __init__(self, commitError: Exception) -> None:
        from xenmig.source.connection import ClientTimeouts

        self.migrationId = "doubt-1"
        self.bandwidth = None
        self.phase = "NEW"
        self.reason = ""
        self.times: dict[str, float] = {}
        self.control = object()
        self.client = type("Client", (), {"timeouts": ClientTimeouts()})()
        self.commitError = commitError
        self.aborted: list[str] = []

    async def prepare(self, specs: Any) -> None:
        self.phase = "PREPARED"

    async def precopy(self, policy: Any = None) -> dict[str, list[int]]:
        self.phase = "PRECOPIED"
        return {}

    def paused(self) -> None:
        pass

    async def transfer(self) -> dict[str, Any]:
        self.phase = "READY"
        return {}

    async def commit(self) -> list[str]:
        self.times["commit"] = 0.0
        self.phase = "IN-DOUBT"
        raise self.commitError

    async def abort(self, reason: str) -> None:
        self.aborted.append(reason)

    def progress(self) -> list[tuple[str, int, int]]:
        return []

    def report(self) -> dict[str, Any]:
        return {"migration_id": self.migrationId, "phase": self.phase}


@pytest_twisted.ensureDeferred
async def test_commit_in_doubt_exits_3_without_resuming(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A commit in doubt exits 3, says not to resume, and never runs the resume."""
    import argparse

    from twisted.internet import reactor

    from xenmig.errors import CommitInDoubt

    resumed = tmp_path / "resumed"
    args = argparse.Namespace(
        command="migrate",
        target=("127.0.0.1", 9),
        domain="vm-doubt",
        device=[],
        migration_id="doubt-1",
        live=True,
        pause_command="true",
        resume_command=f"touch {resumed}",
        command_timeout=10.0,
        json=True,
    )
    display = ProgressDisplay(reactor, io.StringIO(), bars=False)
    fake = FakeMigration(CommitInDoubt("no answer to the commit"))
    command = migratecommand.MigrateCommand(reactor, fake, args, display)  # type: ignore[arg-type]
    assert await command.run() == 3
    out, err = capsys.readouterr()
    assert "COMMIT IN DOUBT: no answer to the commit" in err
    assert "do NOT resume the VM here" in err
    assert "xenmig status doubt-1 --target 127.0.0.1:9" in err
    assert json.loads(out)["exit_status"] == 3
    assert not resumed.exists()
    assert fake.aborted == []
