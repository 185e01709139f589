"""The ``devmodel`` kind's live RAM: QEMU's own pre-copy into the device's stream."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger

from xenmig.clients.qmp import QEMUMigrationFailed, QMPError
from xenmig.clients.qmpclient import UNLIMITED_BANDWIDTH, QMPClient
from xenmig.devices.devmodel.reader import StateReader
from xenmig.interfaces import IRecordWriter
from xenmig.model import RoundResult

log = Logger()

#: ``query-migrate`` statuses once QEMU has stopped the VM (its switch-over).
SWITCHING = frozenset({"pre-switchover", "device", "completed"})
#: ``query-migrate`` statuses of a migration that ended without completing.
FAILED = frozenset({"failed", "cancelled"})
#: Seconds between two ``query-migrate`` while a round or the switch-over runs.
POLL = 0.01
CAPABILITY = "pause-before-switchover"


@dataclass
class RoundFigures:
    """What QEMU said at the end of one pre-copy round (for the report)."""

    status: str
    transferred: int
    remaining: int
    dirtyRate: int  # pages per second, as QEMU measured it
    syncs: int
    pageSize: int
    downtime: int | None = None  # milliseconds, once completed

    @classmethod
    def fromQuery(cls, info: dict[str, Any]) -> RoundFigures:
        ram = info.get("ram", {})
        return cls(
            status=str(info.get("status", "")),
            transferred=int(ram.get("transferred", 0)),
            remaining=int(ram.get("remaining", 0)),
            dirtyRate=int(ram.get("dirty-pages-rate", 0)),
            syncs=int(ram.get("dirty-sync-count", 0)),
            pageSize=int(ram.get("page-size", 4096)) or 4096,
            downtime=info.get("downtime"),
        )

    @property
    def switching(self) -> bool:
        """QEMU has stopped the VM for its switch-over."""
        return self.status in SWITCHING

    def asReport(self, sent: int) -> dict[str, Any]:
        return {
            "stream_bytes": sent,
            "ram_transferred": self.transferred,
            "ram_remaining": self.remaining,
            "dirty_pages_rate": self.dirtyRate,
            "dirty_bytes_rate": self.dirtyRate * self.pageSize,
            "dirty_sync_count": self.syncs,
            "qemu_status": self.status,
            # QEMU stopped the VM for its switch-over: the paused window began.
            "vm_stopped": self.switching,
        }


@dataclass
class LiveRAM:
    """
    One QEMU migration that runs through xenmig's pre-copy: started at round 0
    (``pause-before-switchover`` on, so QEMU waits at ``pre-switchover`` before
    it sends the device state), relayed into the device's stream by a
    L{StateReader} that lives across the rounds, and finished in the paused
    window (``migrate-continue``).  A round lasts one pass of QEMU over the
    guest's dirty memory (``dirty-sync-count`` advances) or until QEMU stops
    the VM for its switch-over.
    """

    reactor: Any
    name: str
    reader: StateReader
    #: What the source had set, restored when the migration ends.
    saved: dict[str, Any] = field(default_factory=dict)
    #: The stream's offset where the last round ended (what followed is the next).
    mark: int = 0
    rounds: list[RoundFigures] = field(default_factory=list)

    @classmethod
    async def start(
        cls,
        reactor: Any,
        name: str,
        client: QMPClient,
        writer: IRecordWriter,
        downtime: int = 0,
    ) -> LiveRAM:
        """
        Turn on the capability, set ``downtime-limit`` (ms, unless 0), pass QEMU
        a socket, start ``migrate``.
        """
        caps = await client.execute("query-migrate-capabilities")
        params = await client.execute("query-migrate-parameters")
        saved = {
            CAPABILITY: any(
                c.get("capability") == CAPABILITY and c.get("state") for c in caps
            ),
            "max-bandwidth": params.get("max-bandwidth"),
            "downtime-limit": params.get("downtime-limit"),
        }
        await client.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": CAPABILITY, "state": True}]},
        )
        if downtime:
            await client.execute("migrate-set-parameters", {"downtime-limit": downtime})
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader = StateReader(writer)
        try:
            reactor.adoptStreamConnection(
                mine.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: reader)
            )
        finally:
            mine.close()  # the reactor holds its own duplicate
        live = cls(reactor, name, reader, saved)
        try:
            await client.migrateStart(theirs.fileno(), UNLIMITED_BANDWIDTH)
        except BaseException:
            reader.abort()
            await live.restore(client)
            raise
        finally:
            theirs.close()  # QEMU holds its own; EOF once it closes it
        return live

    async def query(self, client: QMPClient) -> RoundFigures:
        info = await client.execute("query-migrate")
        if info.get("status") in FAILED:
            self._raiseFailed(info)
        return RoundFigures.fromQuery(info)

    def _raiseFailed(self, info: dict[str, Any]) -> None:
        if self.reader.failure is not None:
            self.reader.failure.raiseException()  # the stream's loss is the cause
        raise QEMUMigrationFailed(
            info.get("error-desc", f"the migration was {info.get('status')}")
        )

    async def round(self, client: QMPClient, number: int) -> RoundResult:
        """Relay until QEMU finished one more pass, or stopped the VM."""
        start = await self.query(client)
        # QEMU syncs its dirty bitmap once at the start (count 1), then after
        # each pass over what is dirty.
        passes = max(start.syncs, 1)
        figures = start
        while not figures.switching and (
            figures.status != "active" or figures.syncs <= passes
        ):
            await deferLater(self.reactor, POLL, lambda: None)
            if self.reader.failure is not None:
                self.reader.failure.raiseException()
            figures = await self.query(client)
        sent, self.mark = self.reader.offset - self.mark, self.reader.offset
        self.rounds.append(figures)
        if figures.switching:
            log.info(
                "devmodel {device}: QEMU's RAM converged in round {round}: QEMU "
                "stopped the VM for its switch-over",
                device=self.name,
                round=number,
            )
        remaining = 0 if figures.switching else figures.remaining
        return RoundResult(sent, remaining, figures=figures.asReport(sent))

    async def finish(self, client: QMPClient) -> RoundFigures:
        """
        With the VM paused: wait for ``pre-switchover`` (QEMU sends the last
        dirty RAM first), ``migrate-continue``, wait for ``completed``.
        """
        figures = await self.query(client)
        while figures.status not in SWITCHING:
            await deferLater(self.reactor, POLL, lambda: None)
            figures = await self.query(client)
        if figures.status == "pre-switchover":
            await client.execute("migrate-continue", {"state": "pre-switchover"})
            log.debug("devmodel {device}: migrate-continue", device=self.name)
        while figures.status != "completed":
            await deferLater(self.reactor, POLL, lambda: None)
            figures = await self.query(client)
        log.debug("devmodel {device}: QEMU's migration completed", device=self.name)
        await self.reader.whenDone()
        log.debug("devmodel {device}: QEMU's stream read to its end", device=self.name)
        await self.restore(client)
        return figures

    async def restore(self, client: QMPClient) -> None:
        """Put back the capability and bandwidth the source QEMU had (best effort)."""
        try:
            await client.execute(
                "migrate-set-capabilities",
                {
                    "capabilities": [
                        {"capability": CAPABILITY, "state": self.saved[CAPABILITY]}
                    ]
                },
            )
            params = {
                key: self.saved[key]
                for key in ("max-bandwidth", "downtime-limit")
                if self.saved.get(key) is not None
            }
            await client.execute("migrate-set-parameters", params)
        except QMPError as e:
            log.warn(
                "devmodel {device}: could not restore QEMU's migration settings: "
                "{error}",
                device=self.name,
                error=str(e),
            )
