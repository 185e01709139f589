"""
Load benchmark: many migrations at once into one real ``twistd xenmig`` daemon,
mutual TLS on loopback.

    python bench/bench_load.py [--scenario small,large,vtpm,devices]
                               [--limits default|sized|both] [--daemon-option OPT]
                               [--small-count 100] [--small-kib 64]
                               [--large-count 32] [--large-mib 16]
                               [--vtpm-count 100] [--devices 64] [--device-kib 1024]
                               [--devices-runs 3] [--alone 3] [--timeout 900]
                               [--dir DIR] [--json] [--keep] [--profile]

Scenarios (each against a daemon of its own, started fresh):

small    N ``xenmig migrate`` processes at once (the command line, as operators
         run it), each one ``file`` device of ``--small-kib`` KiB;
large    the same with ``--large-mib`` MiB files (N x size on tmpfs, bounded);
vtpm     one client process (the MigrationClient API, as ``xenmig migrate`` sets
         it up) running N vTPM migrations at once, real swtpms on both sides
         (bench/loadvtpm.py; skipped without swtpm); client and daemon warmed
         up first;
devices  one ``xenmig migrate`` of ``--devices`` ``file`` devices of
         ``--device-kib`` KiB each, ``--devices-runs`` times in a row.

``--limits default`` runs the daemon with its default limits; ``sized`` raises
(never lowers) them to what the scenario needs: sessions N, devices D, and
N x (1 + D) connections and handshakes (one control connection and D streams
per migration, all from 127.0.0.1); ``both`` (the default) runs each scenario
twice. ``--daemon-option`` adds any daemon option (repeatable).

Figures per scenario: how the migrations ended (committed; refused: a declared
refusal for load, ``BUSY`` or ``DEVICE_REFUSED`` naming a sessions limit;
reset: a connection closed under it; failed), the retries the clients report,
p50 / p99 / max of Prepare to the Commit's answer (committed migrations), the
same migration alone in the same run (median of ``--alone``; for ``devices``,
one device of the same total size) and p99 against it, throughput over the
batch's wall time (for the command line, process starts included), the
daemon's resident memory fresh, before the batch and at its peak (VmHWM), its
CPU and the clients', the median of each phase, and what the daemon logged
about connections it refused.  ``--json`` prints it all as one object.

Goals (this machine): 100 concurrent vTPM migrations into one daemon with p99
under 1 s; the daemon's peak RSS under 100 MB at 100 concurrent migrations.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
from benchlib import XENMIG, MiB, cpuSeconds, peakRSS, residentRSS, tmpfsOr
from loadoutcome import COMMITTED, FAILED, Batch, Outcome

HERE = Path(__file__).resolve()
DEFAULT_DIR = tmpfsOr("/dev/shm/xenmig-bench-load", "/tmp/xenmig-bench-load")
GOAL_P99 = 1.0
GOAL_RSS = 100 * 1000 * 1000
GOAL_COUNT = 100
LIMITS = ("default", "sized")


@dataclass(frozen=True)
class Scenario:
    """N migrations at once, each of D devices of ``size`` bytes."""

    name: str
    count: int
    devices: int
    size: int
    #: Batches one after another, against the same daemon.
    runs: int = 1


def log(message: str) -> None:
    """Progress, on stderr (stdout is the table, or the JSON)."""
    print(message, file=sys.stderr, flush=True)


# -- the daemon's options ------------------------------------------------------------


def defaults() -> dict[str, int]:
    """The daemon's default limits, as its options say."""
    from xenmig.tap import Options

    options = Options()
    names = (
        "max-sessions",
        "max-devices",
        "max-connections",
        "max-handshakes",
        "per-address-handshakes",
    )
    return {name: int(options[name]) for name in names}


def sizedOptions(scenario: Scenario) -> list[str]:
    """Limits raised (never lowered) to what ``scenario`` needs at once."""
    connections = scenario.count * (1 + scenario.devices)
    needed = {
        "max-sessions": scenario.count,
        "max-devices": scenario.devices,
        "max-connections": 2 * connections,  # room for those closing, and queries
        "max-handshakes": connections,
        "per-address-handshakes": connections,
    }
    current = defaults()
    return [
        f"--{name}={max(value, current[name])}"
        for name, value in needed.items()
        if value > current[name]
    ]


def loggedRefusals(text: str) -> dict[str, int]:
    """
    The connections the daemon logged as refused, by the option it named (it
    logs at most one line per 10 s with a count: a lower bound).
    """
    found: Counter[str] = Counter()
    for count, why in re.findall(
        r"refused (\d+) connection\(s\).*?\((--[a-z-]+)\)", text
    ):
        found[why] += int(count)
    found["dropped"] += len(re.findall(r"dropping the connection", text))
    return {k: v for k, v in found.items() if v}


# -- the command line's scenarios ----------------------------------------------------


def randomFile(path: Path, size: int) -> Path:
    """A file of ``size`` random bytes (incompressible, no holes) at ``path``."""
    with open(path, "wb") as f:
        for start in range(0, size, 8 * MiB):
            f.write(os.urandom(min(8 * MiB, size - start)))
    return path


def migrateArgv(
    daemon: benchlib.Daemon, domain: str, sources: Sequence[Path]
) -> list[str]:
    """``xenmig migrate --json`` of one ``file`` device per source, into ``dest``."""
    devices = [
        f"--device=file:d{j}:path={source},target={daemon.dest / f'{domain}-d{j}.bin'}"
        for j, source in enumerate(sources)
    ]
    return [
        *XENMIG,
        "migrate",
        *daemon.clientOptions(),
        f"--domain={domain}",
        *devices,
        "--json",
    ]


@dataclass
class Jobs:
    """Client processes run at once: how each ended, and what they cost."""

    outcomes: list[Outcome]
    wall: float
    cpu: float
    peakRSS: int


def runJobs(out: Path, jobs: list[list[str]], timeout: float) -> Jobs:
    """
    Start every job at once, wait for all; their outcomes from ``--json``.
    Those still running after ``timeout`` seconds are killed (and failed).
    """
    out.mkdir(exist_ok=True)
    started = time.perf_counter()
    processes = []
    for i, argv in enumerate(jobs):
        with open(out / f"{i}.json", "wb") as so, open(out / f"{i}.err", "wb") as se:
            processes.append(subprocess.Popen(argv, stdout=so, stderr=se))
    usages: dict[int, Any] = {}
    while len(usages) < len(processes):
        for process in processes:
            if process.pid not in usages:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    process.returncode = os.waitstatus_to_exitcode(status)
                    usages[pid] = usage
        if time.perf_counter() - started > timeout:
            for process in processes:
                if process.pid not in usages:
                    process.kill()
        time.sleep(0.02)
    wall = time.perf_counter() - started
    outcomes = [cliOutcome(out, i, p.returncode) for i, p in enumerate(processes)]
    return Jobs(
        outcomes,
        wall,
        sum(u.ru_utime + u.ru_stime for u in usages.values()),
        max(u.ru_maxrss for u in usages.values()) * 1024,
    )


def cliOutcome(out: Path, i: int, status: int) -> Outcome:
    """What ``xenmig migrate --json`` number ``i`` reported."""
    errors = (out / f"{i}.err").read_text(errors="replace").strip().splitlines()
    said = [line.split(" aborted: ", 1)[1] for line in errors if " aborted: " in line]
    tail = said[-1] if said else " | ".join(errors[-3:])
    if status == -signal.SIGKILL:
        return Outcome(FAILED, reason="killed: still running at the bench's --timeout")
    try:
        report = json.loads((out / f"{i}.json").read_text())
    except ValueError:
        return Outcome(FAILED, reason=f"exit status {status}, no report: {tail}")
    committed = status == 0 and report.get("phase") == "COMMITTED"
    if not committed and not report.get("reason"):
        report["reason"] = tail
    return Outcome.fromReport(report, committed)


def cliBatch(
    daemon: benchlib.Daemon, scenario: Scenario, batch: Batch, args: argparse.Namespace
) -> None:
    """
    The command line's scenarios: one small migration to warm the daemon up,
    the batches, then the reference runs alone (after the batches, so that a
    larger reference does not grow the daemon's memory before them).
    """
    sources = [
        randomFile(daemon.work / f"source-{j}.bin", scenario.size)
        for j in range(scenario.devices)
    ]
    reference = sources
    if scenario.devices > 1:  # one device of the same total size
        batch.aloneNote = "one device of the same total size, alone"
        total = scenario.size * scenario.devices
        reference = [randomFile(daemon.work / "reference.bin", total)]
    warm = randomFile(daemon.work / "warm.bin", 64 * 1024)
    alone1(daemon, "warm", [warm], args.timeout)
    measureBatch(
        daemon, batch, lambda run: cliRun(daemon, scenario, sources, run, args.timeout)
    )
    batch.alone = [
        alone1(daemon, f"alone{r}", reference, args.timeout) for r in range(args.alone)
    ]


def alone1(
    daemon: benchlib.Daemon, name: str, sources: list[Path], timeout: float
) -> float:
    """One migration alone; its Prepare-to-Commit seconds."""
    jobs = runJobs(daemon.work / name, [migrateArgv(daemon, name, sources)], timeout)
    outcome = jobs.outcomes[0]
    if outcome.status != COMMITTED or outcome.seconds is None:
        raise SystemExit(f"bench: a migration alone failed: {outcome.reason}")
    clean(daemon.dest)
    return outcome.seconds


def cliRun(
    daemon: benchlib.Daemon,
    scenario: Scenario,
    sources: list[Path],
    run: int,
    timeout: float,
) -> Jobs:
    argvs = [
        migrateArgv(daemon, f"vm{run}-{i}", sources) for i in range(scenario.count)
    ]
    jobs = runJobs(daemon.work / f"run-{run}", argvs, timeout)
    installed = len(list(daemon.dest.iterdir()))
    committed = sum(o.status == COMMITTED for o in jobs.outcomes)
    if installed != committed * scenario.devices:
        log(f"  ! {installed} files installed for {committed} committed migrations")
    clean(daemon.dest)
    return jobs


def clean(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def measureBatch(
    daemon: benchlib.Daemon, batch: Batch, run: Callable[[int], Jobs]
) -> None:
    """Run the batches (``run(n)`` -> L{Jobs}), reading the daemon around them."""
    pid = daemon.process.pid
    batch.daemonIdleRSS = residentRSS(pid)
    cpu = cpuSeconds(pid)
    for n in range(batch.runs):
        jobs = run(n)
        batch.outcomes += jobs.outcomes
        batch.wall += jobs.wall
        batch.clientCPU += jobs.cpu
        batch.clientPeakRSS = max(batch.clientPeakRSS, jobs.peakRSS)
    batch.daemonCPU = cpuSeconds(pid) - cpu
    batch.daemonPeakRSS = peakRSS(pid)


# -- the vTPM scenario (bench/loadvtpm.py) ---------------------------------------------


def vtpmBatch(
    daemon: benchlib.Daemon, scenario: Scenario, batch: Batch, args: argparse.Namespace
) -> None:
    """One client process, N vTPM migrations at once (see loadvtpm.py)."""
    argv = [
        sys.executable,
        str(HERE.parent / "loadvtpm.py"),
        f"--port={daemon.port}",
        f"--pki={daemon.pki}",
        f"--dest={daemon.dest}",
        f"--work={daemon.work}",
        f"--count={scenario.count}",
        f"--alone={args.alone}",
    ]
    with open(daemon.work / "loadvtpm.err", "wb") as errors:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    assert child.stdout is not None
    state: dict[str, Any] = {}

    def run(n: int) -> Jobs:
        output, _ = child.communicate("go\n", timeout=args.timeout)
        state.update(json.loads(output or "{}"))
        return Jobs(
            [Outcome.fromJSON(o) for o in state.get("outcomes", [])],
            state.get("wall", 0.0),
            state.get("client_cpu", 0.0),
            state.get("client_rss", 0),
        )

    try:
        if child.stdout.readline().strip() != "warm":
            raise SystemExit("bench: loadvtpm.py failed:\n" + vtpmErrors(daemon))
        measureBatch(daemon, batch, run)
        if child.returncode != 0 or "outcomes" not in state:
            raise SystemExit("bench: loadvtpm.py failed:\n" + vtpmErrors(daemon))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    batch.alone = state["alone"]
    batch.aloneNote = "one vTPM migration alone (warm)"


def vtpmErrors(daemon: benchlib.Daemon) -> str:
    return (daemon.work / "loadvtpm.err").read_text(errors="replace")[-3000:]


def profiling(work: Path, profile: bool) -> list[str]:
    """twistd's options that profile the daemon into ``work`` (on ``--profile``)."""
    if not profile:
        return []
    return [f"--profile={work / 'daemon.pstats'}", "--profiler=cprofile", "--savestats"]


# -- one scenario, one daemon --------------------------------------------------------


def runScenario(
    scenario: Scenario, limits: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Run ``scenario`` against a fresh daemon; its summary."""
    if scenario.name == "vtpm" and shutil.which("swtpm") is None:
        reason = "swtpm is not installed (apt-get install swtpm)"
        log(f"== {scenario.name}: skipped: {reason}")
        return {"scenario": scenario.name, "limits": limits, "skipped": reason}
    options = (sizedOptions(scenario) if limits == "sized" else []) + list(
        args.daemon_option
    )
    shown = ": " + " ".join(options) if options else ""
    each = "one vTPM" if scenario.name == "vtpm" else f"{scenario.size // 1024} KiB"
    log(
        f"== {scenario.name} ({limits} limits{shown}): "
        f"{scenario.count} migration(s) at once x {scenario.devices} device(s) of "
        f"{each}, {scenario.runs} run(s)"
    )
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.dir))
    batch = Batch(
        scenario.name,
        limits,
        scenario.count,
        scenario.devices,
        scenario.runs,
        options=options,
    )
    try:
        daemon = benchlib.Daemon(work, profiling(work, args.profile), options)
        batch.daemonStartRSS = residentRSS(daemon.process.pid)
        try:
            if scenario.name == "vtpm":
                vtpmBatch(daemon, scenario, batch, args)
            else:
                cliBatch(daemon, scenario, batch, args)
        finally:
            daemon.stop()
            batch.loggedRefusals = loggedRefusals(daemon.logText())
            if args.profile:
                benchlib.showProfile(
                    f"daemon ({scenario.name}, {limits} limits)",
                    work / "daemon.pstats",
                    out=sys.stderr,
                )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = batch.summary()
    log("   " + row(summary))
    return summary


# -- the table and the goals -----------------------------------------------------------

COLUMNS = (
    ("scenario", "{scenario}", 8),
    ("limits", "{limits}", 7),
    ("N x D", "{migrations}x{devices_each}", 7),
    ("ok", "{committed}", 4),
    ("refused", "{refused}", 7),
    ("reset", "{reset}", 5),
    ("failed", "{failed}", 6),
    ("retries", "{retries}", 7),
    ("p50 s", "{p50_s}", 6),
    ("p99 s", "{p99_s}", 6),
    ("alone s", "{alone_s}", 7),
    ("p99/alone", "{p99_over_alone}", 9),
    ("migr/s", "{migrations_per_s}", 6),
    ("MB/s", "{mb_per_s}", 6),
    ("RSS start MB", "{daemon_start_rss}", 12),
    ("peak MB", "{daemon_peak_rss}", 7),
    ("+MB/migr", "{rss_per_migration}", 8),
)


def figure(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if "rss" in key:
        return f"{value / 1e6:.2f}" if "per" in key else f"{value / 1e6:.0f}"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def row(summary: dict[str, Any]) -> str:
    cells = []
    for _, template, width in COLUMNS:
        keys = re.findall(r"\{(\w+)\}", template)
        text = template.format(**{k: figure(summary.get(k), k) for k in keys})
        cells.append(text.rjust(width))
    return " ".join(cells)


def table(summaries: list[dict[str, Any]]) -> str:
    header = " ".join(name.rjust(width) for name, _, width in COLUMNS)
    lines = [header]
    for summary in summaries:
        if "skipped" in summary:
            lines.append(f"{summary['scenario']:>8} skipped: {summary['skipped']}")
        else:
            lines.append(row(summary))
    return "\n".join(lines)


def details(summaries: list[dict[str, Any]]) -> list[str]:
    """What did not commit, and what the daemon said about refused connections."""
    lines = []
    for s in summaries:
        if "skipped" in s:
            continue
        name = f"{s['scenario']} ({s['limits']})"
        lines.append(
            f"{name}: CPU s: daemon {s['daemon_cpu_s']:.2f}, client(s) "
            f"{s['client_cpu_s']:.2f}; daemon RSS MB: start "
            f"{s['daemon_start_rss'] / 1e6:.0f}, before the batch "
            f"{s['daemon_idle_rss'] / 1e6:.0f}, peak {s['daemon_peak_rss'] / 1e6:.0f}"
        )
        phases = s["p50_by_phase_s"]
        if any(v is not None for v in phases.values()):
            shown = ", ".join(f"{k} {figure(v, k)}" for k, v in phases.items())
            lines.append(f"{name}: p50 by phase, s: {shown}")
        if s["logged_connection_refusals"]:
            lines.append(f"{name}: daemon log: {s['logged_connection_refusals']}")
        for reason, count in s["reasons"].items():
            lines.append(f"{name}: {count} x {reason}")
    return lines


def goals(summaries: list[dict[str, Any]]) -> list[str]:
    """Each goal against each batch that measures it."""
    verdicts = []
    for s in summaries:
        if "skipped" in s or s["migrations"] < GOAL_COUNT:
            continue
        name = f"{s['scenario']} ({s['limits']} limits)"
        everyone = s["committed"] == s["migrations"]
        lost = (
            ""
            if everyone
            else f", only {s['committed']} of {s['migrations']} committed"
        )
        if s["scenario"] == "vtpm":
            met = everyone and s["p99_s"] is not None and s["p99_s"] < GOAL_P99
            verdicts.append(
                f"{s['migrations']} concurrent vTPM migrations, p99 < {GOAL_P99:g} s: "
                f"{name}: p99 {figure(s['p99_s'], 'p99')} s{lost}: "
                f"{'met' if met else 'MISSED'}"
            )
        met = everyone and s["daemon_peak_rss"] < GOAL_RSS
        verdicts.append(
            f"daemon peak RSS < {GOAL_RSS / 1e6:.0f} MB at {s['migrations']} "
            f"concurrent migrations: {name}: "
            f"{s['daemon_peak_rss'] / 1e6:.0f} MB{lost}: {'met' if met else 'MISSED'}"
        )
    return verdicts


# -- the run ---------------------------------------------------------------------------


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    chosen = [n for part in args.scenario for n in part.split(",") if n]
    known = {
        "small": Scenario("small", args.small_count, 1, args.small_kib * 1024),
        "large": Scenario("large", args.large_count, 1, args.large_mib * MiB),
        "vtpm": Scenario("vtpm", args.vtpm_count, 1, 0),
        "devices": Scenario(
            "devices", 1, args.devices, args.device_kib * 1024, args.devices_runs
        ),
    }
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"bench: unknown scenario(s) {unknown}; known: {list(known)}")
    return [known[n] for n in chosen or known]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0].strip()
    )
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        help="small, large, vtpm, devices (comma-separated or repeated; default all)",
    )
    parser.add_argument("--limits", choices=(*LIMITS, "both"), default="both")
    parser.add_argument(
        "--daemon-option",
        action="append",
        default=[],
        metavar="OPT",
        help="another option of the daemon, e.g. --daemon-option=--io-threads=16",
    )
    parser.add_argument("--small-count", type=int, default=100)
    parser.add_argument("--small-kib", type=int, default=64)
    parser.add_argument("--large-count", type=int, default=32)
    parser.add_argument("--large-mib", type=int, default=16)
    parser.add_argument("--vtpm-count", type=int, default=100)
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--device-kib", type=int, default=1024)
    parser.add_argument("--devices-runs", type=int, default=3)
    parser.add_argument(
        "--alone", type=int, default=3, help="reference runs alone (default 3)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds a batch may take; clients still running are killed (900)",
    )
    parser.add_argument("--dir", default=DEFAULT_DIR, help="work dir (default tmpfs)")
    parser.add_argument("--json", action="store_true", help="print JSON, no table")
    parser.add_argument("--keep", action="store_true", help="keep the work dirs")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the daemon; its busiest functions on stderr",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse(argv)
    chosen = scenarios(args)
    large = [s for s in chosen if s.name == "large"]
    need = sum((1 + s.count) * s.size for s in large) + 256 * MiB
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(args.dir).free < need:
        raise SystemExit(f"bench: {args.dir} needs {need // MiB} MiB free")
    started = time.time()
    load = os.getloadavg()
    limits = LIMITS if args.limits == "both" else (args.limits,)
    summaries = [runScenario(s, lim, args) for s in chosen for lim in limits]
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "cpus": os.cpu_count(),
        "loadavg_before": load,
        "seconds": round(time.time() - started, 1),
        "defaults": defaults(),
        "batches": summaries,
        "goals": goals(summaries),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"\n{result['date']}, {result['cpus']} CPUs, load average before "
        f"{load[0]:.2f}; {result['seconds']} s; daemon defaults {result['defaults']}"
    )
    print(table(summaries))
    for line in details(summaries):
        print("  " + line)
    print("goals:")
    verdicts = result["goals"] or ["(no batch of 100 concurrent migrations run)"]
    for line in verdicts:
        print("  " + line)


if __name__ == "__main__":
    main(sys.argv[1:])
