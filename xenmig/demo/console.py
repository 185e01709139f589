"""
A real guest's serial console, as the scenarios read it: the ``XM`` lines the
guest's script says (its fsynced records, PCR values, memory rewrites), and a
way to type on it.
"""

from __future__ import annotations

import re
import time
from collections import deque
from typing import Any

from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineOnlyReceiver

from xenmig.demo.observedguest import ScenarioFailed


class Console(LineOnlyReceiver):
    """A guest's serial console: the ``XM`` lines it says, and a way to type."""

    delimiter = b"\n"
    MAX_LENGTH = 65536

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.syncs: list[int] = []
        self.closed = False
        #: What came after the last end of line (a line the guest had begun).
        self.partial = b""
        #: The first line, whatever it says (the end of a line begun elsewhere).
        self.first: str | None = None
        #: The last lines, whatever they say (a kernel's last words).
        self.tail: deque[str] = deque(maxlen=30)
        #: When the guest said it rewrote its RAM (``time.monotonic()``).
        self.dirtied: list[float] = []

    def dataReceived(self, data: bytes) -> None:
        _, ended, rest = data.rpartition(self.delimiter)
        self.partial = rest if ended else self.partial + rest
        super().dataReceived(data)

    def continuedOn(self, other: Console) -> int | None:
        """
        The record whose ``XM SYNC`` line the guest began here and ended on
        ``other``'s console (the VM paused in the middle of it), if any.
        """
        if not self.partial:
            return None
        joined = (self.partial.decode(errors="replace") + (other.first or "")).strip()
        at = joined.find("XM ")
        number = re.fullmatch(r"XM SYNC (\d+)", joined[at:]) if at >= 0 else None
        return int(number[1]) if number else None

    def lineReceived(self, line: bytes) -> None:
        text = line.decode(errors="replace").strip()
        if self.first is None:
            self.first = text
        self.tail.append(text)
        at = text.find("XM ")
        if at < 0:
            return
        text = text[at:]
        if text.startswith("XM DIRTY "):
            self.dirtied.append(time.monotonic())
            return
        self.lines.append(text)
        number = re.match(r"XM SYNC (\d+)", text)  # typed input may echo after it
        if number:
            self.syncs.append(int(number[1]))

    def dirtyRate(self, mib: int) -> float:
        """The MiB per second the guest rewrote (``mib`` each time), so far."""
        times = self.dirtied
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) * mib / (times[-1] - times[0])

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True

    async def whenClosed(self, reactor: Any, timeout: float) -> None:
        """Wait until the console's connection closed, at most ``timeout`` s."""
        deadline = reactor.seconds() + timeout
        while not self.closed and reactor.seconds() < deadline:
            await deferLater(reactor, 0.02, lambda: None)
        self.closed = True  # nothing more will come

    def reread(self, path: str) -> None:
        """Blocking (a small file): take every line again from QEMU's log of it."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return
        self.lines, self.syncs, self.dirtied = [], [], []
        for line in data.split(self.delimiter):
            self.lineReceived(line)

    def said(self, word: str) -> list[str]:
        """What followed ``XM word`` in each line that said it."""
        prefix = f"XM {word}"
        return [
            line[len(prefix) :].strip()
            for line in self.lines
            if line == prefix or line.startswith(prefix + " ")
        ]


async def connectConsole(reactor: Any, path: str, console: Console) -> None:
    """Connect ``console`` to a QEMU's serial socket at ``path``."""
    try:
        await connectProtocol(UNIXClientEndpoint(reactor, path), console)
    except ConnectError as e:
        raise ScenarioFailed(f"cannot connect to the console {path}: {e}")
