"""The ``devmodel`` device kind: QEMU's state, saved through QMP, loaded into a QEMU."""

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
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from xenmig.digest import ContentHasher
from xenmig.domains import qmpSession
from xenmig.errors import (
    BadSpec,
    CommitFailed,
    DeviceError,
    DeviceRefused,
    DigestMismatch,
    StreamError,
    UnknownDevice,
)
from xenmig.interfaces import (
    IDeviceKind,
    IRecordWriter,
    ISourceContext,
    ISourceDevice,
    ITargetContext,
    ITargetDevice,
)
from xenmig.model import (
    ContentDigest,
    DeviceDescription,
    DeviceSpec,
    RoundResult,
    flagParam,
    refuseUnknown,
    secondsParam,
)
from xenmig.qmp import (
    UNLIMITED_BANDWIDTH,
    QEMUMigrationFailed,
    QMPClient,
    QMPConnectionError,
    connectQMP,
)
from xenmig.records import DataRecord, EndRecord, Record, ZeroRecord
from xenmig.sparse import sendFile
from xenmig.staging import StagedFile

log = Logger()

KIND = "devmodel"
FORMAT = 1
SOURCE_PARAMS = frozenset({"qmp", "xen", "timeout", "release", "statedir"})
TARGET_PARAMS = frozenset(
    {
        "target-qmp",
        "target-statefile",
        "target-log",
        "target-overwrite",
        "target-timeout",
    }
)
#: The two ways a source takes the state out (the description's ``mode``).
MODE_MIGRATE = "migrate"
MODE_XEN = "xen-save-devices-state"
#: Seconds for one short QMP conversation (connect, a few commands, hang up).
QMP_TIMEOUT = 10.0
#: Default seconds for QEMU to write (source) or load (target) the whole state.
STATE_TIMEOUT = 300.0
#: A Xen device model's state (device state only) is some tens of KiB.
XEN_ESTIMATE = 64 * 1024
XEN_MAX = 64 * 1024 * 1024
#: The largest state a target accepts, whatever the source declares.
MAX_STATE = 1 << 44
#: Run states in which QEMU has no state to give.
NO_STATE = frozenset({"inmigrate", "shutdown", "internal-error", "guest-panicked"})
#: ``query-migrate`` statuses of a migration still under way.
ACTIVE = frozenset(
    {"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug"}
)
#: How much of the target QEMU's log a refusal quotes.
LOG_TAIL = 4096


def _version(greeting: dict[str, Any] | None) -> str:
    """QEMU's version from its QMP greeting, as ``major.minor.micro``."""
    try:
        qemu = greeting["QMP"]["version"]["qemu"]  # type: ignore[index]
        return f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}"
    except (KeyError, TypeError):
        return ""


def _versionTuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return ()


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
        name = self.name = spec.name
        refuseUnknown(
            f"devmodel device {name}",
            [*spec.params, *spec.targetParams],
            SOURCE_PARAMS | TARGET_PARAMS,
        )
        path = spec.params.get("qmp")
        if not path:
            raise BadSpec(f"devmodel device {name}: needs qmp=PATH, QEMU's QMP socket")
        modes = {"target-qmp", "target-statefile"} & set(spec.targetParams)
        if len(modes) != 1:
            raise BadSpec(
                f"devmodel device {name}: give exactly one of target-qmp=PATH (a "
                f"QEMU waiting with -incoming defer) or target-statefile=PATH"
            )
        self.path = str(path)
        self.xen = flagParam(spec.params, "xen")
        self.timeout = secondsParam(
            f"devmodel device {name}", spec.params, "timeout", STATE_TIMEOUT, 86400
        )
        self.releaseMode = str(
            spec.params.get("release", "keep" if self.xen else "quit")
        )
        if self.releaseMode not in ("quit", "keep"):
            raise BadSpec(f"devmodel device {name}: release= is 'quit' or 'keep'")
        self.statedir = spec.params.get("statedir") or None
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
            "qemu_version": _version(client.greeting),
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
            await _ended(self._saving, cancel=True)  # a migrate gets migrate_cancel
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


async def _ended(d: Deferred[Any], cancel: bool = False) -> None:
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


# -- the target ----------------------------------------------------------------------


@implementer(ITargetDevice)
class DevmodelTarget:
    """
    Receives QEMU's state into staging and verifies its digest.  With
    ``target-qmp`` it then feeds the verified state to a QEMU waiting with
    ``-incoming defer`` (at finish: the device is READY only once QEMU has
    loaded it, paused), which stays paused until the toolstack resumes it after
    the commit.  With ``target-statefile`` it installs the file at the commit.
    """

    requestMethods: frozenset[str] = frozenset()

    def __init__(self, description: DeviceDescription, context: ITargetContext):
        self.description = description
        self.context = context
        params = description.params
        name = self.name = description.name
        given = [k for k in params if k.startswith("target")]
        refuseUnknown(f"devmodel device {name}", given, TARGET_PARAMS)
        qmp, statefile = params.get("target-qmp"), params.get("target-statefile")
        if bool(qmp) == bool(statefile):
            raise BadSpec(
                f"devmodel device {name}: give exactly one of target-qmp=PATH or "
                f"target-statefile=PATH"
            )
        maxSize = params.get("max_size")
        if not isinstance(maxSize, int) or not 0 < maxSize <= MAX_STATE:
            raise BadSpec(f"devmodel device {name}: max_size={maxSize!r} is unusable")
        self.maxSize = maxSize
        self.timeout = secondsParam(
            f"devmodel device {name}", params, "target-timeout", STATE_TIMEOUT, 86400
        )
        self.overwrite = flagParam(params, "target-overwrite")
        # The source names these paths: like destinations, they must lie inside
        # this host's allowed roots (no connecting to, or quoting, anything else).
        self.qmpPath: str | None = None
        self.logPath: str | None = None
        self.destination: FilePath | None = None
        if qmp:
            self.qmpPath = context.resolveDestination(str(qmp)).path
            if params.get("target-log"):
                self.logPath = context.resolveDestination(
                    str(params["target-log"])
                ).path
        else:
            self.destination = context.resolveDestination(str(statefile))
        self.staged: StagedFile | None = None
        self.loaded = False  # QEMU took (or began to take) the state
        self.loading: Deferred[None] | None = None

    def _session(self, work: Any, seconds: float = QMP_TIMEOUT) -> Deferred[Any]:
        assert self.qmpPath is not None
        what = f"devmodel device {self.name}: the target QEMU at {self.qmpPath}"
        return qmpSession(self.context.reactor, self.qmpPath, seconds, work, what)

    # accept

    def accept(self) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._accept())

    async def _accept(self) -> dict[str, Any]:
        if self.qmpPath is not None:
            try:
                await self._session(self._checkQEMU)
            except DeviceRefused:
                raise
            except DeviceError as e:
                raise DeviceRefused(str(e))
            path = self.context.stagingDir.child("devmodel.state")
            where = self.context.stagingDir.path
        else:
            assert self.destination is not None
            where = self.destination.dirname()
            if not self.overwrite and await self.context.runInThread(
                os.path.lexists, self.destination.path
            ):
                raise DeviceRefused(
                    f"devmodel device {self.name}: {self.destination.path} already "
                    f"exists (ask for target-overwrite=1 to replace it)"
                )
            path = self.context.stagingPathFor(self.destination)
        free = await self.context.runInThread(_freeBytes, where)
        if self.description.size > free:
            raise DeviceRefused(
                f"devmodel device {self.name}: {where} has {free} bytes free, about "
                f"{self.description.size} needed"
            )
        self.staged = StagedFile(self.context, path, 0, maxSize=self.maxSize)
        await self.staged.open()
        return {"mode": "qmp" if self.qmpPath else "statefile"}

    async def _checkQEMU(self, client: QMPClient) -> None:
        """Refuse at Prepare what QEMU would refuse at load time."""
        where = f"devmodel device {self.name}: the target QEMU at {self.qmpPath}"
        status = await client.queryStatus()
        migrating = (await client.execute("query-migrate")).get("status")
        if status != "inmigrate" or migrating not in (None, "none"):
            raise DeviceRefused(
                f"{where} is '{status}', not waiting for a migration: start a fresh "
                f"QEMU with -incoming defer (and -S) for the incoming VM"
            )
        params = self.description.params
        ours, theirs = _version(client.greeting), str(params.get("qemu_version", ""))
        if _versionTuple(ours) < _versionTuple(theirs):
            raise DeviceRefused(
                f"{where} is version {ours}, older than the source's {theirs}: QEMU "
                f"migrates to the same or a newer version only"
            )
        if params.get("mode") != MODE_MIGRATE:
            return
        facts = await machineFacts(client)
        machine = params.get("machine")
        if machine and facts["machine"] and machine != facts["machine"]:
            raise DeviceRefused(
                f"{where} runs machine type {facts['machine']}, the source "
                f"{machine}: start it with the same -machine"
            )
        if params.get("memory") and params["memory"] != facts["memory"]:
            raise DeviceRefused(
                f"{where} has {facts['memory']} bytes of RAM, the source "
                f"{params['memory']}: start it with the same -m"
            )

    # receive and verify

    def receive(self, record: Record) -> Deferred[None] | None:
        if isinstance(record, DataRecord | ZeroRecord):
            assert self.staged is not None
            return self.staged.receive(record)
        return None

    def finish(self, end: EndRecord) -> Deferred[ContentDigest]:
        return Deferred.fromCoroutine(self._finish(end))

    async def _finish(self, end: EndRecord) -> ContentDigest:
        assert self.staged is not None
        if not 0 < end.size <= self.maxSize:
            raise StreamError(
                f"devmodel device {self.name}: the source declared {end.size} bytes "
                f"of state (at most {self.maxSize})"
            )
        digest = await self.staged.finish(end.size)
        # Verified here, before QEMU sees a byte of it.
        if (digest.size, digest.algorithm, digest.digest) != (
            end.size,
            end.algorithm,
            end.digest,
        ):
            raise DigestMismatch(
                f"devmodel device {self.name}: the received state does not match "
                f"the source's digest; it was not given to QEMU"
            )
        if self.qmpPath is not None:
            self.loading = Deferred.fromCoroutine(self._load())
            await self.loading
        return digest

    async def _load(self) -> None:
        assert self.staged is not None
        logStart = await self.context.runInThread(_size, self.logPath)
        fd = await self.context.runInThread(
            os.open, self.staged.path.path, os.O_RDONLY | os.O_CLOEXEC
        )
        try:
            self.loaded = True
            status = await self._session(
                lambda client: client.migrateIncomingFromFD(fd), self.timeout
            )
        except DeviceError as e:
            raise DeviceError(await self._refusal(e, logStart))
        finally:
            os.close(fd)
        if status not in ("paused", "prelaunch"):
            raise DeviceError(
                f"devmodel device {self.name}: the target QEMU at {self.qmpPath} is "
                f"'{status}' after loading the state: it must stay paused until the "
                f"commit (start it with -S)"
            )
        log.info(
            "devmodel {device}: the target QEMU loaded the state ({status})",
            device=self.name,
            status=status,
        )
        await self.staged.discard()  # QEMU holds the state now

    async def _refusal(self, error: DeviceError, logStart: int) -> str:
        """QEMU's own words for a failed load: its log's new lines, or its error."""
        where = f"devmodel device {self.name}: the target QEMU at {self.qmpPath}"
        said = await self.context.runInThread(_tail, self.logPath, logStart)
        if said:
            return f"{where} refused the state: {said}"
        if isinstance(error, QEMUMigrationFailed):
            hint = ""
            if self.logPath is None:
                hint = (
                    " (give target-log=PATH, where QEMU's standard error goes, to "
                    "see QEMU's reason)"
                )
            return f"{where} refused the state: {error}{hint}"
        return f"{where} could not load the state: {error}"

    # commit and abort

    def commit(self) -> Deferred[list[str]]:
        return Deferred.fromCoroutine(self._commit())

    async def _commit(self) -> list[str]:
        if self.destination is not None:
            assert self.staged is not None
            await self.staged.install(self.destination, self.overwrite)
            return [self.destination.path]
        if not self.loaded:
            raise CommitFailed(f"devmodel device {self.name}: commit before finish")
        try:
            status = await self._session(lambda client: client.queryStatus())
        except DeviceError as e:
            raise CommitFailed(str(e))
        if status not in ("paused", "prelaunch"):
            raise CommitFailed(
                f"devmodel device {self.name}: the target QEMU at {self.qmpPath} is "
                f"'{status}', not paused with the loaded state"
            )
        return [f"devmodel {self.name}: QEMU at {self.qmpPath} holds the state, paused"]

    def abort(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._abort())

    async def _abort(self) -> None:
        if self.loading is not None and not self.loading.called:
            # A load cannot be taken back: wait for it (it is bounded), then end it.
            await _ended(self.loading)
        if self.loaded and self.qmpPath is not None:
            # This QEMU holds (part of) the state of a migration that will not
            # happen; it cannot take another one, and must never run it.
            await self._quitTarget()
        if self.staged is not None:
            await self.staged.discard()

    async def _quitTarget(self) -> None:
        assert self.qmpPath is not None
        reactor = self.context.reactor
        try:
            client = await connectQMP(reactor, self.qmpPath, QMP_TIMEOUT)
        except QMPConnectionError:
            return  # it exited (QEMU ends itself when a load fails)
        try:
            await client.quit().addTimeout(QMP_TIMEOUT, reactor)
        except Exception as e:
            log.warn(
                "devmodel {device}: quitting the target QEMU failed: {error}",
                device=self.name,
                error=str(e),
            )
        finally:
            await client.close()

    def handleRequest(self, method: str, payload: dict[str, Any]) -> Deferred[dict]:
        return fail(UnknownDevice(f"devmodel device {self.name} answers no {method!r}"))


def _freeBytes(path: str) -> int:
    """Blocking: bytes available to unprivileged writers on ``path``'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _size(path: str | None) -> int:
    """Blocking: the size of ``path`` (0 if absent or None)."""
    try:
        return os.stat(path).st_size if path else 0
    except OSError:
        return 0


def _tail(path: str | None, start: int) -> str:
    """Blocking: what was appended to ``path`` after ``start``, as one line."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(max(start, os.fstat(f.fileno()).st_size - LOG_TAIL))
            text = f.read(LOG_TAIL).decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


# -- the plug-in ---------------------------------------------------------------------


@implementer(IPlugin, IDeviceKind)
class DevmodelKind:
    """
    QEMU's state through QMP: ``devmodel:NAME:qmp=PATH,target-qmp=PATH`` or
    ``devmodel:NAME:qmp=PATH,target-statefile=PATH`` (``xen=1``: device state
    only, for a Xen device model).
    """

    kind = KIND
    summary = "QEMU's device state, saved through QMP and loaded into a waiting QEMU"

    def source(self, spec: DeviceSpec, context: ISourceContext) -> DevmodelSource:
        return DevmodelSource(spec, context)

    def target(
        self, description: DeviceDescription, context: ITargetContext
    ) -> DevmodelTarget:
        return DevmodelTarget(description, context)


devmodelKind = DevmodelKind()
