"""
The devmodel kind's relay: how fast QEMU's migration stream crosses xenmig.

A counting guest (``xenmig/demo/testguest.py``) with ``--ram-mib`` MiB of random
RAM is migrated by ``xenmig migrate --live`` with ``live=0`` into a real
``twistd xenmig`` over mutual TLS: the VM paused, the whole of QEMU's stream goes
through the relay (the source's reader, the stream, the target's feed into the
incoming QEMU).  The relay's rate is the stream's bytes over the device's time
(stream opened to verified); the CPU seconds are the daemon's and the client's
for the run.  The reference, measured in the same run: QEMU's own migration of
the same paused VM between two QEMUs over a unix socket (its bytes over its
``total-time``).

With ``--live`` the VM runs and its RAM moves in pre-copy (``downtime=50``):
the rate is then that of the rounds and the final state together (a guest
that rewrites 512 KiB adds little to its RAM), while TCG keeps a core busy.

``--code DIR`` (repeatable) runs the xenmig of each DIR in turn, round by round
(an A/B comparison: e.g. ``--code ../xenmig-before --code .``)::

    python bench/bench_relay.py [--ram-mib 512] [--runs 2] [--live] [--code DIR]...

Prints each run's figures, then the medians and their ratios to QEMU's own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench_devmodel import Monitor, migrateCommand, twoQEMUs, writeRAM
from benchlib import Daemon, cpuSeconds

from xenmig.demo import testguest

MB = 1e6


def viaXenmig(
    daemon: Daemon, work: Path, image: str, ram: str, mib: int, live: bool
) -> dict[str, float]:
    """One ``xenmig migrate`` of the VM's whole stream; rate and CPU."""
    source, target = str(work / "src.qmp"), str(daemon.dest / "dst.qmp")
    device = "downtime=50" if live else "live=0"
    with twoQEMUs(image, source, target, ram, mib):
        Monitor(source).close()
        Monitor(target).close()
        time.sleep(0.3)
        daemonCPU = cpuSeconds(daemon.process.pid)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = subprocess.run(
            migrateCommand(daemon, source, target, device),
            capture_output=True,
            text=True,
            timeout=600,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise SystemExit(f"bench: xenmig migrate failed:\n{result.stderr}")
        [device] = json.loads(result.stdout)["devices"]
        return {
            "rate": device["data_bytes"] / device["seconds"] / MB,
            "bytes": device["data_bytes"],
            "daemon_cpu": cpuSeconds(daemon.process.pid) - daemonCPU,
            "client_cpu": (after.ru_utime + after.ru_stime)
            - (before.ru_utime + before.ru_stime),
        }


def viaQEMU(work: Path, image: str, ram: str, mib: int) -> dict[str, float]:
    """QEMU's own migration of the paused VM over a unix socket; its rate."""
    source, target = str(work / "qa.qmp"), str(work / "qb.qmp")
    channel = str(work / "migration.sock")
    with twoQEMUs(image, source, target, ram, mib, channel):
        a, b = Monitor(source), Monitor(target)
        b.execute("migrate-incoming", uri=f"unix:{channel}")
        time.sleep(0.3)
        a.execute("stop")
        a.execute("migrate-set-parameters", **{"max-bandwidth": 2**40})
        a.execute("migrate", uri=f"unix:{channel}")
        while (info := a.execute("query-migrate"))["status"] != "completed":
            if info["status"] in ("failed", "cancelled"):
                raise SystemExit(f"bench: QEMU's migration {info['status']}: {info}")
            time.sleep(0.01)
        total = info["ram"]["transferred"]
        return {"rate": total / (info["total-time"] / 1000) / MB, "bytes": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--live",
        action="store_true",
        help="RAM in pre-copy while the guest runs (downtime=50), not paused",
    )
    parser.add_argument(
        "--code",
        action="append",
        help="a tree whose xenmig to run (repeatable; default: the installed one)",
    )
    args = parser.parse_args()
    codes = [os.path.abspath(c) for c in args.code or []] or [""]
    work = Path(tempfile.mkdtemp(prefix="xm-brelay-"))
    image = str(work / "guest.rom")
    testguest.writeGuestImage(image, dirtying=True)
    ram = str(work / "ram.bin")
    writeRAM(ram, args.ram_mib)
    daemons: dict[str, Daemon] = {}
    figures: dict[str, list[dict[str, float]]] = {"qemu": []}
    try:
        for index, code in enumerate(codes):
            if code:
                os.environ["PYTHONPATH"] = code
            daemons[code] = Daemon(work / f"target{index}")
            figures[code] = []
        for run in range(args.runs):
            figures["qemu"].append(viaQEMU(work, image, ram, args.ram_mib))
            line = [f"qemu {figures['qemu'][-1]['rate']:.0f} MB/s"]
            for code, daemon in daemons.items():
                if code:
                    os.environ["PYTHONPATH"] = code
                f = viaXenmig(daemon, work, image, ram, args.ram_mib, args.live)
                figures[code].append(f)
                line.append(
                    f"{code or 'xenmig'} {f['rate']:.0f} MB/s "
                    f"(daemon {f['daemon_cpu']:.2f} s CPU, "
                    f"client {f['client_cpu']:.2f} s CPU)"
                )
            print(f"run {run}: " + "; ".join(line), flush=True)
    finally:
        for daemon in daemons.values():
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    reference = statistics.median(f["rate"] for f in figures["qemu"])
    state = "running" if args.live else "paused"
    print(
        f"{args.ram_mib} MiB {state} VM, medians of {args.runs} "
        f"(load average {os.getloadavg()[0]:.1f}): QEMU alone {reference:.0f} MB/s"
    )
    for code in daemons:
        rate = statistics.median(f["rate"] for f in figures[code])
        runs = figures[code]
        cpu = statistics.median(f["daemon_cpu"] + f["client_cpu"] for f in runs)
        print(
            f"  {code or 'xenmig'}: {rate:.0f} MB/s ({rate / reference:.2f}x QEMU's), "
            f"{cpu:.2f} s CPU (daemon + client)"
        )


if __name__ == "__main__":
    main()
