"""
The paused window of a whole-VM migration, step by step, on one clock.

``bench_wholevm.py`` collects marks from three places, all in wall-clock
seconds on this host: QEMU's events on each QEMU's observer monitor (``STOP``,
``RESUME`` and, with the ``events`` capability on, ``MIGRATION`` status
changes), the log of the process that drives the migration (the source), and
the target daemon's JSON log at debug level.  L{Timeline.window} gives the
marks from the source's ``STOP`` to the target's ``RESUME``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import implementer

#: Marks of the source's log worth showing (the rest is noise in the window).
SOURCE_WORDS = (
    "->",
    "round",
    "final state",
    "verified",
    "devmodel",
    "stopped",
    "resumed",
    "QEMU quit",
)


@dataclass
class Timeline:
    """Marks ``(seconds, side, what)`` of one migration."""

    marks: list[tuple[float, str, str]] = field(default_factory=list)
    _stop: list[Callable[[], None]] = field(default_factory=list)

    def add(self, when: float, side: str, what: str) -> None:
        self.marks.append((when, side, what))

    def observeLog(self) -> None:
        """Record this process's xenmig log events (its source side)."""

        @implementer(ILogObserver)
        def observer(event: dict[str, Any]) -> None:
            if not str(event.get("log_namespace", "")).startswith("xenmig"):
                return
            text = formatEvent(event)
            if any(word in text for word in SOURCE_WORDS):
                self.add(float(event["log_time"]), "source", text)

        globalLogPublisher.addObserver(observer)
        self._stop.append(lambda: globalLogPublisher.removeObserver(observer))

    async def observeQEMU(self, guest: Any, side: str) -> None:
        """Record ``guest``'s run-state and migration events (QEMU's timestamps)."""
        observer = guest.observer
        await observer.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "events", "state": True}]},
        )

        def event(message: dict[str, Any]) -> None:
            stamp = message.get("timestamp", {})
            when = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
            name = message["event"]
            if name == "MIGRATION":
                name = f"QEMU migration: {message['data']['status']}"
            else:
                name = f"QEMU {name}"
            self.add(when, side, name)

        for name in ("STOP", "RESUME", "MIGRATION"):
            self._stop.append(observer.onEvent(name, event))

    def readDaemonLog(self, path: Path, migrationId: str) -> None:
        """Blocking: take the daemon's JSON log lines about this migration."""
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                when = datetime.fromisoformat(record["time"]).timestamp()
            except (ValueError, KeyError, TypeError):
                continue
            text = str(record.get("text", ""))
            if record.get("migration_id") in (None, migrationId):
                self.add(when, "target", text)

    def close(self) -> None:
        for stop in self._stop:
            stop()
        self._stop.clear()

    def first(self, side: str, what: str, after: float = 0.0) -> float | None:
        return min(
            (t for t, s, w in self.marks if s == side and w == what and t >= after),
            default=None,
        )

    def window(self) -> tuple[float, float, list[tuple[float, str, str]]] | None:
        """The source's STOP, the target's RESUME after it, and the marks between."""
        stop = self.first("source", "QEMU STOP")
        if stop is None:
            return None
        resume = self.first("target", "QEMU RESUME", stop)
        if resume is None:
            return None
        inside = sorted(m for m in self.marks if stop - 0.001 <= m[0] <= resume + 0.001)
        return stop, resume, inside

    def render(self) -> str:
        window = self.window()
        if window is None:
            return "  (no STOP on the source, or no RESUME on the target after it)"
        stop, resume, inside = window
        lines = [f"  paused {resume - stop:.3f} s (source STOP -> target RESUME)"]
        previous = stop
        for when, side, what in inside:
            lines.append(
                f"  {(when - stop) * 1000:8.1f} ms (+{(when - previous) * 1000:6.1f})"
                f"  {side:6}  {what[:110]}"
            )
            previous = when
        return "\n".join(lines)
