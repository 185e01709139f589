"""What moving a real Linux guest must guarantee, checked on what was observed."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from xenmig.demo import linuxguest
from xenmig.demo.observedguest import ScenarioFailed
from xenmig.demo.realvm import LinuxQEMU, Move, RealVM


class Checks:
    """One line per guarantee that held; the first broken one raises."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def check(self, ok: Any, line: str, problem: str) -> None:
        if not ok:
            raise ScenarioFailed(problem)
        self.lines.append(line)


def _inThread(reactor: Any, function: Any, *args: Any) -> Deferred[Any]:
    return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)


async def runsOn(guest: LinuxQEMU, more: int = 20, timeout: float = 60) -> int:
    """Wait until ``guest`` fsynced ``more`` further records; the last one."""
    await guest.says("SYNC", timeout, count=len(guest.console.syncs) + more)
    return guest.console.syncs[-1]


async def checkDisk(reactor: Any, checks: Checks, image: str, last: int) -> None:
    """Every record up to ``last`` is on ``image``, in order; e2fsck finds it clean."""
    try:
        records = await _inThread(reactor, linuxguest.readRecords, image)
    except ValueError as e:
        raise ScenarioFailed(str(e))
    checks.check(
        records == list(range(1, len(records) + 1)) and records[-1] >= last,
        f"the disk holds records 1 to {records[-1]} in order, each intact; the guest "
        f"had fsynced up to {last}",
        f"{image} holds records {records[:3]}...{records[-3:]}, not 1 to {last} "
        f"in order",
    )
    code, words = await _inThread(reactor, linuxguest.fsck, image)
    checks.check(code == 0, "e2fsck -fn finds the filesystem clean", words)


async def verifyMoved(vm: RealVM, move: Move) -> list[str]:
    """
    After a committed move: the guest goes on at the target from where it was,
    its PCR reads the same, exactly one QEMU ran it, and after a clean shutdown
    every record it fsynced is on the target's image, which ``e2fsck`` finds
    clean.  One line per check.

    @raise ScenarioFailed: naming the first guarantee broken.
    """
    source, target = vm.source, move.target
    assert source is not None and target is not None
    checks = Checks()
    checks.check(move.committed, "the migration committed", move.reason)
    await runsOn(target)
    last, after = source.console.syncs[-1], target.console.syncs[0]
    # the VM may pause while the guest says a line: its start is on the source's
    # console, its end on the target's
    spanned = source.console.continuedOn(target.console)
    before = spanned if spanned == last + 1 else last
    checks.check(
        after == before + 1 and move.syncAtPause == last,
        f"the guest goes on at the target from where it was: record {after} after "
        f"{before}" + (" (its line said across the move)" if before != last else ""),
        f"the target's first record is {after}, the source's last {last} (at the "
        f"pause {move.syncAtPause}; the source's console ended with "
        f"{source.console.partial!r}, the target's began with "
        f"{target.console.first!r})",
    )
    pcr = (await target.says("PCR16", 60))[0]
    checks.check(
        pcr == move.pcrBefore and pcr != "0" * 64,
        f"PCR 16, extended in the guest, reads the same there after the move "
        f"({pcr[:16]}...)",
        f"PCR 16 reads {pcr} after the move, {move.pcrBefore} before",
    )
    stopped, resumed = source.first("STOP"), target.first("RESUME")
    checks.check(
        stopped is not None
        and resumed is not None
        and resumed > stopped
        and source.first("RESUME", stopped) is None
        and await source.whenEnded(),
        "exactly one QEMU ran the guest: the target resumed after the source "
        "stopped, and the source never ran again and exited",
        f"the source stopped at {stopped} (running: {source.running}), the target "
        f"resumed at {resumed}",
    )
    checks.check(
        move.awaited.get("resumed") and move.awaited.get("exit_status") == 0,
        "xenmig await --resume resumed it on the target",
        f"xenmig await answered {move.awaited}",
    )
    last = await vm.shutDown(target)
    await checkDisk(vm.reactor, checks, vm.targetImage(move.tag), last)
    return checks.lines
