"""The source side of the ``devmodel`` kind: QEMU's device state out through QMP."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig.clients.qmp import QMPConnectionError, QMPTimeout
from xenmig.clients.qmpclient import (
    UNLIMITED_BANDWIDTH,
    QMPClient,
    connectQMP,
    qmpSession,
)
from xenmig.devices.devmodel.live import CAPABILITY, LiveRAM, RoundFigures
from xenmig.devices.devmodel.params import KIND, DevmodelParams
from xenmig.devices.devmodel.reader import StateReader
from xenmig.devices.sparse import sendFile
from xenmig.errors import (
    DeviceError,
)
from xenmig.interfaces import (
    IRecordWriter,
    ISourceContext,
    ISourceDevice,
)
from xenmig.model import (
    ContentDigest,
    DeviceDescription,
    DeviceSpec,
    RoundResult,
)

log = Logger()

FORMAT = 1
#: The two ways a source takes the state out (the description's ``mode``).
MODE_MIGRATE = "migrate"
MODE_XEN = "xen-save-devices-state"
#: Seconds for one short QMP conversation (connect, a few commands, hang up).
QMP_TIMEOUT = 10.0
#: A Xen device model's state (device state only) is some tens of KiB.
XEN_ESTIMATE = 64 * 1024
XEN_MAX = 64 * 1024 * 1024
#: The bytes of QEMU's stream that may wait unsent (``streamQueue``).
STREAM_QUEUE = 2 * 1024 * 1024
#: Run states in which QEMU has no state to give.
NO_STATE = frozenset({"inmigrate", "shutdown", "internal-error", "guest-panicked"})
#: ``query-migrate`` statuses of a migration still under way.
ACTIVE = frozenset(
    {"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug"}
)


def qemuVersion(greeting: dict[str, Any] | None) -> str:
    """QEMU's version from its QMP greeting, as ``major.minor.micro``."""
    try:
        qemu = greeting["QMP"]["version"]["qemu"]  # type: ignore[index]
        return f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}"
    except (KeyError, TypeError):
        return ""


async def machineFacts(client: QMPClient) -> dict[str, Any]:
    """What must match between a source and a target QEMU: machine type, RAM."""
    try:
        machine = await client.execute(
            "qom-get", {"path": "/machine", "property": "type"}
        )
    except DeviceError:
        machine = ""
    memory = await client.execute("query-memory-size-summary")
    return {
        "machine": str(machine),
        "memory": int(memory.get("base-memory", 0))
        + int(memory.get("plugged-memory", 0)),
    }


# -- the source ----------------------------------------------------------------------


@implementer(ISourceDevice)
class DevmodelSource:
    """
    Takes QEMU's state out through QMP: ``migrate`` into a passed socket read
    by the reactor, sent as the device's stream (or, with ``xen=1``,
    ``xen-save-devices-state`` into a file).  By default the migration starts
    in pre-copy, while the VM runs (L{LiveRAM}), and its RAM rounds run after
    every other device's (``precopyLast``): QEMU stops the VM once its RAM
    converged, which is the VM's one pause.  With ``live=0`` all of it is sent
    in the paused window.  On abort QEMU's migration is cancelled and the VM
    is as QEMU had it before; after the commit QEMU is ended (``release=quit``)
    or left to the toolstack (``release=keep``).
    """

    #: Pre-copy rounds run after those of every other device (see L{LiveRAM}).
    precopyLast = True
    #: At most this many bytes of QEMU's stream wait unsent on this side: QEMU
    #: decides when to stop the VM by how fast it writes, and what waits here
    #: when it stops is sent in the paused window, unknown to its estimate.
    streamQueue = STREAM_QUEUE

    def __init__(self, spec: DeviceSpec, context: ISourceContext) -> None:
        self.spec = spec
        self.context = context
        self.name = spec.name
        params = DevmodelParams.fromSpec(spec)
        self.path = params.qmp
        self.xen = params.xen
        self.timeout = params.timeout
        self.releaseMode = params.releaseMode
        self.statedir = params.statedir or None
        self.precopy = params.live and not params.xen
        self.downtime = params.downtime
        self.live: LiveRAM | None = None
        self.liveStarting = False  # LiveRAM.start began (and may not have ended)
        self.final: RoundFigures | None = None
        self.started = False
        self.finalAsked = False  # sendFinal was called: the toolstack paused the VM
        self.stoppedHere = False  # xen=1: this handler stopped the device model
        self._saving: Deferred[Any] | None = None
        self._restoring: Deferred[None] | None = None

    def _session(self, work: Any, seconds: float = QMP_TIMEOUT) -> Deferred[Any]:
        what = f"devmodel device {self.name}: QEMU at {self.path}"
        return qmpSession(self.context.reactor, self.path, seconds, work, what)

    # describe

    def describe(self) -> Deferred[DeviceDescription]:
        return self._session(self._describe)

    async def _describe(self, client: QMPClient) -> DeviceDescription:
        status = await client.queryStatus()
        if status in NO_STATE:
            raise DeviceError(
                f"devmodel device {self.name}: the QEMU at {self.path} is "
                f"'{status}': it has no state to migrate"
            )
        params: dict[str, Any] = {
            "format": FORMAT,
            "mode": MODE_XEN if self.xen else MODE_MIGRATE,
            "qemu_version": qemuVersion(client.greeting),
        }
        if self.xen:
            commands = await client.execute("query-commands")
            if not any(c.get("name") == MODE_XEN for c in commands):
                raise DeviceError(
                    f"devmodel device {self.name}: the QEMU at {self.path} has no "
                    f"{MODE_XEN} command (xen=1 needs a Xen device model)"
                )
            size, params["max_size"] = XEN_ESTIMATE, XEN_MAX
        else:
            facts = await machineFacts(client)
            params.update(facts)
            size = facts["memory"]
            params["max_size"] = size + size // 32 + 64 * 1024 * 1024
        return DeviceDescription(KIND, self.name, size, params, self.precopy)

    def accepted(self, params: dict[str, Any]) -> None:
        log.debug(
            "devmodel {device} accepted by the target: {params}",
            device=self.name,
            params=params,
        )

    def sendRound(self, writer: IRecordWriter, round: int) -> Deferred[RoundResult]:
        if not self.precopy:
            return fail(DeviceError(f"devmodel device {self.name}: no pre-copy rounds"))
        if (self.live is None) != (round == 0) or self._saving is not None:
            return fail(
                DeviceError(
                    f"devmodel device {self.name}: pre-copy round {round} asked out "
                    f"of order (round 0 starts QEMU's migration; one round at a time)"
                )
            )
        self.started = True
        self._saving = self._session(
            lambda client: self._round(client, writer, round), self.timeout
        )
        return self._saving.addBoth(self._roundEnded)

    def _roundEnded(self, result: object) -> object:
        self._saving = None
        return result

    async def _round(
        self, client: QMPClient, writer: IRecordWriter, round: int
    ) -> RoundResult:
        if self.live is None:
            status = await client.queryStatus()
            if status != "running":
                log.info(
                    "devmodel {device}: the VM is {status} at the start of pre-copy",
                    device=self.name,
                    status=status,
                )
            self.liveStarting = True
            self.live = await LiveRAM.start(
                self.context.reactor, self.name, client, writer, self.downtime
            )
        return await self.live.round(client, round)

    # the final state

    def sendFinal(self, writer: IRecordWriter) -> Deferred[ContentDigest]:
        if self._saving is not None or self.final is not None or self.finalAsked:
            return fail(DeviceError(f"devmodel device {self.name}: already sent"))
        self.started = self.finalAsked = True
        if self.live is not None:
            live = self.live
            self._saving = Deferred.fromCoroutine(self._finishLive(live))
            what = f"devmodel device {self.name}: QEMU at {self.path}"
            self._saving.addTimeout(
                self.timeout,
                self.context.reactor,
                onTimeoutCancel=lambda _, seconds: Failure(
                    QMPTimeout(f"{what} did not send its state within {seconds:g} s")
                ),
            )
        else:
            self._saving = self._session(
                lambda client: self._save(client, writer), self.timeout
            )
        return self._saving

    async def _save(self, client: QMPClient, writer: IRecordWriter) -> ContentDigest:
        status = await client.queryStatus()
        if self.xen:
            return await self._saveXen(client, writer, status)
        self._refuseRunning(status)
        return await self._saveByMigrate(client, writer)

    def _refuseRunning(self, status: str) -> None:
        if status == "running":
            raise DeviceError(
                f"devmodel device {self.name}: the VM of the QEMU at {self.path} "
                f"is running; pause it (the toolstack's pause, or --domain-control) "
                f"before its final state is sent"
            )

    async def _switchOver(self, client: QMPClient, live: LiveRAM) -> None:
        self._refuseRunning(await client.queryStatus())
        await live.converge(client)

    async def _finishLive(self, live: LiveRAM) -> ContentDigest:
        """
        QEMU's switch-over (if the last round did not let it go on already),
        then the stream's end: QEMU's monitor is free meanwhile, for the
        other devices' final rounds (a disk's dirty bitmap).
        """
        await self._session(lambda c: self._switchOver(c, live), self.timeout)
        await live.reader.whenDone()
        log.debug("devmodel {device}: QEMU's stream read to its end", device=self.name)
        self.final = figures = await self._session(live.completed)
        # QEMU's own settings go back while the target verifies: not in the
        # paused window's path (release and rollback wait for it).
        self._restoring = self._session(live.restore)
        self._restoring.addErrback(self._notRestored)
        digest = live.reader.digest()
        log.info(
            "devmodel {device}: QEMU sent {size} bytes of state, {final} of them "
            "after the pre-copy rounds; QEMU's downtime {ms} ms",
            device=self.name,
            size=digest.size,
            final=digest.size - live.mark,
            ms=figures.downtime,
        )
        return digest

    async def _saveByMigrate(
        self, client: QMPClient, writer: IRecordWriter
    ) -> ContentDigest:
        reader, theirs = StateReader.open(self.context.reactor, writer)
        try:
            try:
                info = await client.migrateToFD(theirs.fileno(), UNLIMITED_BANDWIDTH)
            finally:
                theirs.close()  # QEMU holds its own; EOF once it closes it
            await reader.whenDone()
        except BaseException as e:
            reader.abort()
            if reader.failure is not None and not isinstance(e, CancelledError):
                reader.failure.raiseException()  # the stream's loss is the cause
            raise
        digest = reader.digest()
        log.info(
            "devmodel {device}: QEMU wrote {size} bytes of state in {ms} ms",
            device=self.name,
            size=digest.size,
            ms=info.get("total-time"),
        )
        return digest

    async def _saveXen(
        self, client: QMPClient, writer: IRecordWriter, status: str
    ) -> ContentDigest:
        # As libxl does: stop the device model, save the device state to a file.
        if status == "running":
            await client.stop()
            self.stoppedHere = True
        directory = await self.context.runInThread(
            tempfile.mkdtemp, "", "xenmig-devmodel-", self.statedir
        )
        try:
            path = os.path.join(directory, "devices.state")
            await client.execute(MODE_XEN, {"filename": path, "live": False})
            return await sendFile(self.context, writer, path)
        finally:
            await self.context.runInThread(shutil.rmtree, directory, True)

    # abort and commit

    def rollback(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._rollback())

    def _notRestored(self, failure: Failure) -> None:
        log.warn(
            "devmodel {device}: could not put QEMU's migration settings back: {why}",
            device=self.name,
            why=failure.getErrorMessage(),
        )

    async def _rollback(self) -> None:
        if self._restoring is not None:
            await self._restoring  # _settle puts them back again: no harm
        if self._saving is not None and not self._saving.called:
            await whenFired(self._saving, cancel=True)  # a migrate gets migrate_cancel
        if not self.started:
            return
        await self._session(self._settle, QMP_TIMEOUT * 3)

    async def _settle(self, client: QMPClient) -> None:
        """
        No migration under way: QEMU resumes a VM that it stopped itself for
        its switch-over; one that the toolstack paused stays paused.
        """
        info = await client.execute("query-migrate")
        if info.get("status") in ACTIVE:
            await client.execute("migrate_cancel")
            while (await client.execute("query-migrate")).get("status") in ACTIVE:
                await deferLater(self.context.reactor, 0.05)
        if self.live is not None:
            self.live.reader.abort()
            await self.live.restore(client)
        elif self.liveStarting:
            # Stopped while it started: at least QEMU must not wait at the next
            # migration's switch-over (a best-effort cleanup).
            await client.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": CAPABILITY, "state": False}]},
            ).addErrback(lambda f: None)
        # A migration that completed meanwhile leaves its run state a moment
        # later (finish-migrate, then postmigrate): QEMU refuses cont till then.
        while await client.queryStatus() == "finish-migrate":
            await deferLater(self.context.reactor, 0.01)
        if self.stoppedHere:
            await client.cont()  # the device model runs as before (libxl does too)
            self.stoppedHere = False
        elif self._wentOnAlone() and await client.queryStatus() != "running":
            # Its switch-over went on in pre-copy, before the toolstack paused
            # the VM: the VM runs on, as QEMU restarts one whose switch-over
            # is cancelled.  After the toolstack's pause, resuming is its own.
            await client.cont()
        log.info(
            "devmodel {device}: rolled back; QEMU is {status}",
            device=self.name,
            status=await client.queryStatus(),
        )

    def _wentOnAlone(self) -> bool:
        """This handler let QEMU's switch-over go on before the final was asked."""
        return self.live is not None and self.live.continued and not self.finalAsked

    def release(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._release())

    async def _release(self) -> None:
        if self._restoring is not None:
            await self._restoring
        if self.releaseMode != "keep":
            await self._quit()

    async def _quit(self) -> None:
        reactor = self.context.reactor
        try:
            client = await connectQMP(reactor, self.path, QMP_TIMEOUT)
        except QMPConnectionError:
            return  # already gone (the toolstack's release came first)
        try:
            await client.quit().addTimeout(QMP_TIMEOUT, reactor)
            await client.protocol.whenClosed().addTimeout(QMP_TIMEOUT, reactor)
        finally:
            await client.close()
        log.info(
            "devmodel {device}: the source QEMU was told to quit", device=self.name
        )


async def whenFired(d: Deferred[Any], cancel: bool = False) -> None:
    """Wait until ``d`` has fired (cancelling it first, if asked), whatever result."""
    waiter: Deferred[None] = Deferred()

    def fired(result: object) -> object:
        if not waiter.called:
            waiter.callback(None)
        return result

    d.addBoth(fired)
    if cancel:
        d.cancel()
    await waiter
