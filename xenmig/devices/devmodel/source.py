"""The source side of the ``devmodel`` kind: QEMU's device state out through QMP."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig.clients.qmp import QMPConnectionError
from xenmig.clients.qmpclient import (
    UNLIMITED_BANDWIDTH,
    QMPClient,
    connectQMP,
    qmpSession,
)
from xenmig.devices.devmodel.params import KIND, DevmodelParams
from xenmig.devices.sparse import sendFile
from xenmig.digest import ContentHasher
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


class StateReader(Protocol):
    """
    Reads the migration stream QEMU writes into one end of a socketpair and
    writes it on as DATA records, hashing it on the way.  While the writer holds
    back (its Deferred is pending) the socket is not read, so QEMU blocks: memory
    stays bounded whatever the size of the state.
    """

    transport: Any

    def __init__(self, writer: IRecordWriter) -> None:
        self.writer = writer
        self.hasher = ContentHasher()
        self.offset = 0
        self.failure: Failure | None = None
        self.ended = False
        self._pending = 0
        self._paused = False
        self._waiters: list[Deferred[None]] = []

    def dataReceived(self, data: bytes) -> None:
        if self.failure is not None:
            return
        self.hasher.update(self.offset, data)
        offset, self.offset = self.offset, self.offset + len(data)
        self._pending += 1
        self.writer.writeData(offset, data).addBoth(self._written)
        if self._pending and not self._paused and not self.ended:
            self._paused = True
            self.transport.pauseProducing()

    def _written(self, result: object) -> None:
        self._pending -= 1
        if isinstance(result, Failure):
            if self.failure is None:
                self.failure = result
                if not self.ended:
                    # Closing our end makes QEMU's write fail: its migration ends.
                    self.transport.abortConnection()
        elif self._pending == 0 and self._paused and not self.ended:
            self._paused = False
            self.transport.resumeProducing()
        self._settle()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = True
        if self.failure is None and not reason.check(ConnectionDone):
            self.failure = reason
        self._settle()

    def _settle(self) -> None:
        if self.ended and self._pending == 0:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if self.failure is not None:
                    waiter.errback(self.failure)
                else:
                    waiter.callback(None)

    def whenDone(self) -> Deferred[None]:
        """Fires once QEMU closed its end and the writer took every byte."""
        d: Deferred[None] = Deferred(self._waiters.remove)
        self._waiters.append(d)
        self._settle()
        return d

    def abort(self) -> None:
        """Stop reading (QEMU's next write fails)."""
        if not self.ended and self.transport is not None:
            self.transport.abortConnection()

    def digest(self) -> ContentDigest:
        return self.hasher.result()


@implementer(ISourceDevice)
class DevmodelSource:
    """
    Takes a stopped QEMU's state out through QMP: ``migrate`` into a passed
    socket read by the reactor (or, with ``xen=1``, ``xen-save-devices-state``
    into a file), sent as the device's stream.  On abort QEMU stays stopped and
    resumable; after the commit it is ended (``release=quit``) or left to the
    toolstack (``release=keep``).
    """

    precopy = False

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
        self.started = False
        self.stoppedHere = False  # xen=1: this handler stopped the device model
        self._saving: Deferred[ContentDigest] | None = None

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
        return DeviceDescription(KIND, self.name, size, params)

    def accepted(self, params: dict[str, Any]) -> None:
        log.debug(
            "devmodel {device} accepted by the target: {params}",
            device=self.name,
            params=params,
        )

    def sendRound(self, writer: IRecordWriter, round: int) -> Deferred[RoundResult]:
        return fail(DeviceError(f"devmodel device {self.name}: no pre-copy rounds"))

    # the final state

    def sendFinal(self, writer: IRecordWriter) -> Deferred[ContentDigest]:
        if self._saving is not None:
            return fail(DeviceError(f"devmodel device {self.name}: already sent"))
        self.started = True
        self._saving = self._session(
            lambda client: self._save(client, writer), self.timeout
        )
        return self._saving

    async def _save(self, client: QMPClient, writer: IRecordWriter) -> ContentDigest:
        status = await client.queryStatus()
        if self.xen:
            return await self._saveXen(client, writer, status)
        if status == "running":
            raise DeviceError(
                f"devmodel device {self.name}: the VM of the QEMU at {self.path} "
                f"is running; pause it (the toolstack's pause, or --domain-control) "
                f"before its final state is sent"
            )
        return await self._saveByMigrate(client, writer)

    async def _saveByMigrate(
        self, client: QMPClient, writer: IRecordWriter
    ) -> ContentDigest:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader = StateReader(writer)
        try:
            self.context.reactor.adoptStreamConnection(
                mine.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: reader)
            )
        finally:
            mine.close()  # the reactor holds its own duplicate
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

    async def _rollback(self) -> None:
        if self._saving is not None and not self._saving.called:
            await whenFired(self._saving, cancel=True)  # a migrate gets migrate_cancel
        if not self.started:
            return
        await self._session(self._settle, QMP_TIMEOUT * 3)

    async def _settle(self, client: QMPClient) -> None:
        """Leave QEMU stopped and resumable: no migration under way."""
        info = await client.execute("query-migrate")
        if info.get("status") in ACTIVE:
            await client.execute("migrate_cancel")
            while (await client.execute("query-migrate")).get("status") in ACTIVE:
                await _sleep(self.context.reactor, 0.05)
        if self.stoppedHere:
            await client.cont()  # the device model runs as before (libxl does too)
            self.stoppedHere = False
        log.info(
            "devmodel {device}: rolled back; QEMU is {status}",
            device=self.name,
            status=await client.queryStatus(),
        )

    def release(self) -> Deferred[None]:
        if self.releaseMode == "keep":
            return succeed(None)
        return Deferred.fromCoroutine(self._quit())

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


async def _sleep(reactor: Any, seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d
