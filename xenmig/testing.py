"""
Fakes for tests of device handlers and of one layer of xenmig.

Handler authors use them to drive a source and a target device against each
other without a daemon: L{PipeWriter} hands every record the source writes
straight to the target device, with its backpressure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import alsoProvides, implementer

from xenmig.destinations import resolveDestination
from xenmig.fs import InstallAs
from xenmig.interfaces import (
    IDeviceKind,
    IRecordWriter,
    ISourceContext,
    ISourceDevice,
    IStagelessDevice,
    ITargetContext,
    ITargetDevice,
)
from xenmig.model import ContentDigest, DeviceDescription, DeviceSpec
from xenmig.records import (
    DataRecord,
    EndRecord,
    MetadataRecord,
    Record,
    RoundRecord,
    ZeroRecord,
)


def _runner(reactor: Any) -> Callable[..., Deferred[Any]]:
    def run(function: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        return deferToThreadPool(
            reactor, reactor.getThreadPool(), function, *args, **kw
        )

    return run


@dataclass
class ThreadCall:
    """One call handed to L{SteppedThreads}: what to run, and who waits for it."""

    function: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    deferred: Deferred[Any] = field(default_factory=Deferred)

    @property
    def name(self) -> str:
        """The called function's name (``fsync``, ``_writeBatch``): what tests match."""
        return str(getattr(self.function, "__name__", repr(self.function)))


class SteppedThreads:
    """
    A ``runInThread`` whose calls wait until the test runs them: a thread pool
    stepped by hand, for deterministic interleavings of the reactor and its
    threads (no sleeps, no timing).

    A call runs, and its result or failure reaches its Deferred, when the test
    says so (L{run}, L{runAll}); until then it waits in L{waiting}, in the
    order it was made.  L{failNext} makes the next call of a function fail
    instead of running (a full disk on cue); L{crash} forgets every waiting
    call, as a killed process does: they never run and their Deferreds never
    fire.  L{ran} lists the calls in the order they ran.  A waiting call's
    Deferred can be cancelled (it fails with CancelledError at once, as
    ``deferToThreadPool``'s does) but the call still runs when stepped.
    """

    def __init__(self) -> None:
        self.waiting: list[ThreadCall] = []
        self.ran: list[ThreadCall] = []
        self._faults: dict[str, list[BaseException]] = {}

    def __call__(
        self, function: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Deferred[Any]:
        call = ThreadCall(function, args, kwargs)
        self.waiting.append(call)
        return call.deferred

    @property
    def names(self) -> list[str]:
        """The names of the waiting calls, oldest first."""
        return [call.name for call in self.waiting]

    def run(self, name: str | None = None) -> ThreadCall:
        """
        Run the oldest waiting call (of the function ``name``, if given) and
        hand its outcome to its Deferred; the call.

        @raise LookupError: if no such call waits.
        """
        call = next((c for c in self.waiting if name is None or c.name == name), None)
        if call is None:
            raise LookupError(f"no waiting call of {name or 'anything'}")
        self.waiting.remove(call)
        self.ran.append(call)
        faults = self._faults.get(call.name)
        try:
            if faults:
                raise faults.pop(0)
            result = call.function(*call.args, **call.kwargs)
        except BaseException:
            call.deferred.errback(Failure())
        else:
            call.deferred.callback(result)
        return call

    def runAll(self, limit: int = 100_000) -> int:
        """
        Run waiting calls, those they start too, until none waits; how many ran.

        @raise RuntimeError: if more than ``limit`` ran (work that never ends).
        """
        count = 0
        while self.waiting:
            if count == limit:
                raise RuntimeError(f"{limit} thread calls and still more waiting")
            self.run()
            count += 1
        return count

    @property
    def cued(self) -> list[str]:
        """The names of the functions whose next call will fail."""
        return [name for name, faults in self._faults.items() if faults]

    def failNext(self, name: str, error: BaseException) -> None:
        """Make the next call of the function ``name`` raise ``error`` instead."""
        self._faults.setdefault(name, []).append(error)

    def crash(self) -> list[ThreadCall]:
        """Forget every waiting call (and fault): what was lost."""
        lost, self.waiting = self.waiting, []
        self._faults.clear()
        return lost


@implementer(ISourceContext)
class FakeSourceContext:
    """A source context on the real reactor's thread pool; peer calls are scripted."""

    def __init__(
        self,
        reactor: Any,
        migrationId: str = "test-migration",
        domain: str = "vm",
        peer: Callable[[str, dict[str, Any]], Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.migrationId = migrationId
        self.domain = domain
        self.runInThread = _runner(reactor)
        self._peer = peer

    def callPeer(self, method: str, payload: dict[str, Any]) -> Deferred[dict]:
        if self._peer is None:
            raise NotImplementedError("no peer in this fake")
        return maybeDeferred(self._peer, method, payload)


@implementer(ITargetContext)
class FakeTargetContext:
    """A target context with real directories: a staging dir and allowed roots."""

    def __init__(
        self,
        reactor: Any,
        roots: list[str],
        stagingDir: str | None = None,
        migrationId: str = "test-migration",
        domain: str = "vm",
        peer: str = "source.test",
        installAs: InstallAs | None = None,
    ) -> None:
        self.reactor = reactor
        self.migrationId = migrationId
        self.domain = domain
        self.peer = peer
        self.roots = [FilePath(r) for r in roots]
        self.stagingDir = FilePath(stagingDir or tempfile.mkdtemp(prefix="staging-"))
        self.stagingDir.makedirs(ignoreExistingDirectory=True)
        self.externalStaging: list[str] = []
        self.runInThread = _runner(reactor)
        self.installAs = installAs or InstallAs()

    def resolveDestination(self, path: str) -> FilePath:
        return resolveDestination(path, self.roots)

    def stagingPathFor(self, destination: FilePath, suffix: str = "") -> FilePath:
        same = (
            os.stat(self.stagingDir.path).st_dev
            == os.stat(destination.dirname()).st_dev
        )
        if same:
            return self.stagingDir.child(destination.basename() + suffix + ".part")
        path = destination.sibling(f".{destination.basename()}{suffix}.part")
        self.externalStaging.append(path.path)
        return path

    def cleanup(self) -> None:
        """Remove the staging directory, as the framework does after a session."""
        shutil.rmtree(self.stagingDir.path, ignore_errors=True)
        for path in self.externalStaging:
            if os.path.exists(path):
                os.unlink(path)


@implementer(IRecordWriter)
class MemoryWriter:
    """Collects records in a list (small states only)."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.bytesWritten = 0

    def writeData(self, offset: int, data: bytes) -> Deferred[None]:
        self.bytesWritten += len(data)
        self.records.append(DataRecord(offset, bytes(data)))
        return succeed(None)

    def writeZero(self, offset: int, length: int) -> Deferred[None]:
        self.bytesWritten += length
        self.records.append(ZeroRecord(offset, length))
        return succeed(None)

    def writeMetadata(self, metadata: dict[str, Any]) -> Deferred[None]:
        self.records.append(MetadataRecord(dict(metadata)))
        return succeed(None)


@implementer(IRecordWriter)
class PipeWriter:
    """
    Hands each record straight to a target device, waiting when it asks to:
    a stream without the network, for handler tests.
    """

    def __init__(self, target: ITargetDevice) -> None:
        self.target = target
        self.bytesWritten = 0
        self.dataBytes = 0
        self.records = 0

    def _deliver(self, record: Record) -> Deferred[None]:
        self.records += 1
        waiting = self.target.receive(record)
        return waiting if waiting is not None else succeed(None)

    def writeData(self, offset: int, data: bytes) -> Deferred[None]:
        self.bytesWritten += len(data)
        self.dataBytes += len(data)
        return self._deliver(DataRecord(offset, bytes(data)))

    def writeZero(self, offset: int, length: int) -> Deferred[None]:
        self.bytesWritten += length
        return self._deliver(ZeroRecord(offset, length))

    def writeMetadata(self, metadata: dict[str, Any]) -> Deferred[None]:
        return self._deliver(MetadataRecord(dict(metadata)))

    def writeRound(self, round: int, final: bool) -> Deferred[None]:
        return self._deliver(RoundRecord(round, final))

    def finish(self, digest: ContentDigest) -> Deferred[ContentDigest]:
        """Send the END record; the target's digest (compare it with ``digest``)."""
        return self.target.finish(
            EndRecord(digest.size, digest.algorithm, digest.digest)
        )


def requirePrograms(*names: str) -> None:
    """
    In a test: skip when one of the external programs ``names`` is missing, with
    the reason; under CI (``CI=true``) fail instead, since CI must install them.
    """
    import pytest

    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    message = f"needs {', '.join(missing)} (install: see scripts/bootstrap)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI must have every program: " + message)
    pytest.skip(message)


@implementer(ITargetDevice)
class MemoryTarget:
    """A target device that keeps the state in memory: for tests of the framework."""

    requestMethods = frozenset({"echo"})

    def __init__(self, description: Any, context: Any = None) -> None:
        self.description = description
        self.context = context
        self.data = bytearray(description.size)
        self.records: list[Record] = []
        self.hold: Deferred[None] | None = None
        self.failCommit: Exception | None = None
        self.committed = False
        self.aborted = False
        self.refuse: str | None = description.params.get("refuse")
        if description.params.get("stageless"):
            alsoProvides(self, IStagelessDevice)

    def accept(self) -> Deferred[dict[str, Any]]:
        if self.refuse:
            from xenmig.errors import DeviceRefused

            raise DeviceRefused(self.refuse)
        return succeed({"accepted-by": "memory"})

    def receive(self, record: Record) -> Deferred[None] | None:
        self.records.append(record)
        if isinstance(record, DataRecord):
            end = record.offset + len(record.data)
            if end > len(self.data):
                from xenmig.errors import StreamError

                raise StreamError(f"{end} bytes exceed the declared size")
            self.data[record.offset : end] = record.data
        return self.hold

    def finish(self, end: EndRecord) -> Deferred[ContentDigest]:
        from xenmig.digest import hashBytes

        return succeed(hashBytes(bytes(self.data)))

    def commit(self) -> Deferred[list[str]]:
        if self.failCommit is not None:
            raise self.failCommit
        self.committed = True
        return succeed([f"memory:{self.description.name}"])

    def abort(self) -> Deferred[None]:
        self.aborted = True
        return succeed(None)

    def handleRequest(self, method: str, payload: dict[str, Any]) -> Deferred[dict]:
        return succeed({"echo": payload})


@implementer(ISourceDevice)
class MemorySource:
    """A source device whose state is the text of its ``data=`` parameter."""

    precopy = False

    def __init__(self, spec: DeviceSpec, context: Any = None) -> None:
        self.spec = spec
        self.context = context
        self.data = spec.params.get("data", "").encode()
        self.rolledBack = False
        self.released = False
        self.peerParams: dict[str, Any] | None = None

    def describe(self) -> Deferred[DeviceDescription]:
        return succeed(DeviceDescription("memory", self.spec.name, len(self.data)))

    def accepted(self, params: dict[str, Any]) -> None:
        self.peerParams = params

    def sendRound(self, writer: IRecordWriter, round: int) -> Deferred[Any]:
        raise NotImplementedError("no pre-copy")

    def sendFinal(self, writer: IRecordWriter) -> Deferred[ContentDigest]:
        return Deferred.fromCoroutine(self._send(writer))

    async def _send(self, writer: IRecordWriter) -> ContentDigest:
        from xenmig.digest import hashBytes

        for offset in range(0, len(self.data), 4096):
            await writer.writeData(offset, self.data[offset : offset + 4096])
        return hashBytes(self.data)

    def rollback(self) -> Deferred[None]:
        self.rolledBack = True
        return succeed(None)

    def release(self) -> Deferred[None]:
        self.released = True
        return succeed(None)


@implementer(IDeviceKind)
class MemoryKind:
    """The ``memory`` kind: not a plug-in; tests hand it to clients and targets."""

    kind = "memory"
    summary = "state held in memory, for tests"

    def __init__(self) -> None:
        self.sources: list[MemorySource] = []
        self.targets: list[MemoryTarget] = []

    def source(self, spec: DeviceSpec, context: Any) -> MemorySource:
        device = MemorySource(spec, context)
        self.sources.append(device)
        return device

    def target(self, description: DeviceDescription, context: Any) -> MemoryTarget:
        device = MemoryTarget(description, context)
        self.targets.append(device)
        return device
