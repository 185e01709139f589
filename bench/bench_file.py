"""
End-to-end benchmark of the ``file`` kind against a plain-socket copy and scp.

    python bench/bench_file.py [--size-mib 1024] [--runs 3] [--client process|cli]
                               [--dir DIR] [--cache DIR] [--profile] [--no-scp]

(a) Reference: a sender process streams the file over plain TCP on 127.0.0.1 to
    a receiver process, which writes it to DIR and fsyncs it (no TLS, no
    framing, no hashing).  With an sshd (``/usr/sbin/sshd``), ``scp`` to an
    sshd of the bench's own, with its default cipher and with aes128-gcm.
(b) xenmig: a real ``twistd xenmig`` daemon, a client process (the
    MigrationClient API, or ``xenmig migrate`` with ``--client cli``), mutual
    TLS, and the file installed into DIR: the wall time from Prepare to the
    Commit's answer, the daemon's peak RSS (VmHWM), and the digest of the result.

Each round runs them interleaved; each prints its wall time and, for scp and
xenmig, the CPU seconds per GiB of each side (the client's and scp's from their
rusage, the daemon's from ``/proc``, sshd's from its reaped children), the
measure that a busy machine disturbs least.

Both write to DIR (default: tmpfs, so that the disk does not dominate).  The
dense random source file is made once and kept in the cache dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import (
    DENSE_CACHE,
    SSHD,
    XENMIG,
    MiB,
    cpuSeconds,
    peakRSS,
    plainCopy,
    sourceFile,
    tmpfsOr,
)

HERE = Path(__file__).resolve()
GOAL_RSS = 150 * 1000 * 1000
GOAL_RATIO = 0.40

DEFAULT_DIR = tmpfsOr("/dev/shm/xenmig-bench", "/tmp/xenmig-bench")
#: A disk filesystem, where both copies pay for their fsync.
DISK_DIR = "/var/tmp/xenmig-bench"


# -- helpers ---------------------------------------------------------------------------


def minorFaults(pid: int) -> int:
    """Minor page faults of a live process so far."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def rate(size: int, seconds: float) -> float:
    return size / seconds / 1e6


# -- (a) the plain-socket reference ----------------------------------------------------


def reference(source: Path, work: Path) -> dict[str, Any]:
    """One plain-socket copy (L{benchlib.plainCopy}); its figures."""
    output = work / "reference.bin"
    result = plainCopy(source, output)
    size = source.stat().st_size
    if result["bytes"] != size:
        raise SystemExit(f"bench: the reference copied {result['bytes']} of {size}")
    output.unlink()
    return result


# -- (b) xenmig ------------------------------------------------------------------------


class Daemon(benchlib.Daemon):
    """The benchmark's daemon, profiled with cProfile on ``--profile``."""

    def __init__(self, work: Path, profile: bool) -> None:
        self.stats = work / "daemon.pstats"
        self.clientStats = work / "client.pstats"
        self.profile = profile
        profiling = (
            [f"--profile={self.stats}", "--profiler=cprofile", "--savestats"]
            if profile
            else []
        )
        super().__init__(work, profiling)


def clientArgv(daemon: Daemon, how: str, source: Path, target: Path) -> list[str]:
    device = f"file:blob:path={source},target={target}"
    if how == "cli":
        return [
            *XENMIG,
            "migrate",
            *daemon.clientOptions(),
            "--domain=bench",
            f"--device={device}",
            "--json",
        ]
    profiling = (
        ["-m", "cProfile", "-o", str(daemon.clientStats)] if daemon.profile else []
    )
    return [
        sys.executable,
        *profiling,
        str(HERE),
        "_client",
        str(daemon.port),
        str(daemon.pki),
    ]


def migrate(daemon: Daemon, how: str, source: Path, run: int) -> dict[str, Any]:
    """One migration by a client process; its figures (the client's from wait4)."""
    target = daemon.dest / f"run{run}.bin"
    argv = clientArgv(daemon, how, source, target)
    if how != "cli":
        argv += [str(source), str(target)]
    cpuBefore = cpuSeconds(daemon.process.pid)
    with tempfile.TemporaryFile() as errors:
        client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
        assert client.stdout is not None
        output = client.stdout.read()
        _, status, usage = os.wait4(client.pid, 0)
        client.returncode = os.waitstatus_to_exitcode(status)
        if client.returncode != 0:
            errors.seek(0)
            problem = (output + errors.read()).decode(errors="replace")
            raise SystemExit(f"bench: the migration failed:\n{problem}")
    report = json.loads(output)
    return {
        "seconds": report.get("seconds") or report["durations"]["total"],
        "target": target,
        "daemon_cpu": cpuSeconds(daemon.process.pid) - cpuBefore,
        "client_rss": usage.ru_maxrss * 1024,
        "client_cpu": usage.ru_utime + usage.ru_stime,
        "client_faults": usage.ru_minflt,
    }


async def _client(reactor: Any, port: int, where: Path, source: str, target: str):
    """Child: one migration with the MigrationClient API; JSON figures."""
    from xenmig import tls
    from xenmig.model import DeviceSpec
    from xenmig.source.client import MigrationClient
    from xenmig.source.threadedstream import sslContext

    identity = tls.loadIdentity(where / "source.test.pem", where / "source.test.key")
    authorities = tls.loadAuthority(where / "ca.pem")
    options = tls.clientOptions("127.0.0.1", identity, authorities)
    # As ``xenmig migrate`` does: threaded streams (unless XENMIG_BENCH_REACTOR).
    threaded = not os.environ.get("XENMIG_BENCH_REACTOR")
    client = MigrationClient(
        reactor,
        "127.0.0.1",
        port,
        tls=options,
        sslContext=sslContext(identity, authorities) if threaded else None,
        serverName="127.0.0.1",
    )
    spec = DeviceSpec.parse(f"file:blob:path={source},target={target}")
    started = time.monotonic()
    migration = await client.prepare("bench", [spec])
    await migration.transfer()
    await migration.commit()
    report = migration.report()
    report["seconds"] = time.monotonic() - started
    print(json.dumps(report))


def runClient(argv: list[str]) -> None:
    from twisted.internet import defer, task

    from xenmig.tuning import tuneAllocator

    tuneAllocator()  # as the xenmig command line does

    port, where, source, target = int(argv[0]), Path(argv[1]), argv[2], argv[3]
    task.react(
        lambda reactor: defer.Deferred.fromCoroutine(
            _client(reactor, port, where, source, target)
        )
    )


# -- the run ---------------------------------------------------------------------------

#: scp's default cipher, and its fastest here (AES-NI).
SCP_CIPHERS = {"scp": None, "scp aes128-gcm": "aes128-gcm@openssh.com"}


def bench(
    daemon: Daemon,
    how: str,
    source: Path,
    expected: Any,
    run: int,
    ssh: benchlib.SSH | None,
) -> dict[str, dict[str, float]]:
    """
    One round, interleaved (a busy machine slows them all): the plain copy,
    scp with each cipher (with an sshd), then a migration; each one's figures.
    """
    from xenmig.digest import hashFile

    size = source.stat().st_size
    gib = size / (1024 * MiB)
    round: dict[str, dict[str, float]] = {}
    round["plain socket"] = {"wall": reference(source, daemon.work)["seconds"]}
    for name, cipher in SCP_CIPHERS.items() if ssh is not None else ():
        assert ssh is not None
        output = daemon.work / "scp.bin"
        figures = ssh.scpFigures(source, output, cipher)
        if hashFile(str(output)) != expected:
            raise SystemExit(f"bench: the copy of {name} differs")
        output.unlink()
        round[name] = figures
    faults = minorFaults(daemon.process.pid)
    result = migrate(daemon, how, source, run)
    faults = minorFaults(daemon.process.pid) - faults
    if hashFile(str(result["target"])) != expected:
        raise SystemExit("bench: the migrated file's digest differs")
    result["target"].unlink()
    round["xenmig"] = {
        "wall": result["seconds"],
        "sender_cpu": result["client_cpu"],
        "receiver_cpu": result["daemon_cpu"],
    }
    print(f"run {run}:")
    for name, figures in round.items():
        print("  " + line(name, figures, size, gib))
    print(
        f"  xenmig: daemon {faults} page faults; client "
        f"{result['client_faults']} page faults, "
        f"peak RSS {result['client_rss'] / 1e6:.0f} MB",
        flush=True,
    )
    return round


def line(name: str, figures: dict[str, float], size: int, gib: float) -> str:
    """Wall time and rate, and CPU seconds per GiB for each side when known."""
    wall = figures["wall"]
    text = f"{name:<16} {wall:6.3f} s {rate(size, wall):5.0f} MB/s"
    if "sender_cpu" in figures:
        text += (
            f" | CPU per GiB: sender {figures['sender_cpu'] / gib:.2f} s, "
            f"receiver {figures['receiver_cpu'] / gib:.2f} s"
        )
    return text


def summarize(size: int, rounds: list[dict[str, dict[str, float]]], rss: int) -> None:
    """Medians over the rounds, and the ratios against the references."""
    gib = size / (1024 * MiB)
    print(f"\nmedians of {len(rounds)} rounds:")
    medians: dict[str, dict[str, float]] = {}
    for name in rounds[0]:
        medians[name] = {
            key: statistics.median(r[name][key] for r in rounds)
            for key in rounds[0][name]
        }
        print("  " + line(name, medians[name], size, gib))
    ours = medians["xenmig"]["wall"]
    ratio = statistics.median(
        r["plain socket"]["wall"] / r["xenmig"]["wall"] for r in rounds
    )
    print(
        f"xenmig against the plain socket: {ratio:.0%} "
        f"(goal >= {GOAL_RATIO:.0%}: {'met' if ratio >= GOAL_RATIO else 'MISSED'})"
    )
    for name in SCP_CIPHERS:
        if name in medians:
            faster = statistics.median(
                r[name]["wall"] / r["xenmig"]["wall"] for r in rounds
            )
            print(f"xenmig against {name}: {faster:.2f}x as fast ({ours:.3f} s)")
    print(
        f"daemon peak RSS {rss / 1e6:.0f} MB (goal < {GOAL_RSS / 1e6:.0f} MB: "
        f"{'met' if rss < GOAL_RSS else 'MISSED'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument(
        "--runs", type=int, default=3, help="pairs of copies (default 3)"
    )
    parser.add_argument("--client", choices=["process", "cli"], default="process")
    parser.add_argument(
        "--dir",
        action="append",
        help="where copies are written (repeatable; default: tmpfs, then a disk "
        "filesystem, each measured on its own)",
    )
    parser.add_argument("--cache", default=DENSE_CACHE, help="the source file")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile daemon and client"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument(
        "--no-scp", action="store_true", help="leave out the scp references"
    )
    args = parser.parse_args()

    size = args.size_mib * MiB
    source = sourceFile(Path(args.cache), size)
    from xenmig.digest import hashFile

    expected = hashFile(str(source))
    for where in args.dir or [DEFAULT_DIR, DISK_DIR]:
        measure(args, Path(where), source, size, expected)


def measure(
    args: argparse.Namespace, where: Path, source: Path, size: int, expected: Any
) -> None:
    """One set of runs with the copies written under ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(where).free < size + 256 * MiB:
        raise SystemExit(f"bench: {where} needs {size // MiB + 256} MiB free")
    work = Path(tempfile.mkdtemp(prefix="run-", dir=where))
    print(f"\n== source {source}, {size // MiB} MiB; copies to {work}")
    try:
        daemon = Daemon(work, args.profile)
        ssh = None
        try:
            if not args.no_scp and shutil.which("scp") and os.path.exists(SSHD):
                ssh = benchlib.SSH(work)
            rounds = [
                bench(daemon, args.client, source, expected, run, ssh)
                for run in range(args.runs)
            ]
            rss = peakRSS(daemon.process.pid)
        finally:
            daemon.stop()
            if ssh is not None:
                ssh.stop()
        summarize(size, rounds, rss)
        if args.profile:
            benchlib.showProfile("daemon", daemon.stats)
            benchlib.showProfile("client", daemon.clientStats)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_client"]:
        runClient(sys.argv[2:])
    else:
        main()
