"""
A real Linux guest moved whole by xenmig, against QEMU's own live migration of
the same guest between two QEMUs on this host, measured in the same run.

    python bench/bench_wholevm.py [--memory-mib 512] [--dirty-mib 4]
                                  [--dirty-pause 0.2] [--runs 1] [--dir DIR]

The guest (``xenmig.demo.linuxguest``: Debian's kernel, a busybox initramfs,
TCG, ext4 on virtio-blk, tpm-tis on a swtpm) appends fsynced records to its disk
and rewrites ``--dirty-mib`` MiB of RAM with random bytes, then sleeps
``--dirty-pause`` s, in a loop.  Each run boots it twice:

1. **xenmig**: moved through a ``twistd xenmig`` daemon over mutual TLS with
   ``devmodel`` and ``disk`` (``xenmig.demo.realvm``, as a QEMU toolstack does):
   the total time (Prepare to the commit's answer), the paused window (the pause
   to the commit's answer) and the bytes of each device per round, from the
   migration's report;
2. **QEMU alone**: ``migrate`` to an incoming QEMU on the same host, over a unix
   socket, the disk shared (the same image file), the bandwidth unlimited as
   xenmig sets it: QEMU's total time, its downtime, the RAM it sent and its
   passes over dirty memory, from ``query-migrate``.

The ratio xenmig's paused window / QEMU's downtime is the figure to watch.  The
guest's dirty rate is measured inside it (MiB rewritten per second of its loop).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
from twisted.internet import defer, task
from twisted.internet.task import deferLater

MiB = 1024 * 1024


def client(reactor: Any, daemon: benchlib.Daemon) -> Any:
    from xenmig import tls
    from xenmig.source.client import MigrationClient
    from xenmig.source.threadedstream import sslContext

    identity = tls.loadIdentity(
        daemon.pki / "source.test.pem", daemon.pki / "source.test.key"
    )
    authorities = tls.loadAuthority(daemon.pki / "ca.pem")
    return MigrationClient(
        reactor,
        "127.0.0.1",
        daemon.port,
        tls=tls.clientOptions("127.0.0.1", identity, authorities),
        sslContext=sslContext(identity, authorities),
        serverName="127.0.0.1",
    )


async def dirtied(reactor: Any, guest: Any, times: int = 10) -> None:
    """Wait until ``guest`` rewrote its RAM ``times`` times (its rate is known)."""
    deadline = reactor.seconds() + 120
    while len(guest.console.dirtied) < times and reactor.seconds() < deadline:
        await deferLater(reactor, 0.1, lambda: None)


async def withXenmig(reactor: Any, args: Any, work: Path, run: int) -> dict[str, Any]:
    from xenmig.demo.realvm import RealVM

    daemon = benchlib.Daemon(work / f"xenmig-{run}")
    home = tempfile.mkdtemp(prefix="xm-bench-")
    vm = RealVM(
        reactor, client(reactor, daemon), home, str(daemon.dest), str(daemon.state),
        f"bench-{run}", args.dirty_mib, args.dirty_pause, args.memory_mib,
    )  # fmt: skip
    try:
        source = await vm.setUp()
        await source.says("SYNC", 120, count=50)
        await dirtied(reactor, source)
        rate = source.console.dirtyRate(args.dirty_mib)
        move = await vm.move("x")
        if not move.committed:
            raise SystemExit(f"bench: the migration failed: {move.reason}")
        report = move.report
        return {
            "dirty_mib_per_s": rate,
            "total": report["durations"]["total"],
            "paused_window": report["paused_window"],
            "devices": {
                d["name"]: {"bytes": d.get("bytes"), "rounds": d.get("rounds")}
                for d in report["devices"]
            },
        }
    finally:
        await vm.tearDown()
        daemon.stop()
        shutil.rmtree(home, ignore_errors=True)


async def withQEMU(reactor: Any, args: Any, work: Path, run: int) -> dict[str, Any]:
    from xenmig.clients.qmpclient import UNLIMITED_BANDWIDTH, qmpSession
    from xenmig.demo.realvm import RealVM

    home = tempfile.mkdtemp(prefix="xm-qemu-")
    vm = RealVM(
        reactor, None, home, home, home, f"qemu-{run}",  # type: ignore[arg-type]
        args.dirty_mib, args.dirty_pause, args.memory_mib,
    )  # fmt: skip
    try:
        source = await vm.setUp()
        await source.says("SYNC", 120, count=50)
        await dirtied(reactor, source)
        rate = source.console.dirtyRate(args.dirty_mib)
        # The incoming QEMU on the same image (shared storage: QEMU hands it over).
        target = await vm.startQEMU(home, "incoming", True, vm.sourceDisk)
        channel = os.path.join(home, "migration.sock")

        async def incoming(qmp: Any) -> None:
            await qmp.execute("migrate-incoming", {"uri": f"unix:{channel}"})

        async def migrate(qmp: Any) -> dict[str, Any]:
            await qmp.execute(
                "migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH}
            )
            await qmp.execute("migrate", {"uri": f"unix:{channel}"})
            while True:
                info: dict[str, Any] = await qmp.execute("query-migrate")
                if info.get("status") in ("completed", "failed", "cancelled"):
                    return info
                await deferLater(reactor, 0.05, lambda: None)

        await qmpSession(reactor, target.qmpPath, 10, incoming, "incoming")
        info = await qmpSession(reactor, source.qmpPath, 600, migrate, "source")
        if info["status"] != "completed":
            raise SystemExit(f"bench: QEMU's migration {info['status']}: {info}")
        # The incoming QEMU was started with -S, as a toolstack's is: resume it.
        await qmpSession(reactor, target.qmpPath, 10, lambda q: q.cont(), "cont")
        await target.says("SYNC", 60, count=len(target.console.syncs) + 5)
        ram = info["ram"]
        return {
            "dirty_mib_per_s": rate,
            "total": info["total-time"] / 1000,
            "downtime": info["downtime"] / 1000,
            "ram_bytes": ram["transferred"],
            "dirty_passes": ram.get("dirty-sync-count"),
        }
    finally:
        await vm.tearDown()
        shutil.rmtree(home, ignore_errors=True)


async def main(reactor: Any) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument("--dirty-mib", type=int, default=4)
    parser.add_argument("--dirty-pause", type=float, default=0.2)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    from xenmig.demo import linuxguest

    if linuxguest.missing():
        raise SystemExit(f"bench: install {', '.join(linuxguest.missing())}")
    work = Path(tempfile.mkdtemp(prefix="xm-wholevm-", dir=args.dir))
    results = []
    try:
        for run in range(args.runs):
            started = time.monotonic()
            xenmig = await withXenmig(reactor, args, work, run)
            qemu = await withQEMU(reactor, args, work, run)
            ratio = xenmig["paused_window"] / max(qemu["downtime"], 1e-6)
            results.append({"xenmig": xenmig, "qemu": qemu, "ratio": ratio})
            print(
                f"run {run}: {args.memory_mib} MiB guest rewriting its RAM at "
                f"{xenmig['dirty_mib_per_s']:.1f} / {qemu['dirty_mib_per_s']:.1f} "
                f"MiB/s ({args.dirty_mib} MiB, then {args.dirty_pause:g} s)\n"
                f"  xenmig: total {xenmig['total']:.2f} s, paused window "
                f"{xenmig['paused_window']:.3f} s, devices {xenmig['devices']}\n"
                f"  QEMU alone: total {qemu['total']:.2f} s, downtime "
                f"{qemu['downtime']:.3f} s, RAM {qemu['ram_bytes'] / MiB:.1f} MiB in "
                f"{qemu['dirty_passes']} passes\n"
                f"  paused window / QEMU's downtime: {ratio:.1f}x "
                f"({time.monotonic() - started:.0f} s for the run)",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
