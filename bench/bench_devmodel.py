"""
The paused window of a QEMU VM's migration, with and without live RAM.

A counting guest (the test guest of ``xenmig/demo/testguest.py``, the variant that
rewrites 512 KiB of its RAM as it counts) with ``--ram-mib`` MiB of random RAM
is migrated, each run on fresh QEMUs (TCG), three ways:

live: ``xenmig migrate --live`` into a real ``twistd xenmig`` over mutual TLS, the
    ``devmodel`` kind moving RAM in pre-copy (QEMU's own pre-copy through the
    device's stream; QEMU stops the VM once its RAM converged): the report's
    ``paused_window`` (from QEMU's stop to the commit);
paused: the same with ``live=0``: the whole stream in the paused window;
qemu: QEMU's own live migration between the two QEMUs over a unix socket, the
    reference: its ``downtime`` (from its stop of the VM to the end, with the
    same ``downtime-limit``), as ``query-migrate`` reports it.

::

    python bench/bench_devmodel.py [--ram-mib 256] [--runs 3] [--downtime 50]

Prints the figures of each run, then the medians and the ratios to QEMU's own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchlib import Daemon

from xenmig.demo import testguest


def qemu(image: str, qmp: str, ram: str, mib: int, incoming: bool) -> subprocess.Popen:
    command = testguest.qemuCommand(image, qmp, incoming) + [
        "-m", testguest.tcgRAM(mib),
        "-object",
        f"memory-backend-file,id=pc.ram,size={testguest.tcgRAM(mib)},mem-path={ram},"
        "share=off",
        "-machine", "memory-backend=pc.ram",
    ]  # fmt: skip
    return subprocess.Popen(command, stderr=subprocess.DEVNULL)


class Monitor:
    """Blocking QMP, for this script only (no reactor here)."""

    def __init__(self, path: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.socket = socket.socket(socket.AF_UNIX)
                self.socket.connect(path)
                break
            except OSError:
                self.socket.close()
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: no QMP socket at {path}")
                time.sleep(0.05)
        self.lines = self.socket.makefile("rw")
        self.lines.readline()
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        self.lines.write(json.dumps({"execute": command, "arguments": arguments}))
        self.lines.write("\n")
        self.lines.flush()
        while True:
            reply = json.loads(self.lines.readline())
            if "event" not in reply:
                if "error" in reply:
                    raise SystemExit(f"bench: QEMU refused {command}: {reply}")
                return reply["return"]

    def close(self) -> None:
        self.socket.close()


def end(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def writeRAM(path: str, mib: int) -> None:
    """
    The guest's RAM: ``mib`` MiB of random bytes (no page is all zeros), and the
    8 KiB more of L{testguest.tcgRAM}.
    """
    with open(path, "wb") as out:
        for _ in range(mib):
            out.write(os.urandom(1 << 20))
        out.write(os.urandom(testguest.tcgRAMBytes(mib) - mib * (1 << 20)))


@contextmanager
def twoQEMUs(
    image: str, source: str, target: str, ram: str, mib: int, *stale: str
) -> Iterator[None]:
    """
    The guest's QEMU (QMP at ``source``) and an incoming one (QMP at
    ``target``), after removing what a last run left at those paths and
    ``stale``; both killed at the end.
    """
    for path in (source, target, *stale):
        if os.path.exists(path):
            os.unlink(path)
    processes = [
        qemu(image, source, ram, mib, False),
        qemu(image, target, ram, mib, True),
    ]
    try:
        yield
    finally:
        end(*processes)


def migrateCommand(daemon: Daemon, source: str, target: str, device: str) -> list[str]:
    """``xenmig migrate --live --json`` of the guest's devmodel, ``device`` its keys."""
    return [
        sys.executable,
        "-m",
        "xenmig.cli.main",
        "migrate",
        *daemon.clientOptions(),
        "--domain",
        "bench-vm",
        "--device",
        f"devmodel:qemu:qmp={source},target-qmp={target},{device}",
        "--domain-control",
        f"qmp:{source}",
        "--live",
        "--json",
    ]  # fmt: skip


def viaXenmig(
    daemon: Daemon, work: Path, image: str, ram: str, mib: int, device: str
) -> dict[str, Any]:
    """One ``xenmig migrate --live`` run; the report's figures."""
    source, target = str(work / "src.qmp"), str(daemon.dest / "dst.qmp")
    with twoQEMUs(image, source, target, ram, mib):
        Monitor(source).close()
        Monitor(target).close()
        time.sleep(0.5)  # the guest runs and counts
        result = subprocess.run(
            migrateCommand(daemon, source, target, device),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise SystemExit(f"bench: xenmig migrate failed:\n{result.stderr}")
        report = json.loads(result.stdout)
        [qemuDevice] = report["devices"]
        return {
            "paused": report["paused_window"],
            "total": report["durations"]["total"],
            "rounds": qemuDevice["rounds"],
            "final": qemuDevice["data_bytes"] - sum(qemuDevice["rounds"]),
        }


def viaQEMU(work: Path, image: str, ram: str, mib: int, downtime: int) -> dict:
    """QEMU's own live migration over a unix socket; its downtime."""
    source, target = str(work / "qa.qmp"), str(work / "qb.qmp")
    channel = str(work / "migration.sock")
    with twoQEMUs(image, source, target, ram, mib, channel):
        a, b = Monitor(source), Monitor(target)
        b.execute("migrate-incoming", uri=f"unix:{channel}")
        time.sleep(0.5)
        a.execute(
            "migrate-set-parameters",
            **{"downtime-limit": downtime, "max-bandwidth": 2**40},
        )
        started = time.monotonic()
        a.execute("migrate", uri=f"unix:{channel}")
        while (info := a.execute("query-migrate"))["status"] != "completed":
            if info["status"] in ("failed", "cancelled"):
                raise SystemExit(f"bench: QEMU's migration {info['status']}: {info}")
            time.sleep(0.01)
        return {
            "paused": info["downtime"] / 1000,
            "total": time.monotonic() - started,
            "bytes": info["ram"]["transferred"],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--downtime", type=int, default=50, help="downtime-limit, ms")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xm-bdm-"))
    image = str(work / "guest.rom")
    testguest.writeGuestImage(image, dirtying=True)
    ram = str(work / "ram.bin")
    writeRAM(ram, args.ram_mib)
    daemon = Daemon(work / "target")
    figures: dict[str, list[dict[str, Any]]] = {"qemu": [], "live": [], "paused": []}
    try:
        for run in range(args.runs):
            figures["qemu"].append(
                viaQEMU(work, image, ram, args.ram_mib, args.downtime)
            )
            figures["live"].append(
                viaXenmig(
                    daemon, work, image, ram, args.ram_mib, f"downtime={args.downtime}"
                )
            )
            figures["paused"].append(
                viaXenmig(daemon, work, image, ram, args.ram_mib, "live=0")
            )
            print(
                f"run {run}: "
                + "; ".join(
                    f"{way} paused {f[-1]['paused']:.3f} s of {f[-1]['total']:.2f} s"
                    for way, f in figures.items()
                )
                + f"; live RAM rounds {figures['live'][-1]['rounds']} bytes, "
                f"final {figures['live'][-1]['final']} bytes"
            )
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    medians = {
        way: statistics.median(f["paused"] for f in runs)
        for way, runs in figures.items()
    }
    print(
        f"{args.ram_mib} MiB guest rewriting 512 KiB, downtime-limit "
        f"{args.downtime} ms, medians of {args.runs}: paused window: "
        f"QEMU alone {medians['qemu']:.3f} s, "
        f"xenmig live RAM {medians['live']:.3f} s "
        f"({medians['live'] / medians['qemu']:.1f}x QEMU's), "
        f"xenmig live=0 {medians['paused']:.3f} s "
        f"({medians['paused'] / medians['qemu']:.1f}x QEMU's)"
    )


if __name__ == "__main__":
    main()
