"""The counting guest in a QEMU watched from a second monitor, and its disk writes."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from xenmig.clients.qmp import JSONObject, QMPConnectionError
from xenmig.clients.qmpclient import QMPClient, connectQMP
from xenmig.demo import testguest


class ScenarioFailed(Exception):
    """The whole-VM migration did not behave as it must."""


class ObservedGuest:
    """
    The counting guest in its own QEMU with two monitors: ``qmpPath`` for xenmig
    and the toolstack, and an observer monitor held here that reads the counter
    and records the run-state events (STOP, RESUME, SHUTDOWN) with QEMU's
    timestamps.  QEMU's standard error goes to ``logPath``.
    """

    def __init__(
        self,
        reactor: Any,
        directory: str,
        name: str,
        image: str,
        incoming: bool = False,
        extra: Sequence[str] = (),
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.image = image
        self.incoming = incoming
        self.extra = list(extra)
        self.qmpPath = os.path.join(directory, f"{name}.qmp")
        self.observerPath = os.path.join(directory, f"{name}-obs.qmp")
        self.logPath = os.path.join(directory, f"{name}.log")
        self.process = testguest.GuestProcess()
        self.observer: QMPClient | None = None
        self.events: list[tuple[str, float]] = []

    def command(self) -> list[str]:
        return testguest.qemuCommand(self.image, self.qmpPath, self.incoming) + [
            "-qmp",
            f"unix:{self.observerPath},server=on,wait=off",
            *self.extra,
        ]

    async def start(self, timeout: float = 10.0) -> ObservedGuest:
        command = self.command()
        log = os.open(self.logPath, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.reactor.spawnProcess(
                self.process,
                testguest.findQEMU() or command[0],
                command,
                env=dict(os.environ),
                childFDs={0: "w", 1: "r", 2: log},
            )
        finally:
            os.close(log)
        try:
            self.observer = await self._observe(timeout)
        except BaseException:
            await self.stop()
            raise
        for name in ("STOP", "RESUME", "SHUTDOWN"):
            self.observer.onEvent(name, self._event)
        return self

    async def _observe(self, timeout: float) -> QMPClient:
        deadline = self.reactor.seconds() + timeout
        while True:
            if self.process.ended is not None:
                raise ScenarioFailed(f"QEMU {self.name} exited: {self.log()}")
            if os.path.exists(self.observerPath) and os.path.exists(self.qmpPath):
                try:
                    return await connectQMP(self.reactor, self.observerPath, 2.0)
                except QMPConnectionError:
                    pass
            if self.reactor.seconds() > deadline:
                raise ScenarioFailed(f"QEMU {self.name} did not start in {timeout} s")
            await deferLater(self.reactor, 0.02, lambda: None)

    def _event(self, event: JSONObject) -> None:
        self.events.append((event["event"], _seconds(event)))

    def log(self) -> str:
        """What QEMU wrote on its standard error (blocking; a small file)."""
        try:
            with open(self.logPath, errors="replace") as f:
                return " | ".join(line.strip() for line in f if line.strip())
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.process.ended is None

    def dirtyBitmaps(self) -> Deferred[list[str]]:
        """The names of the dirty bitmaps on QEMU's block nodes."""
        assert self.observer is not None
        return self.observer.execute(
            "query-named-block-nodes", {"flat": True}
        ).addCallback(
            lambda nodes: [b["name"] for n in nodes for b in n.get("dirty-bitmaps", [])]
        )

    def readCounter(self) -> Deferred[int]:
        assert self.observer is not None
        return testguest.readCounter(self.observer)

    def status(self) -> Deferred[str]:
        assert self.observer is not None
        return self.observer.queryStatus()

    def first(self, name: str, after: float = 0.0) -> float | None:
        """The time of the first ``name`` event after ``after``, if any."""
        return next((t for n, t in self.events if n == name and t > after), None)

    async def countsPast(self, value: int, timeout: float = 5.0) -> int:
        """Wait until the counter is above ``value``; the counter then."""
        deadline = self.reactor.seconds() + timeout
        while True:
            counter = await self.readCounter()
            if counter > value:
                return counter
            if self.reactor.seconds() > deadline:
                raise ScenarioFailed(
                    f"the counter of QEMU {self.name} stays at {counter} (not past "
                    f"{value} in {timeout:g} s): the guest does not run"
                )
            await deferLater(self.reactor, 0.02, lambda: None)

    async def whenEnded(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` for QEMU to exit; whether it did."""
        deadline = self.reactor.seconds() + timeout
        while self.running and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.02, lambda: None)
        return not self.running

    async def stop(self) -> None:
        """Hang up the observer and end QEMU (SIGTERM, then SIGKILL)."""
        if self.observer is not None:
            await self.observer.close()
        await testguest.terminate(self.reactor, self.process)


class GuestWriter:
    """
    The guest's disk writes, through QEMU's block layer: 4 KiB at a random
    place of the disk (QEMU's block node ``node``, ``size`` bytes) every 2 ms
    (HMP ``qemu-io`` on the observer monitor), so that QEMU's dirty bitmap
    records them as it would a guest's.
    """

    def __init__(
        self, reactor: Any, guest: ObservedGuest, node: str, size: int
    ) -> None:
        self.reactor = reactor
        self.guest = guest
        self.node = node
        self.size = size
        self.writes = 0
        self._stopping = False
        self._loop: Deferred[None] | None = None

    async def start(self) -> None:
        """Start writing; return after the first write."""
        await self._write()
        self._loop = Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        while not self._stopping:
            await deferLater(self.reactor, 0.002, lambda: None)
            await self._write()

    async def _write(self) -> None:
        assert self.guest.observer is not None
        offset = random.randrange(self.size // 4096) * 4096
        await testguest.writeThroughQEMU(
            self.guest.observer, self.node, offset, 4096, self.writes % 251
        )
        self.writes += 1

    async def stop(self) -> None:
        """Stop writing; return once the last write is done."""
        self._stopping = True
        if self._loop is not None:
            loop, self._loop = self._loop, None
            try:
                await loop
            except Exception as e:
                raise ScenarioFailed(f"a guest write through QEMU failed: {e}")


def _seconds(event: JSONObject) -> float:
    stamp = event.get("timestamp", {})
    return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
