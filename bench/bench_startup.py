"""
``xenmig migrate`` of a small file: the command line's start-up, in-process
and through the local daemon (``--via-daemon``).

    python bench/bench_startup.py [--size-kib 4] [--runs 7] [--gib]

A target daemon and a source host's daemon (``twistd xenmig`` each, mutual
TLS, the source daemon presenting ``source.test``) on 127.0.0.1.  Each round,
interleaved: ``python3 -c pass`` (the interpreter's own start-up, the floor
of any command), ``xenmig migrate`` in its own process, and ``xenmig migrate
--via-daemon``.  Each prints its wall time and CPU seconds: the command's from
its rusage, the source daemon's from ``/proc`` (it does the sending via the
daemon).  Medians at the end, and each against the interpreter's start-up.

Python modules are run from their bytecode, as an installed package's are (pip
compiles them): the bench compiles xenmig's (``__pycache__`` beside the
sources, removed at the end), since ``PYTHONDONTWRITEBYTECODE`` would otherwise
make every run compile them again.

``--gib`` also sends a dense 1 GiB file both ways once and prints the
sender's CPU per GiB (the command's own in-process; the source daemon's and
the command's via the daemon).
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
from benchlib import XENMIG, MiB, cpuSeconds, tmpfsOr

DEFAULT_DIR = tmpfsOr("/dev/shm/xenmig-bench", "/tmp/xenmig-bench")


def timed(argv: list[str], daemon: benchlib.Daemon | None = None) -> dict[str, Any]:
    """Run ``argv``; its wall time, its CPU and ``daemon``'s CPU meanwhile."""
    before = cpuSeconds(daemon.process.pid) if daemon is not None else 0.0
    started = time.monotonic()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate()
    wall = time.monotonic() - started
    if child.returncode != 0:
        raise SystemExit(f"bench: {argv[-1]!r} failed:\n{(out + err).decode()}")
    figures: dict[str, Any] = {"wall": wall, "cpu": _childCPU()}
    if daemon is not None:
        figures["daemon_cpu"] = cpuSeconds(daemon.process.pid) - before
    figures["output"] = out
    return figures


_LAST = [0.0]


def _childCPU() -> float:
    """The CPU of the child reaped last (the difference of RUSAGE_CHILDREN)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    spent, _LAST[0] = total - _LAST[0], total
    return spent


def migrateArgv(
    target: benchlib.Daemon, source: benchlib.Daemon | None, path: Path, run: str
) -> list[str]:
    """``xenmig migrate`` of ``path`` into ``target``, via ``source`` if given."""
    how = (
        [f"--via-daemon={source.state}", f"--target=127.0.0.1:{target.port}"]
        if source is not None
        else target.clientOptions()
    )
    device = f"file:blob:path={path},target={target.dest / run}"
    return [*XENMIG, "migrate", *how, "--domain=bench", f"--device={device}", "--json"]


def round_(
    target: benchlib.Daemon, source: benchlib.Daemon, path: Path, run: int
) -> dict[str, dict[str, float]]:
    """One interleaved round; each one's figures."""
    figures = {
        "python3 -c pass": timed([sys.executable, "-c", "pass"]),
        "in-process": timed(migrateArgv(target, None, path, f"a{run}"), source),
        "via the daemon": timed(migrateArgv(target, source, path, f"b{run}"), source),
    }
    for name in ("in-process", "via the daemon"):
        report = json.loads(figures[name].pop("output"))
        assert report["exit_status"] == 0, report
    figures["python3 -c pass"].pop("output")
    print(f"run {run}:")
    for name, values in figures.items():
        print("  " + line(name, values))
    for installed in target.dest.iterdir():
        installed.unlink()
    return figures


def line(name: str, values: dict[str, float]) -> str:
    text = f"{name:<16} wall {values['wall']:.3f} s, CPU {values['cpu']:.3f} s"
    if "daemon_cpu" in values:
        text += f", source daemon CPU {values['daemon_cpu']:.3f} s"
    return text


def gib(target: benchlib.Daemon, source: benchlib.Daemon, work: Path) -> None:
    """One 1 GiB migration each way: the sender's CPU per GiB."""
    path = work / "dense.bin"
    with open(path, "wb") as f:
        for _ in range(1024):
            f.write(os.urandom(MiB))
    for name, via in (("in-process", None), ("via the daemon", source)):
        figures = timed(migrateArgv(target, via, path, "big"), source)
        sender = figures["cpu"] + (figures["daemon_cpu"] if via else 0.0)
        print(
            f"1 GiB {name:<15} wall {figures['wall']:.2f} s; sender CPU per GiB "
            f"{sender:.2f} s (command {figures['cpu']:.2f} s, source daemon "
            f"{figures['daemon_cpu']:.2f} s)"
        )
        (target.dest / "big").unlink()
    path.unlink()


def compiled() -> list[Path]:
    """Compile xenmig's modules in place; the ``__pycache__`` dirs it made."""
    import compileall

    import xenmig

    package = Path(xenmig.__file__).parent
    before = set(package.rglob("__pycache__"))
    compileall.compile_dir(str(package), quiet=1)
    return sorted(set(package.rglob("__pycache__")) - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--size-kib", type=int, default=4)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dir", default=DEFAULT_DIR)
    parser.add_argument("--gib", action="store_true", help="also a 1 GiB file")
    args = parser.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="startup-", dir=args.dir))
    target = source = None
    made = compiled()
    try:
        for name in ("target", "source"):
            (work / name).mkdir()
        target = benchlib.Daemon(work / "target")
        ca = target.pki
        source = benchlib.Daemon(
            work / "source",
            options=[
                f"--ca={ca / 'ca.pem'}",
                f"--cert={ca / 'source.test.pem'}",
                f"--key={ca / 'source.test.key'}",
            ],
        )
        path = work / "small.bin"
        path.write_bytes(os.urandom(args.size_kib * 1024))
        _childCPU()  # from here on: the commands' alone
        print(f"== {args.size_kib} KiB, load average {os.getloadavg()[0]:.2f}")
        rounds = [round_(target, source, path, run) for run in range(args.runs)]
        print(f"\nmedians of {len(rounds)} rounds:")
        floor = statistics.median(r["python3 -c pass"]["wall"] for r in rounds)
        for name in rounds[0]:
            medians = {
                key: statistics.median(r[name][key] for r in rounds)
                for key in rounds[0][name]
            }
            print(
                f"  {line(name, medians)}; wall {medians['wall'] / floor:.1f}x python"
            )
        if args.gib:
            gib(target, source, work)
        print(f"load average {os.getloadavg()[0]:.2f}")
    finally:
        for daemon in (source, target):
            if daemon is not None:
                daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
        for cache in made:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
