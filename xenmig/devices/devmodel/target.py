"""
The ``devmodel`` device kind: QEMU's state, saved through QMP, loaded into a QEMU.

The target side; the source side is in L{source}, the plug-in in L{kind}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from xenmig.clients.qmp import QEMUMigrationFailed, QMPConnectionError
from xenmig.clients.qmpclient import QMPClient, connectQMP, qmpSession
from xenmig.devices.devmodel.feed import IncomingFeed
from xenmig.devices.devmodel.params import DevmodelParams
from xenmig.devices.devmodel.source import (
    MODE_MIGRATE,
    QMP_TIMEOUT,
    machineFacts,
    qemuVersion,
    whenFired,
)
from xenmig.devices.staging import StagedFile
from xenmig.errors import (
    CommitFailed,
    DeviceError,
    DeviceRefused,
    DigestMismatch,
    StreamError,
    UnknownDevice,
)
from xenmig.fs import freeBytes
from xenmig.interfaces import (
    IInstallingDevice,
    ITargetContext,
    ITargetDevice,
)
from xenmig.model import (
    ContentDigest,
    DeviceDescription,
)
from xenmig.records import DataRecord, EndRecord, Record, ZeroRecord

log = Logger()

#: How much of the target QEMU's log a refusal quotes.
LOG_TAIL = 4096
#: Seconds between two looks at a QEMU finishing its load, in the paused window.
LOAD_POLL = 0.01


def _versionTuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return ()


# -- the target ----------------------------------------------------------------------


@implementer(ITargetDevice, IInstallingDevice)
class DevmodelTarget:
    """
    With ``target-qmp``, feeds QEMU's stream to a QEMU waiting with
    ``-incoming defer`` as it arrives (L{IncomingFeed}), hashing it on the way;
    at finish the digest must match and QEMU must have loaded the state, paused:
    only then is the device READY.  QEMU stays paused until the toolstack
    resumes it after the commit.  A Xen device model's state (``xen=1``) is
    staged and verified whole before QEMU sees it.  With ``target-statefile``
    the state is staged and installed at the commit.
    """

    requestMethods: frozenset[str] = frozenset()

    def __init__(self, description: DeviceDescription, context: ITargetContext):
        self.description = description
        self.context = context
        self.name = description.name
        self.params = params = DevmodelParams.fromDescription(description)
        self.maxSize = params.maxSize
        self.timeout = params.targetTimeout
        self.overwrite = params.targetOverwrite
        # The source names these paths: like destinations, they must lie inside
        # this host's allowed roots (no connecting to, or quoting, anything else).
        self.qmpPath: str | None = None
        self.logPath: str | None = None
        self.destination: FilePath | None = None
        if params.targetQmp:
            self.qmpPath = context.resolveDestination(params.targetQmp).path
            if params.targetLog:
                self.logPath = context.resolveDestination(params.targetLog).path
        else:
            self.destination = context.resolveDestination(params.targetStatefile)
        self.staged: StagedFile | None = None
        self.loaded = False  # QEMU took (or began to take) the state
        self.loading: Deferred[Any] | None = None
        #: QEMU's stream goes to the waiting QEMU as it arrives.
        self.feeding = self.qmpPath is not None and params.mode == MODE_MIGRATE
        self.feed: IncomingFeed | None = None
        self.starting: Deferred[None] | None = None
        self.logStart = 0

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
            if self.feeding:
                return {"mode": "qmp"}
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
        free = await self.context.runInThread(freeBytes, where)
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
        params = self.params
        ours, theirs = qemuVersion(client.greeting), params.qemuVersion
        if _versionTuple(ours) < _versionTuple(theirs):
            raise DeviceRefused(
                f"{where} is version {ours}, older than the source's {theirs}: QEMU "
                f"migrates to the same or a newer version only"
            )
        if params.mode != MODE_MIGRATE:
            return
        facts = await machineFacts(client)
        machine = params.machine
        if machine and facts["machine"] and machine != facts["machine"]:
            raise DeviceRefused(
                f"{where} runs machine type {facts['machine']}, the source "
                f"{machine}: start it with the same -machine"
            )
        if params.memory and params.memory != facts["memory"]:
            raise DeviceRefused(
                f"{where} has {facts['memory']} bytes of RAM, the source "
                f"{params.memory}: start it with the same -m"
            )

    # receive and verify

    def receive(self, record: Record) -> Deferred[None] | None:
        if self.feeding:
            if isinstance(record, ZeroRecord):
                return fail(
                    StreamError(f"devmodel device {self.name}: a hole in QEMU's stream")
                )
            if isinstance(record, DataRecord):
                return Deferred.fromCoroutine(self._feed(record))
            return None
        if isinstance(record, DataRecord | ZeroRecord):
            assert self.staged is not None
            return self.staged.receive(record)
        return None

    async def _feed(self, record: DataRecord) -> None:
        if self.feed is None:
            self.starting = Deferred.fromCoroutine(self._startIncoming())
            await self.starting
        assert self.feed is not None
        if self.feed.offset + len(record.data) > self.maxSize:
            raise StreamError(
                f"devmodel device {self.name}: more than {self.maxSize} bytes of state"
            )
        try:
            await self.feed.write(record.offset, record.data)
        except StreamError:
            raise
        except DeviceError as e:
            raise DeviceError(await self._refusal(e, self.logStart))

    async def _startIncoming(self) -> None:
        """Give the waiting QEMU one end of a socketpair: it loads as data comes."""
        self.logStart = await self.context.runInThread(_size, self.logPath)
        feed, theirs = IncomingFeed.open(self.context.reactor, self.name)
        self.feed = feed
        try:
            self.loaded = True
            fd = theirs.fileno()
            await self._session(lambda client: client.startIncomingFromFD(fd))
        finally:
            theirs.close()  # QEMU holds its own
        log.info(
            "devmodel {device}: the target QEMU loads the state as it arrives",
            device=self.name,
        )

    def finish(self, end: EndRecord) -> Deferred[ContentDigest]:
        return Deferred.fromCoroutine(self._finish(end))

    async def _finish(self, end: EndRecord) -> ContentDigest:
        if self.feeding:
            return await self._finishFeed(end)
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

    async def _finishFeed(self, end: EndRecord) -> ContentDigest:
        if self.feed is None:
            raise StreamError(f"devmodel device {self.name}: the state was empty")
        digest = self.feed.digest()
        if (digest.size, digest.algorithm, digest.digest) != (
            end.size,
            end.algorithm,
            end.digest,
        ):
            raise DigestMismatch(
                f"devmodel device {self.name}: the state QEMU read does not match "
                f"the source's digest; that QEMU will not run"
            )
        self.feed.close()
        log.debug(
            "devmodel {device}: the stream's digest matches; awaiting QEMU's load",
            device=self.name,
        )
        self.loading = self._session(self._awaitLoad, self.timeout)
        try:
            status = await self.loading
        except DeviceError as e:
            raise DeviceError(await self._refusal(e, self.logStart))
        self._checkPaused(status)
        return digest

    async def _awaitLoad(self, client: QMPClient) -> str:
        # The VM is paused meanwhile: look often (QMP answers in well under 1 ms).
        client.pollInterval = LOAD_POLL
        return await client.awaitIncoming()

    def _checkPaused(self, status: str) -> None:
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
        self._checkPaused(status)
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
        log.debug("devmodel {device}: commit: is QEMU paused?", device=self.name)
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
        if self.feed is not None:
            self.feed.abort()  # QEMU's load fails: nothing more is coming
        if self.starting is not None and not self.starting.called:
            await whenFired(self.starting)
        if self.feeding and self.loading is not None and not self.loading.called:
            self.loading.cancel()  # a wait only: QEMU is quit below
        if self.loading is not None and not self.loading.called:
            # A load cannot be taken back: wait for it (it is bounded), then end it.
            await whenFired(self.loading)
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
