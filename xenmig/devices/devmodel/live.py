"""The ``devmodel`` kind's live RAM: QEMU's own pre-copy into the device's stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
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
#: Seconds between two ``query-migrate`` while a round or the switch-over runs,
#: unless one of QEMU's L{EVENTS} comes first.
POLL = 0.01
CAPABILITY = "pause-before-switchover"
#: The capabilities a live migration turns on (and puts back afterwards): QEMU
#: waits, VM stopped, before it sends the device state; it says when its
#: migration's status changes.
CAPABILITIES = (CAPABILITY, "events")
#: QEMU's events that end a wait between two looks at its migration: the VM
#: stopped, the migration's status changed, a pass over dirty memory began.
EVENTS = ("STOP", "MIGRATION", "MIGRATION_PASS")
#: QEMU's ``downtime-limit`` starts at this share of the one the migration may
#: use (the device's ``downtime=``, else QEMU's own) and doubles after each
#: pass that did not converge, up to it.  QEMU decides when to stop the VM by
#: the rate it measures, which through the relay is a fraction of a local
#: socket's: with the whole limit at once it stops after its first pass with
#: tens of MB left, sent in the pause; with a share, it sends them in one more
#: pass while the guest runs and stops with about a MB.
FIRST_SHARE = 8


class Nudges:
    """
    The waits between two looks at QEMU's migration, on one QMP connection:
    each lasts at most its seconds, and ends as soon as QEMU sends one of
    L{EVENTS} (or has sent one since the last wait).  So QEMU's stop of the VM
    is seen within a QMP round trip, not a polling interval.
    """

    def __init__(self, reactor: Any, client: QMPClient) -> None:
        self.reactor = reactor
        self.seen = False
        #: QEMU said it stopped the VM (its switch-over follows within moments).
        self.stopped = False
        self._waiting: Deferred[None] | None = None
        self._unsubscribe = [client.onEvent(name, self._event) for name in EVENTS]

    def _event(self, event: Any) -> None:
        self.seen = True
        if isinstance(event, dict) and event.get("event") == "STOP":
            self.stopped = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.called:
            waiting.callback(None)

    async def wait(self, seconds: float) -> None:
        """Wait ``seconds``, or until QEMU's next event; cancellable."""
        if not self.seen:
            timer = None

            def cancel(d: Deferred[None]) -> None:
                if timer is not None and timer.active():
                    timer.cancel()

            waiting: Deferred[None] = Deferred(cancel)
            self._waiting = waiting
            timer = self.reactor.callLater(seconds, self._event, None)
            try:
                await waiting
            finally:
                if timer.active():
                    timer.cancel()
        self.seen = False

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()


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
    it sends the device state; ``events`` on, so it says when its status
    changes), relayed into the device's stream by a L{StateReader} that lives
    across the rounds.  A round lasts one pass of QEMU over the guest's dirty
    memory (``dirty-sync-count`` advances) or until QEMU stops the VM for its
    switch-over.  QEMU's stop is the VM's pause: the round that sees it lets
    the switch-over go on at once (``migrate-continue``), so QEMU sends the
    last dirty RAM and the device state while the toolstack's pause and the
    other devices' final rounds follow; L{finish} waits for the stream's end.
    """

    reactor: Any
    name: str
    reader: StateReader
    #: What the source had set, restored when the migration ends.
    saved: dict[str, Any] = field(default_factory=dict)
    #: The stream's offset where the last round ended (what followed is the next).
    mark: int = 0
    rounds: list[RoundFigures] = field(default_factory=list)
    #: This side had QEMU go on with the switch-over it paused the VM for.
    continued: bool = False
    #: QEMU's ``downtime-limit`` now, and the most it is raised to (ms).
    limit: int = 0
    cap: int = 0

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
        Turn on the capabilities, set ``downtime-limit`` to a share of
        ``downtime`` (ms; 0: of QEMU's own), pass QEMU a socket, start
        ``migrate``.
        """
        caps = await client.execute("query-migrate-capabilities")
        params = await client.execute("query-migrate-parameters")
        saved: dict[str, Any] = {
            name: any(c.get("capability") == name and c.get("state") for c in caps)
            for name in CAPABILITIES
        }
        saved["max-bandwidth"] = params.get("max-bandwidth")
        saved["downtime-limit"] = params.get("downtime-limit")
        await client.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": c, "state": True} for c in CAPABILITIES]},
        )
        cap = downtime or int(saved["downtime-limit"] or 0)
        limit = max(1, cap // FIRST_SHARE) if cap else 0
        if limit:
            await client.execute("migrate-set-parameters", {"downtime-limit": limit})
        reader, theirs = StateReader.open(reactor, writer)
        live = cls(reactor, name, reader, saved, limit=limit, cap=cap)
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
        """
        Relay until QEMU finished one more pass, or stopped the VM: then let
        its switch-over go on (the VM's pause has begun).
        """
        nudges = Nudges(self.reactor, client)
        try:
            start = await self.query(client)
            # QEMU syncs its dirty bitmap once at the start (count 1), then after
            # each pass over what is dirty.
            passes = max(start.syncs, 1)
            figures = start
            while not figures.switching:
                # A pass ended; but once QEMU stopped the VM (its last sync
                # comes with the stop), this round waits for the switch-over.
                if figures.status == "active" and figures.syncs > passes:
                    if not nudges.stopped:
                        await self.raiseLimit(client)
                        break
                await nudges.wait(POLL)
                if self.reader.failure is not None:
                    self.reader.failure.raiseException()
                figures = await self.query(client)
        finally:
            nudges.close()
        sent, self.mark = self.reader.offset - self.mark, self.reader.offset
        self.rounds.append(figures)
        if figures.switching:
            unread = self.reader.waiting()
            log.info(
                "devmodel {device}: QEMU's RAM converged in round {round}: QEMU "
                "stopped the VM for its switch-over ({unsent} bytes of its stream "
                "still to send from here, {unread} of them still to read)",
                device=self.name,
                round=number,
                unsent=getattr(self.reader.writer, "unsent", 0) + unread,
                unread=unread,
            )
            await self.switchOver(client, figures)
        remaining = 0 if figures.switching else figures.remaining
        return RoundResult(sent, remaining, figures=figures.asReport(sent))

    async def raiseLimit(self, client: QMPClient) -> None:
        """A pass did not converge: double QEMU's ``downtime-limit``, up to L{cap}."""
        if not self.limit or self.limit >= self.cap:
            return
        self.limit = min(self.cap, self.limit * 2)
        await client.execute("migrate-set-parameters", {"downtime-limit": self.limit})
        log.debug(
            "devmodel {device}: QEMU's downtime-limit now {ms} ms",
            device=self.name,
            ms=self.limit,
        )

    async def switchOver(self, client: QMPClient, figures: RoundFigures) -> None:
        """QEMU waits at ``pre-switchover``, VM stopped: let it send the rest."""
        if figures.status != "pre-switchover" or self.continued:
            return
        await client.execute("migrate-continue", {"state": "pre-switchover"})
        self.continued = True
        log.debug("devmodel {device}: migrate-continue", device=self.name)

    async def converge(self, client: QMPClient) -> None:
        """
        With the VM paused by the toolstack: wait until QEMU stopped for its
        switch-over (it sends what is dirty first), and let it go on.
        """
        nudges = Nudges(self.reactor, client)
        try:
            figures = await self.query(client)
            while figures.status not in SWITCHING:
                await nudges.wait(POLL)
                figures = await self.query(client)
        finally:
            nudges.close()
        await self.switchOver(client, figures)

    async def completed(self, client: QMPClient) -> RoundFigures:
        """
        Once QEMU closed the stream (L{StateReader.whenDone}): its migration
        completed (or raise how it failed).  The source's settings are put
        back after (L{restore}), outside the paused window.
        """
        figures = await self.query(client)
        while figures.status != "completed":  # QEMU closes it right after
            await deferLater(self.reactor, POLL, lambda: None)
            figures = await self.query(client)
        log.debug("devmodel {device}: QEMU's migration completed", device=self.name)
        return figures

    async def restore(self, client: QMPClient) -> None:
        """Put back the capabilities and settings the source QEMU had (best effort)."""
        try:
            await client.execute(
                "migrate-set-capabilities",
                {
                    "capabilities": [
                        {"capability": c, "state": self.saved[c]} for c in CAPABILITIES
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
