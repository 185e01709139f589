"""
``xenmig demo``: two real daemons on loopback, real state migrated both ways.

It makes a throwaway CA and two host identities, starts ``twistd -n xenmig`` for
hosta.test and hostb.test on free loopback ports (L{xenmig.demo.hosts}), migrates
every demo device (L{xenmig.demo.devices}) A->B (as host A) and back B->A (as
host B) over mutual TLS, verifies each result (digests, the target daemon's own
status on its local socket, the resume gate firing), migrates a whole VM where
it can (L{xenmig.demo.wholevm}), prints a summary, and stops the daemons.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from xenmig.demo.devices import DemoDevice, DemoFailed, demoDevices
from xenmig.demo.hosts import DemoHost, Leg, makeHosts
from xenmig.model import MigrationStatus
from xenmig.plugins import deviceKinds
from xenmig.source.migration import SourceMigration
from xenmig.toolstack.progress import (
    ProgressDisplay,
    formatBytes,
    formatRate,
    formatSeconds,
    statusTable,
)

DOMAIN = "demo-vm"


class DemoRun:
    """The whole demo, step by step, printing to ``out``."""

    def __init__(
        self,
        reactor: Any,
        out: TextIO,
        sizeMiB: int = 64,
        keep: bool = False,
        devices: list[DemoDevice] | None = None,
        wholeVM: bool = True,
        realGuest: bool = True,
    ) -> None:
        self.reactor = reactor
        self.out = out
        self.keep = keep
        self.devices = devices if devices is not None else demoDevices(sizeMiB)
        self.work = ""
        self.hosts: list[DemoHost] = []
        self.legs: list[Leg] = []
        self.wholeVM = wholeVM
        self.realGuest = realGuest
        self.realGuestReport: dict[str, Any] | None = None
        self.wholeVMReport: dict[str, Any] | None = None
        self.display = ProgressDisplay(reactor, out, out.isatty(), prefix="demo")

    def say(self, text: str) -> None:
        self.display.phase(text)

    def inThread(self, function: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), function, *args
        )

    async def run(self) -> int:
        """The demo; 0 if every migration committed and verified, else 1."""
        ok = False
        try:
            await self._run()
            ok = True
        except DemoFailed as e:
            self.say(f"FAILED: {e}")
        except Exception as e:
            self.say(f"FAILED: {type(e).__name__}: {e}")
        finally:
            self.display.stop()
            for device in self.devices:
                await device.cleanup()
            await self._stopDaemons()
            self._cleanUp(ok)
        return 0 if ok else 1

    async def _run(self) -> None:
        kinds = deviceKinds()
        chosen = []
        for device in self.devices:
            why = device.available(kinds)
            if why is None:
                chosen.append(device)
            else:
                self.say(f"leaving out {device.kind}: {why}")
        if not chosen:
            raise DemoFailed("no demo device can run on this machine")
        self.devices = chosen
        self.work = tempfile.mkdtemp(prefix="xenmig-demo-")
        self.say(f"workspace {self.work}")
        await self._makeHosts()
        for device in self.devices:
            self.say(f"device {device.kind}:{device.name}: {device.description}")
        first, second = self.hosts
        for leg in (Leg(1, first, second), Leg(2, second, first)):
            self.legs.append(leg)
            await self._migrate(leg)
        if self.wholeVM:
            await self._migrateWholeVM(kinds)
        if self.realGuest:
            await self._migrateRealGuest(kinds)
        await self._daemonViews()
        self._summary()

    async def _migrateWholeVM(self, kinds: dict[str, Any]) -> None:
        """
        One VM with a QEMU, a vTPM and a disk, A->B as a toolstack drives it
        (L{xenmig.demo.wholevm}): pause through QMP, transfer, commit, resume on B.
        """
        from xenmig.demo.wholevm import missingPrograms, runScenario

        absent = [k for k in ("devmodel", "vtpm", "disk") if k not in kinds]
        missing = missingPrograms()
        if absent or missing:
            why = ", ".join([f"kind {k}" for k in absent] + missing)
            self.say(f"leaving out the whole VM: needs {why}")
            return
        source, target = self.hosts
        self.say(
            f"whole VM {source.name} -> {target.name}: a QEMU guest counting in "
            f"memory, a swtpm (PCR 16 extended), a 16 MiB disk written during "
            f"pre-copy; paused through QMP, resumed on {target.name} by "
            f"'xenmig await --resume'"
        )
        outcome, seconds = await runScenario(
            self.reactor,
            source.clientTo(self.reactor, target),
            os.path.join(source.home, "wholevm"),
            target.root,
            target.stateDir,
            domain="demo-wholevm",
        )
        for line in outcome.checks:
            self.say(f"  verified {line}")
        self.wholeVMReport = outcome.report

    async def _migrateRealGuest(self, kinds: dict[str, Any]) -> None:
        """
        A real Linux guest A->B (L{xenmig.demo.realvm}): its QEMU (with its TPM)
        and its disk, the incoming QEMU on a placeholder until the commit.
        """
        from xenmig.demo import linuxguest, realchecks
        from xenmig.demo.realvm import RealVM

        lacking = [k for k in ("devmodel", "disk") if k not in kinds]
        lacking += linuxguest.missing()
        if lacking:
            self.say(f"leaving out the real guest: needs {', '.join(lacking)}")
            return
        source, target = self.hosts
        self.say(
            f"real guest {source.name} -> {target.name}: Debian's kernel and busybox "
            f"(256 MiB, TCG), ext4 on virtio-blk with fsynced records, tpm-tis on a "
            f"swtpm; the incoming QEMU on a placeholder disk until the commit"
        )
        vm = RealVM(
            self.reactor,
            source.clientTo(self.reactor, target),
            os.path.join(source.home, "realvm"),
            target.root,
            target.stateDir,
            domain="demo-realvm",
        )
        try:
            os.makedirs(vm.home, exist_ok=True)
            guest = await vm.setUp()
            await realchecks.runsOn(guest, 20)
            self.say(f"  booted; it fsynced {guest.console.syncs[-1]} records")
            move = await vm.move(target.name)
            for line in await realchecks.verifyMoved(vm, move):
                self.say(f"  verified {line}")
        finally:
            await vm.tearDown()
        self.realGuestReport = move.report

    async def _makeHosts(self) -> None:
        self.hosts = await self.inThread(makeHosts, self.work)
        names = ", ".join(host.name for host in self.hosts)
        self.say(f"made a throwaway CA and identities for {names}")
        for host, peer in zip(self.hosts, self.hosts[::-1], strict=True):
            await host.startDaemon(self.reactor, peer)
            assert host.daemon is not None
            self.say(
                f"twistd xenmig for {host.name} on 127.0.0.1:{host.port} "
                f"(pid {host.daemon.pid}) answers over mutual TLS"
            )

    async def _migrate(self, leg: Leg) -> None:
        source, target = leg.source, leg.target
        specs = [await device.setup(self, leg) for device in self.devices]
        client = source.clientTo(self.reactor, target)
        migration = SourceMigration(client, DOMAIN, f"demo-{leg.number}-{os.getpid()}")
        leg.migrationId = migration.migrationId
        self.say(f"leg {leg.number}: {source.name} -> {target.name}, {DOMAIN}")
        restored = Deferred.fromCoroutine(self._awaitRestored(target))
        try:
            await migration.prepare(specs)
            self.display.start(migration.progress)
            rounds = await migration.precopy()  # devices that can, "VM" running
            self.display.stop()
            for name, sent in rounds.items():
                self.say(f"  {name}: pre-copy rounds of {_sizes(sent)}")
            migration.paused()  # a real toolstack pauses the VM here
            self.display.start(migration.progress, continued="final round")
            await migration.transfer()
            self.display.stop()
            installed = await migration.commit()
        except Exception:
            self.display.stop()
            restored.cancel()
            raise
        leg.report = migration.report()
        self.say(f"leg {leg.number}: committed {leg.migrationId}")
        await self._checkTarget(leg, installed, await restored)
        for device in self.devices:
            leg.checks.append(await device.verify(self, leg, installed))
            self.say(f"  verified {leg.checks[-1]}")

    async def _awaitRestored(self, host: DemoHost) -> dict[str, Any]:
        from xenmig.toolstack.localcontrol import LocalControl

        return await LocalControl(self.reactor, host.stateDir).awaitRestored(
            DOMAIN, 120.0
        )

    async def _checkTarget(
        self, leg: Leg, installed: list[str], restored: dict[str, Any]
    ) -> None:
        """The target's own view: the resume gate fired, its status agrees."""
        from xenmig.toolstack.localcontrol import LocalControl

        target = leg.target
        if restored["migration_id"] != leg.migrationId or sorted(
            restored["installed"]
        ) != sorted(installed):
            raise DemoFailed(f"AwaitRestored on {target.name} answered {restored}")
        status = await LocalControl(self.reactor, target.stateDir).query(
            leg.migrationId
        )
        digests = {d["name"]: d["digest"] for d in status["devices"]}
        sent = {d["name"]: d["digest"] for d in leg.report["devices"]}
        if status["phase"] != "COMMITTED" or digests != sent:
            raise DemoFailed(
                f"{target.name} reports {status['phase']} with digests {digests}; "
                f"the source sent {sent}"
            )
        leg.checks.append(
            f"{target.name}: AwaitRestored fired, status COMMITTED, digests agree"
        )
        self.say(f"  verified {leg.checks[-1]}")

    def _summary(self) -> None:
        rows = [("leg", "device", "bytes", "data", "time", "rate", "digest")]
        for leg in self.legs:
            for device in leg.report["devices"]:
                seconds = device["seconds"] or 0.0
                rows.append(
                    (
                        f"{leg.number} {leg.source.name}->{leg.target.name}",
                        f"{device['kind']}:{device['name']}",
                        formatBytes(device["bytes"]),
                        formatBytes(device["data_bytes"]),
                        formatSeconds(seconds),
                        formatRate(device["bytes"] / seconds if seconds else 0.0),
                        (device["digest"] or "-")[:23] + "...",
                    )
                )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        self.out.write("\nsummary\n")
        for row in rows:
            cells = (c.ljust(w) for c, w in zip(row, widths, strict=True))
            self.out.write("  " + "  ".join(cells).rstrip() + "\n")
        for leg in self.legs:
            self.out.write(
                f"  leg {leg.number}: paused window "
                f"{formatSeconds(leg.report['paused_window'])}, total "
                f"{formatSeconds(leg.report['durations']['total'])}\n"
            )
        if self.wholeVMReport is not None:
            report = self.wholeVMReport
            devices = ", ".join(f"{d['kind']}:{d['name']}" for d in report["devices"])
            self.out.write(
                f"  whole VM ({devices}): paused window "
                f"{formatSeconds(report['paused_window'])}, total "
                f"{formatSeconds(report['durations']['total'])}\n"
            )
        if self.realGuestReport is not None:
            report = self.realGuestReport
            self.out.write(
                f"  real guest (devmodel:qemu, disk:vda): paused window "
                f"{formatSeconds(report['paused_window'])}, total "
                f"{formatSeconds(report['durations']['total'])}\n"
            )
        self.out.write("all migrations committed and verified\n")
        self.out.flush()

    async def _daemonViews(self) -> None:
        """Each daemon's own list of what it received (``xenmig status``)."""
        from xenmig.toolstack.localcontrol import LocalControl

        for host in self.hosts:
            records = await LocalControl(self.reactor, host.stateDir).listMigrations()
            table = statusTable([MigrationStatus.fromJSON(r) for r in records])
            self.out.write(
                f"\n{host.name}: xenmig status --state-dir {host.stateDir}\n"
            )
            self.out.write("".join(f"  {line}\n" for line in table.splitlines()))
        self.out.flush()

    async def _stopDaemons(self) -> None:
        for host in self.hosts:
            ending = await host.stopDaemon()
            if ending is not None:
                self.say(f"the daemon of {host.name} stopped {ending}")

    def _cleanUp(self, ok: bool) -> None:
        if not self.work:
            return
        if self.keep or not ok:
            self.say(f"kept {self.work} (daemon logs in each host's directory)")
            return
        shutil.rmtree(self.work, ignore_errors=True)
        self.say(f"removed {self.work}")


async def runDemo(
    reactor: Any,
    sizeMiB: int = 64,
    keep: bool = False,
    out: TextIO | None = None,
    realGuest: bool = True,
) -> int:
    """``xenmig demo``: the exit status (0 only if everything verified)."""
    started = time.monotonic()
    demo = DemoRun(reactor, out or sys.stdout, sizeMiB, keep, realGuest=realGuest)
    code = await demo.run()
    demo.say(f"done in {formatSeconds(time.monotonic() - started)}")
    return code


def _sizes(counts: list[int]) -> str:
    return ", ".join(formatBytes(c) for c in counts) or "nothing"
