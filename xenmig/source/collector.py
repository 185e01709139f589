"""
Python's cyclic garbage collector held off while a migration's VM is paused.

A full collection stops the whole process while it walks every object the
collector tracks.  In a toolstack's process that is tens of milliseconds
(20-65 ms measured on the bench machine, with some 50,000 objects), and the
allocations of a switch-over (QEMU's last passes relayed, every device's final
round) trigger one often enough that it landed in the paused window of every
real-guest run of ``bench/bench_wholevm.py``: as long again as the rest of the
window.  xenmig's own processes move what they imported out of the
collector's sight at start (L{xenmig.tuning.tuneAllocator}); a library cannot
do that to its caller's heap, but it can keep the collector from starting
while the VM waits.

The hold is short and bounded: from the pause to the migration's end, at most
L{HOLD_LIMIT} seconds each.  Meanwhile only objects in reference cycles wait to
be freed (reference counting frees the rest, the data path's buffers
included).  Holds of migrations running at once in one process nest: the
collector runs again once none holds it.  A collector its process disabled
itself stays as it was.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet.interfaces import IDelayedCall

#: The longest one migration holds the collector off (seconds): a paused
#: window that lasts longer (a large final round) lets it run again.
HOLD_LIMIT = 5.0

#: How many holds are on now, and whether the collector was on when the
#: first of them began (only then do the holds turn it back on).
_holds = 0
_wasEnabled = False


def holding() -> int:
    """How many holds keep the collector off now."""
    return _holds


class CollectorHold:
    """
    One migration's hold on the garbage collector: L{hold} at the pause,
    L{release} at its end (or after ``limit`` seconds on ``reactor``'s clock,
    whichever comes first).  Both may be called any number of times.
    """

    def __init__(self, reactor: Any, limit: float = HOLD_LIMIT) -> None:
        self.reactor = reactor
        self.limit = limit
        self._timer: IDelayedCall | None = None

    @property
    def held(self) -> bool:
        return self._timer is not None

    def hold(self) -> None:
        global _holds, _wasEnabled
        if self._timer is not None or self.limit <= 0:
            return
        if _holds == 0:
            _wasEnabled = gc.isenabled()
            gc.disable()
        _holds += 1
        self._timer = self.reactor.callLater(self.limit, self.release)

    def release(self) -> None:
        global _holds
        timer, self._timer = self._timer, None
        if timer is None:
            return
        if timer.active():
            timer.cancel()
        _holds -= 1
        if _holds == 0 and _wasEnabled:
            gc.enable()
