"""
A real Linux guest moved whole by xenmig, against QEMU's own live migration of
the same guest between two QEMUs on this host, measured in the same run.

    python bench/bench_wholevm.py [--memory-mib 512] [--dirty-mib 4]
                                  [--dirty-pause 0.2] [--runs 1] [--dir DIR]
                                  [--downtime MS] [--timeline]

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

Both are also measured end to end, on one clock: from QEMU's ``STOP`` event on
the source to its ``RESUME`` event on the target (QEMU's own target is started without
``-S``, so it runs as soon as it has loaded the state).
``--timeline`` prints, for each xenmig run, every step of that window with its
time since the source's ``STOP``: QEMU's events (run state and migration
status) on both sides, the source's log and the daemon's (at debug level).
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
from windowtimeline import Timeline

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

    daemon = benchlib.Daemon(
        work / f"xenmig-{run}", options=["--log-format=json", "--log-level=debug"]
    )
    home = tempfile.mkdtemp(prefix="xm-bench-")
    vm = RealVM(
        reactor, client(reactor, daemon), home, str(daemon.dest), str(daemon.state),
        f"bench-{run}", args.dirty_mib, args.dirty_pause, args.memory_mib,
    )  # fmt: skip
    timeline = Timeline()
    incoming = vm.incoming

    async def observedIncoming(tag: str) -> Any:
        target = await incoming(tag)
        await timeline.observeQEMU(target, "target")
        return target

    vm.incoming = observedIncoming  # type: ignore[method-assign]
    vm.downtime = args.downtime
    try:
        source = await vm.setUp()
        await source.says("SYNC", 120, count=50)
        await dirtied(reactor, source)
        rate = source.console.dirtyRate(args.dirty_mib)
        await timeline.observeQEMU(source, "source")
        timeline.observeLog()
        move = await vm.move("x")
        if not move.committed:
            raise SystemExit(f"bench: the migration failed: {move.reason}")
        assert move.target is not None
        await move.target.says("SYNC", 60, count=len(move.target.console.syncs) + 2)
        timeline.close()
        timeline.readDaemonLog(daemon.log, move.migrationId)
        window = timeline.window()
        report = move.report
        return {
            "dirty_mib_per_s": rate,
            "total": report["durations"]["total"],
            "paused_window": report["paused_window"],
            "stop_to_resume": window[1] - window[0] if window else None,
            "timeline": timeline.render(),
            "devices": {
                d["name"]: {"bytes": d.get("bytes"), "rounds": d.get("rounds")}
                for d in report["devices"]
            },
        }
    finally:
        timeline.close()
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
        # The incoming QEMU on the same image (shared storage: QEMU hands it over),
        # without -S: it runs as soon as it has loaded the state, as QEMU's own
        # switch-over does.
        target = await vm.startQEMU(
            home, "incoming", False, [*vm.sourceDisk, "-incoming", "defer"]
        )
        channel = os.path.join(home, "migration.sock")

        async def incoming(qmp: Any) -> None:
            await qmp.execute("migrate-incoming", {"uri": f"unix:{channel}"})

        async def migrate(qmp: Any) -> dict[str, Any]:
            limits = {"max-bandwidth": UNLIMITED_BANDWIDTH}
            if args.downtime:
                limits["downtime-limit"] = args.downtime
            await qmp.execute("migrate-set-parameters", limits)
            await qmp.execute("migrate", {"uri": f"unix:{channel}"})
            while True:
                info: dict[str, Any] = await qmp.execute("query-migrate")
                if info.get("status") in ("completed", "failed", "cancelled"):
                    return info
                await deferLater(reactor, 0.05, lambda: None)

        await qmpSession(reactor, target.qmpPath, 10, incoming, "incoming")
        began = time.time()
        info = await qmpSession(reactor, source.qmpPath, 600, migrate, "source")
        if info["status"] != "completed":
            raise SystemExit(f"bench: QEMU's migration {info['status']}: {info}")
        await target.says("SYNC", 60, count=len(target.console.syncs) + 5)
        stopped = source.first("STOP", began)
        resumed = target.first("RESUME", began)
        ram = info["ram"]
        return {
            "dirty_mib_per_s": rate,
            "total": info["total-time"] / 1000,
            "downtime": info["downtime"] / 1000,
            "stop_to_resume": (
                resumed - stopped if stopped is not None and resumed else None
            ),
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
    parser.add_argument(
        "--downtime",
        type=int,
        default=0,
        metavar="MS",
        help="QEMU's downtime-limit for both migrations (default: QEMU's, 300)",
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="print each xenmig run's paused window step by step",
    )
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
            timeline = xenmig.pop("timeline")
            results.append({"xenmig": xenmig, "qemu": qemu, "ratio": ratio})
            print(
                f"run {run}: {args.memory_mib} MiB guest rewriting its RAM at "
                f"{xenmig['dirty_mib_per_s']:.1f} / {qemu['dirty_mib_per_s']:.1f} "
                f"MiB/s ({args.dirty_mib} MiB, then {args.dirty_pause:g} s)\n"
                f"  xenmig: total {xenmig['total']:.2f} s, paused window "
                f"{xenmig['paused_window']:.3f} s (STOP to RESUME "
                f"{_seconds(xenmig['stop_to_resume'])}), devices {xenmig['devices']}\n"
                f"  QEMU alone: total {qemu['total']:.2f} s, downtime "
                f"{qemu['downtime']:.3f} s (STOP to RESUME "
                f"{_seconds(qemu['stop_to_resume'])}), RAM "
                f"{qemu['ram_bytes'] / MiB:.1f} MiB in {qemu['dirty_passes']} passes\n"
                f"  paused window / QEMU's downtime: {ratio:.1f}x; STOP to RESUME: "
                f"{_ratio(xenmig['stop_to_resume'], qemu['stop_to_resume'])} "
                f"({time.monotonic() - started:.0f} s for the run)",
                flush=True,
            )
            if args.timeline:
                print(timeline, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


def _seconds(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3f} s"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or not theirs:
        return "unknown"
    return f"{ours / theirs:.1f}x"


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
