"""
What the operator sees: progress bars or phase lines, sizes, rates, a
migration's summary, status tables.

Standard library only (Twisted's LoopingCall is imported when the bars
start): ``xenmig migrate --via-daemon`` draws with it.
"""

from __future__ import annotations

import json as _json
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from xenmig.model import DeviceProgress, MigrationStatus

#: ``(device, bytes done, bytes expected)`` for every device of a migration.
Snapshot = Sequence[tuple[str, int, int]]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def formatBytes(count: float) -> str:
    """``67108864`` -> ``"64.0 MiB"``."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def formatRate(bytesPerSecond: float) -> str:
    """``1.5e6`` -> ``"1.4 MiB/s"``."""
    return formatBytes(bytesPerSecond) + "/s"


def formatSeconds(seconds: float | None) -> str:
    """``0.123`` -> ``"0.12 s"``; ``95`` -> ``"1:35"``; None -> ``"-"``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes}:{rest:02d}"


class RateMeter:
    """
    A device's transfer rate over the last few seconds of samples; once the
    device is complete, its average rate from the first sample on (until it
    sends again, as a disk does in its next pre-copy round: then the recent
    rate again).
    """

    def __init__(self, window: float = 3.0) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()
        self.start: tuple[float, int] | None = None
        self.final: float | None = None
        self.again = False

    def sample(self, now: float, done: int, expected: int = 0) -> float:
        """Record ``done`` of ``expected`` bytes at ``now``; bytes per second."""
        if self.final is not None:
            if done == self.samples[-1][1]:
                return self.final
            self.final, self.again = None, True
        if self.start is None:
            self.start = (now, done)
        self.samples.append((now, done))
        if expected and done >= expected and now > self.start[0] and not self.again:
            self.final = (done - self.start[1]) / (now - self.start[0])
            return self.final
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        first, last = self.samples[0], self.samples[-1]
        elapsed = last[0] - first[0]
        return (last[1] - first[1]) / elapsed if elapsed > 0 else 0.0


class ProgressDisplay:
    """
    Shows a migration's progress on ``stream``.

    On a terminal (``bars=True``): one line per device (a bar, bytes done of
    expected, rate, ETA), redrawn in place every ``interval`` seconds by a
    LoopingCall on the injected ``reactor``, each fitted to the terminal's
    width (``width``, else asked at each redraw).  Otherwise only the phase
    lines.  Phase lines (L{phase}) are printed in both cases, above the bars.
    """

    def __init__(
        self,
        reactor: Any,
        stream: TextIO,
        bars: bool,
        prefix: str = "xenmig",
        interval: float = 0.2,
        width: int | None = None,
    ) -> None:
        self.reactor = reactor
        self.stream = stream
        self.bars = bars
        self.prefix = prefix
        self.interval = interval
        self.width = width
        self.source: Callable[[], Snapshot] | None = None
        self._meters: dict[str, RateMeter] = {}
        self._before: dict[str, int] = {}
        self._continued = ""
        self._drawn = 0
        self._loop: Any = None

    def phase(self, message: str) -> None:
        """Print one line about the migration (above the bars, if any)."""
        self._erase()
        self.stream.write(f"{self.prefix}: {message}\n")
        self.stream.flush()
        if self._loop is not None:
            self.redraw()

    def start(self, source: Callable[[], Snapshot], continued: str = "") -> None:
        """
        Start redrawing the bars of ``source`` (on a terminal only).  A device
        that has already sent bytes (its pre-copy rounds, before the final
        one) shows what it sends from now on, labelled ``continued``, without
        a size or an ETA: how much is left to send is not known.
        """
        self.follow(source, continued)
        if not self.bars or self._loop is not None:
            return
        from twisted.internet.task import LoopingCall

        self._loop = LoopingCall(self.redraw)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def follow(self, source: Callable[[], Snapshot], continued: str = "") -> None:
        """
        Show ``source`` from now on (as L{start} does), redrawn by whoever calls
        L{redraw}: the command line following a daemon's progress events.
        """
        self.source = source
        self._meters = {}
        self._before = {name: done for name, done, _ in source()}
        self._continued = continued or "since then"

    def stop(self) -> None:
        """Draw the bars a last time and leave them on the screen."""
        if self._loop is None:
            return
        self._loop.stop()
        self._loop = None
        self.leave()

    def leave(self) -> None:
        """Draw the bars a last time and leave them above what comes next."""
        self.redraw()
        self._drawn = 0

    def redraw(self) -> None:
        """Draw every device's line in place of the previous ones."""
        if self.source is None:
            return
        width = self.width or shutil.get_terminal_size().columns
        lines = self.lines(self.source(), self.reactor.seconds(), width)
        self._erase()
        for line in lines:
            self.stream.write(line[: max(width - 1, 20)] + "\n")
        self.stream.flush()
        self._drawn = len(lines)

    def lines(self, snapshot: Snapshot, now: float, width: int = 0) -> list[str]:
        """The text of each device's bar at ``now``, in ``width`` columns (0: any)."""
        return _layout([self._row(*device, now) for device in snapshot], width)

    def _row(
        self, name: str, done: int, expected: int, now: float
    ) -> tuple[str, float | None, str]:
        """A device's name, fraction done (None: no bar) and figures."""
        meter = self._meters.setdefault(name, RateMeter())
        before = self._before.get(name, 0)
        if before:
            rate = meter.sample(now, done - before)
            sent = f"{formatBytes(done - before)} sent {formatRate(rate)}"
            return name, None, f"{self._continued}: {sent}"
        rate = meter.sample(now, done, expected)
        fraction = min(done / expected, 1.0) if expected else (1.0 if done else 0.0)
        eta = (expected - done) / rate if rate > 0 and expected > done else None
        figures = (
            f"{fraction:4.0%} {formatBytes(done)} / {formatBytes(expected)} "
            f"{formatRate(rate)}"
            + (f"  ETA {formatSeconds(eta)}" if eta is not None else "")
        )
        return name, fraction, figures

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}A\x1b[J")
            self._drawn = 0


#: The widest a bar gets, and the narrowest worth drawing.
_BAR, _NARROWEST_BAR = 20, 5


def _layout(rows: list[tuple[str, float | None, str]], width: int) -> list[str]:
    """
    ``  NAME [####....] FIGURES`` for each device, in ``width - 1`` columns
    (any if 0), every bar as wide: where they do not fit, the bars narrow,
    then go, then the names are cut, and only then the figures.
    """
    room = width - 1 if width else 1 << 16
    names = max((len(name) for name, _, _ in rows), default=0)
    figures = max((len(text) for _, _, text in rows), default=0)
    plain = 2 + names + 1 + figures
    bar = min(_BAR, room - plain - 3)
    bar = bar if bar >= _NARROWEST_BAR else 0
    if not bar and plain > room:
        names = max(room - figures - 3, 1)
    lines = []
    for name, fraction, text in rows:
        if len(name) > names:
            name = name[: names - 1] + "~"
        drawn = ""
        if bar and fraction is not None:
            filled = int(fraction * bar)
            drawn = f"[{'#' * filled}{'.' * (bar - filled)}] "
        lines.append(f"  {name.ljust(names)} {drawn}{text}"[:room])
    return lines


# -- a migration's report ----------------------------------------------------------


def summary(report: dict[str, Any]) -> str:
    """A committed migration in a few lines: devices, bytes, time, rate, digest."""
    durations = report["durations"]
    lines = [
        f"committed migration {report['migration_id']} of {report['domain']} to "
        f"{report.get('target', 'the target')} in {formatSeconds(durations['total'])}"
        f" (paused window {formatSeconds(report['paused_window'])})"
    ]
    if report.get("downtime"):
        lines.append("  " + downtimeLine(report["downtime"]))
    if report.get("bandwidth_limit"):
        lines.append(f"  bandwidth limit {formatRate(report['bandwidth_limit'])}")
    for device in report["devices"]:
        seconds = device["seconds"] or 0.0
        rate = device["bytes"] / seconds if seconds else 0.0
        lines.append(
            f"  {device['kind']}:{device['name']}  {formatBytes(device['bytes'])} "
            f"({formatBytes(device['data_bytes'])} of data) in "
            f"{formatSeconds(seconds)}, {formatRate(rate)}, {device['digest']}"
        )
    again = report.get("reconnections") or {}
    if again.get("control") or again.get("streams"):
        lines.append(
            f"  survived {again.get('streams', 0)} broken stream(s) and "
            f"{again.get('control', 0)} lost control connection(s); "
            f"{formatBytes(again.get('resent_bytes', 0))} sent again"
        )
    lines += [f"  installed {path}" for path in report["installed"]]
    return "\n".join(lines)


def ramRound(name: str, number: int, figure: dict[str, Any]) -> str:
    """One RAM pre-copy round for the display: sent, left, the guest's dirty rate."""
    return (
        f"  {name} RAM round {number}: {formatBytes(figure['stream_bytes'])} sent, "
        f"{formatBytes(figure['ram_remaining'])} left, guest dirtying "
        f"{formatRate(figure['dirty_bytes_rate'])}"
        + (" (QEMU stopped the VM)" if figure.get("vm_stopped") else "")
    )


def downtimeLine(downtime: dict[str, Any]) -> str:
    """The maximum downtime, the final round's estimate and, once known, the window."""
    line = (
        f"final round estimated at {formatSeconds(downtime['estimate'])} "
        f"(max downtime {formatSeconds(downtime['limit'])})"
    )
    if downtime["exceeded"]:
        line += ": over it after the last round allowed, paused anyway"
    if downtime["paused_window"] is not None:
        line += f"; paused window {formatSeconds(downtime['paused_window'])}"
    return line


def printOutcome(json: bool, code: int, report: dict[str, Any], out: TextIO) -> None:
    """
    What ``xenmig migrate`` prints on stdout at its end: the report as JSON
    (``json``), else a committed migration's summary (nothing otherwise).
    """
    if json:
        out.write(_json.dumps(report, indent=2) + "\n")
    elif code == 0:
        out.write(summary(report) + "\n")
    out.flush()


# -- status tables ---------------------------------------------------------------------


def _when(timestamp: float) -> str:
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def statusTable(migrations: Sequence[MigrationStatus]) -> str:
    """
    A table of migrations, one line per device: id, domain, phase, peer, device,
    bytes received / the device's size, rate and reason.  (Pre-copy rounds send
    changed blocks again, so a disk may receive more than its size; a device
    model's size is its RAM, of which only the pages in use travel.)
    """
    header = (
        "MIGRATION",
        "DOMAIN",
        "PHASE",
        "PEER",
        "DEVICE",
        "RECEIVED / SIZE",
        "RATE",
        "ETA",
    )
    rows: list[tuple[str, ...]] = []
    for status in migrations:
        devices = status.devices or ()
        first = (status.migrationId, status.domain, status.phase, status.peer or "-")
        blank = ("", "", "", "")
        if not devices:
            rows.append((*first, "-", "-", "-", "-", status.reason))
        for index, device in enumerate(devices):
            rows.append(
                (
                    *(first if index == 0 else blank),
                    f"{device.kind}:{device.name}",
                    f"{formatBytes(device.bytesDone)} / "
                    f"{formatBytes(device.bytesExpected)}",
                    formatRate(device.rate),
                    _eta(device),
                    (status.reason if index == 0 else "") or device.reason,
                )
            )
    widths = [
        max([len(header[i])] + [len(row[i]) for row in rows])
        for i in range(len(header))
    ]
    cells = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    lines = [cells + "  REASON"]
    for row in rows:
        cells = "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True))
        lines.append((cells + "  " + row[-1]).rstrip())
    if not migrations:
        lines.append("(no migrations)")
    return "\n".join(lines)


def _eta(device: DeviceProgress) -> str:
    """The time left for a device still receiving, at its rate so far."""
    left = device.bytesExpected - device.bytesDone
    if device.state != "RECEIVING" or device.rate <= 0 or left <= 0:
        return "-"
    return formatSeconds(left / device.rate)


def statusDetail(status: MigrationStatus) -> str:
    """One migration in detail: every field, every device with its digest."""
    lines = [
        f"migration  {status.migrationId}",
        f"domain     {status.domain}",
        f"phase      {status.phase}",
        f"peer       {status.peer or '-'}",
        f"started    {_when(status.started)}",
        f"updated    {_when(status.updated)}",
    ]
    if status.reason:
        lines.append(f"reason     {status.reason}")
    for path in status.installed:
        lines.append(f"installed  {path}")
    for device in status.devices:
        lines.append(f"device     {device.kind}:{device.name}  {device.state}")
        lines.append(
            f"  received {formatBytes(device.bytesDone)} of a "
            f"{formatBytes(device.bytesExpected)} device  ({device.bytesDone} / "
            f"{device.bytesExpected} bytes)  {formatRate(device.rate)}"
            + (f"  ETA {_eta(device)}" if _eta(device) != "-" else "")
        )
        if device.digest:
            lines.append(f"  digest   {device.digest}")
        if device.reason:
            lines.append(f"  reason   {device.reason}")
    return "\n".join(lines)
