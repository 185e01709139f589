"""What a whole-VM migration must guarantee, checked on what was observed of it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from xenmig.demo.observedguest import ObservedGuest, ScenarioFailed


@dataclass
class Outcome:
    """What one whole-VM migration did, as the toolstack and the observers saw it."""

    migrationId: str
    committed: bool = False
    reason: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    counterAtPause: int = 0
    counterLoaded: int | None = None
    counterAfter: int = 0
    pcr: str = ""
    pcrAfter: str = ""
    diskBefore: str = ""
    diskAtPause: str = ""
    diskInstalled: str = ""
    diskAttached: str = ""
    writeAfterLanded: bool = False
    bitmapsAfter: list[str] = field(default_factory=list)
    awaited: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)


def verifyOutcome(
    outcome: Outcome,
    source: ObservedGuest,
    target: ObservedGuest,
    sourceTPM: Any,
    diskTarget: str,
) -> list[str]:
    """
    Check the outcome against what a whole-VM migration must guarantee, from
    what the two guests' observers saw, the source's swtpm and the target's disk
    image (at ``diskTarget``); one line per check.

    @raise ScenarioFailed: naming the first guarantee broken.
    """
    checks = outcome.checks

    def check(ok: bool, line: str, problem: str) -> None:
        if not ok:
            raise ScenarioFailed(problem)
        checks.append(line)

    stopped = source.first("STOP")
    check(stopped is not None, "the source VM was paused", "the source never stopped")
    assert stopped is not None
    check(
        outcome.diskBefore != outcome.diskAtPause,
        "the disk changed during pre-copy (QEMU wrote it)",
        "QEMU did not change the disk during pre-copy",
    )
    if outcome.committed:
        _verifyCommitted(outcome, check, stopped, source, target, diskTarget)
    else:
        _verifyAborted(outcome, check, stopped, source, target, sourceTPM, diskTarget)
    return checks


def _verifyCommitted(
    outcome: Outcome,
    check: Any,
    stopped: float,
    source: ObservedGuest,
    target: ObservedGuest,
    diskTarget: str,
) -> None:
    resumed = target.first("RESUME")
    check(
        resumed is not None and resumed > stopped,
        "exactly one copy ran: the target resumed after the source stopped",
        f"the target QEMU resumed at {resumed}, the source stopped at {stopped}",
    )
    check(
        source.first("RESUME", stopped) is None and not source.running,
        "the source QEMU never ran again and was released (it exited)",
        "the source QEMU ran again or still exists after the commit",
    )
    check(
        outcome.counterLoaded == outcome.counterAtPause,
        f"the target loaded counter {outcome.counterLoaded}, the source's at its pause",
        f"the target loaded counter {outcome.counterLoaded}, the source "
        f"stopped at {outcome.counterAtPause}",
    )
    check(
        outcome.counterAfter > outcome.counterAtPause,
        f"the guest keeps counting on the target ({outcome.counterAfter})",
        "the guest does not count on the target",
    )
    check(
        outcome.pcrAfter == outcome.pcr,
        "the target's TPM has the source's PCR 16 (resumed, no Startup)",
        f"PCR 16 on the target is {outcome.pcrAfter!r}, not {outcome.pcr!r}",
    )
    check(
        outcome.diskInstalled == outcome.diskAtPause,
        "the target's disk is the source's disk at its pause",
        f"the target's disk is {outcome.diskInstalled}, the source's at the "
        f"pause {outcome.diskAtPause}",
    )
    check(
        outcome.diskAttached == diskTarget and outcome.writeAfterLanded,
        "the target QEMU runs on the installed image (a write after resume is there)",
        f"the target QEMU's disk node opens {outcome.diskAttached!r}, not "
        f"{diskTarget}, or a write after resume is not in it",
    )
    check(
        outcome.awaited.get("committed") and outcome.awaited.get("resumed"),
        "xenmig await --resume resumed the VM on the target after the commit",
        f"xenmig await answered {outcome.awaited}",
    )
    check(
        outcome.report.get("paused_window") is not None,
        f"paused window {outcome.report.get('paused_window')} s",
        "the report has no paused window",
    )


def _verifyAborted(
    outcome: Outcome,
    check: Any,
    stopped: float,
    source: ObservedGuest,
    target: ObservedGuest,
    sourceTPM: Any,
    diskTarget: str,
) -> None:
    check(
        target.first("RESUME") is None and not target.running,
        "the target QEMU never ran and is gone",
        "the target QEMU ran, or still exists, after the abort",
    )
    check(
        source.first("RESUME", stopped) is not None
        and outcome.counterAfter > outcome.counterAtPause,
        f"the source VM resumed and counts on ({outcome.counterAfter})",
        "the source VM did not resume",
    )
    check(
        outcome.pcrAfter == outcome.pcr and sourceTPM.running,
        "the source TPM still runs with its PCR 16",
        "the source TPM lost its state",
    )
    check(
        not os.path.exists(diskTarget),
        "nothing was installed on the target",
        f"{diskTarget} exists after the abort",
    )
    check(
        not outcome.bitmapsAfter,
        "the source QEMU keeps no dirty bitmap of the migration",
        f"the source QEMU still has dirty bitmaps {outcome.bitmapsAfter}",
    )
    check(
        outcome.awaited.get("committed") is False,
        "xenmig await on the target reported the abort",
        f"xenmig await answered {outcome.awaited}",
    )
