"""
An example device kind, ``counter``: the small JSON state file of a toy device.

The source takes the state out (and freezes the toy device with a marker file),
the target checks it is a JSON object of integer counters, stages it, and installs
it atomically at commit.  ``doc/handlers.md`` walks through it; ``tests/test_docs.py``
runs it source to target, with the fakes and through a daemon.

Device spec: ``counter:NAME:path=SOURCE_FILE,target=DESTINATION``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.plugin import IPlugin
from twisted.python.filepath import FilePath
from zope.interface import implementer

from xenmig.digest import hashBytes
from xenmig.errors import (
    CommitFailed,
    DeviceError,
    DeviceRefused,
    StreamError,
    UnknownDevice,
)
from xenmig.fs import fsyncDirectory
from xenmig.interfaces import (
    IDeviceKind,
    IRecordWriter,
    ISourceContext,
    ISourceDevice,
    ITargetContext,
    ITargetDevice,
)
from xenmig.model import ContentDigest, DeviceDescription, DeviceSpec, RoundResult
from xenmig.params import DeviceParams, Where, key, text, whole
from xenmig.records import DataRecord, EndRecord, MetadataRecord, Record, ZeroRecord

#: The layout of the state this code writes and reads.
FORMAT = 1
#: The largest state a target takes (it holds the state in memory).
MAX_STATE = 1024 * 1024
#: The size of one DATA record.
CHUNK = 64 * 1024


def parseState(data: bytes, where: str, error: type[Exception]) -> dict[str, int]:
    """The counters in ``data``, or ``error`` naming ``where``."""
    try:
        state = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{where}: the state is not JSON ({e})")
    if not isinstance(state, dict) or not all(
        isinstance(value, int) for value in state.values()
    ):
        raise error(f"{where}: the state is not an object of integer counters")
    return state


@dataclass(frozen=True)
class CounterParams(DeviceParams):
    """
    ``counter:NAME:path=SOURCE_FILE,target=DESTINATION``, and the state format
    the source declares: one record, parsed by both sides, unknown keys refused.
    """

    KIND = "counter"

    path: str = key("path", text, "", required=True, usage="path=FILE")
    target: str = key("target", text, "", required=True, usage="target=DEST")
    format: int = key("format", whole, 0, where=Where.DESCRIPTION)


# -- the source side ------------------------------------------------------------------


@implementer(ISourceDevice)
class CounterSource:
    """Takes the toy device's state file out; freezes the device while it does."""

    precopy = False  # small state: everything goes in the final round

    def __init__(self, spec: DeviceSpec, context: ISourceContext) -> None:
        self.spec = spec
        self.context = context
        self.path = path = CounterParams.fromSpec(spec).path  # or BadSpec
        self.marker = path + ".migrating"  # the toy device stops while it exists
        self.destination = ""

    def describe(self) -> Deferred[DeviceDescription]:
        return self.context.runInThread(self._describe)

    def _describe(self) -> DeviceDescription:
        # Blocking: runs in the thread pool.
        data = self._read()
        parseState(data, f"device {self.spec.name}", DeviceError)
        params = {"format": FORMAT}
        return DeviceDescription("counter", self.spec.name, len(data), params)

    def accepted(self, params: dict[str, Any]) -> None:
        self.destination = params["destination"]

    def sendRound(self, writer: IRecordWriter, round: int) -> Deferred[RoundResult]:
        raise NotImplementedError("the counter kind has no pre-copy rounds")

    def sendFinal(self, writer: IRecordWriter) -> Deferred[ContentDigest]:
        return Deferred.fromCoroutine(self._sendFinal(writer))

    async def _sendFinal(self, writer: IRecordWriter) -> ContentDigest:
        limits = await self.context.callPeer("limits", {})
        data = await self.context.runInThread(self._freeze)
        if len(data) > limits["max-size"]:
            raise DeviceError(
                f"device {self.spec.name}: {len(data)} bytes of state, the target "
                f"takes at most {limits['max-size']}"
            )
        await writer.writeMetadata({"format": FORMAT})
        for offset in range(0, len(data), CHUNK):
            # Await every write: the writer's Deferred is the backpressure.
            await writer.writeData(offset, data[offset : offset + CHUNK])
        return hashBytes(data)

    def _freeze(self) -> bytes:
        try:
            with open(self.marker, "x"):
                pass
        except FileExistsError:
            raise DeviceError(f"device {self.spec.name}: {self.marker} exists")
        return self._read()

    def _read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return f.read(MAX_STATE + 1)
        except OSError as e:
            raise DeviceError(f"device {self.spec.name}: {self.path}: {e.strerror}")

    def rollback(self) -> Deferred[None]:
        # After an abort, at any point (even before sendFinal): thaw the device.
        return self.context.runInThread(_removeIfExists, self.marker)

    def release(self) -> Deferred[None]:
        # After the commit: the state now lives on the target.
        return self.context.runInThread(self._release)

    def _release(self) -> None:
        os.replace(self.path, self.path + ".migrated")
        _removeIfExists(self.marker)


# -- the target side ------------------------------------------------------------------


@implementer(ITargetDevice)
class CounterTarget:
    """Receives the state in memory, verifies it, stages it; installs at commit."""

    requestMethods = frozenset({"limits"})

    def __init__(self, description: DeviceDescription, context: ITargetContext) -> None:
        self.description = description
        self.context = context
        self.where = f"device {description.name}"
        self.params = CounterParams.fromDescription(description)  # or BadSpec
        # Raises PathNotAllowed, which refuses the device at Prepare.
        self.destination: FilePath = context.resolveDestination(self.params.target)
        self.staged: FilePath | None = None
        self.state = bytearray()
        self.aborted = False

    def accept(self) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._accept())

    async def _accept(self) -> dict[str, Any]:
        if self.params.format != FORMAT:
            raise DeviceRefused(
                f"{self.where}: state format {self.params.format} is unknown here "
                f"(this host reads format {FORMAT})"
            )
        if self.description.size > MAX_STATE:
            raise DeviceRefused(f"{self.where}: state larger than {MAX_STATE} bytes")
        path = self.destination.path
        if await self.context.runInThread(os.path.lexists, path):
            raise DeviceRefused(f"{self.where}: {path} already exists")
        self.staged = self.context.stagingPathFor(self.destination)
        return {"destination": path}

    def receive(self, record: Record) -> Deferred[None] | None:
        match record:
            case MetadataRecord(metadata) if metadata.get("format") != FORMAT:
                raise StreamError(f"{self.where}: unexpected metadata {metadata}")
            case DataRecord(offset, data):
                self._put(offset, data)
            case ZeroRecord(offset, length):
                self._put(offset, bytes(length))
        return None  # held in memory: the stream never needs to wait

    def _put(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > MAX_STATE:
            raise StreamError(f"{self.where}: state beyond {MAX_STATE} bytes")
        if end > len(self.state):
            self.state.extend(bytes(end - len(self.state)))
        self.state[offset:end] = data

    def finish(self, end: EndRecord) -> Deferred[ContentDigest]:
        return Deferred.fromCoroutine(self._finish(end))

    async def _finish(self, end: EndRecord) -> ContentDigest:
        if end.size > MAX_STATE or len(self.state) > end.size:
            raise StreamError(f"{self.where}: {end.size} bytes announced, more sent")
        data = bytes(self.state).ljust(end.size, b"\0")
        parseState(data, self.where, StreamError)
        assert self.staged is not None
        await self.context.runInThread(_writeDurably, self.staged.path, data)
        if self.aborted:  # abort() came while we wrote: leave nothing behind
            await self.context.runInThread(_removeIfExists, self.staged.path)
            raise StreamError(f"{self.where}: aborted while staging")
        return hashBytes(data)  # the framework compares it with the END record

    def commit(self) -> Deferred[list[str]]:
        assert self.staged is not None
        d = self.context.runInThread(_install, self.staged, self.destination)
        return d.addCallback(lambda _: [self.destination.path])

    def abort(self) -> Deferred[None]:
        self.aborted = True
        if self.staged is None:
            return succeed(None)
        return self.context.runInThread(_removeIfExists, self.staged.path)

    def handleRequest(self, method: str, payload: dict[str, Any]) -> Deferred[dict]:
        if method != "limits":
            raise UnknownDevice(f"{self.where}: no request method {method!r}")
        return succeed({"max-size": MAX_STATE})


def _writeDurably(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(staged: FilePath, destination: FilePath) -> None:
    try:
        os.link(staged.path, destination.path)  # never replaces an existing file
    except OSError as e:
        raise CommitFailed(f"installing {destination.path} failed: {e.strerror}")
    os.unlink(staged.path)
    fsyncDirectory(destination.dirname())


def _removeIfExists(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- the kind: what the dropin registers -----------------------------------------------


@implementer(IPlugin, IDeviceKind)
class CounterKind:
    """The toy device's counters: ``counter:NAME:path=SRC,target=DST``."""

    kind = "counter"
    summary = "a toy device's JSON counters, verified and installed atomically"

    def source(self, spec: DeviceSpec, context: ISourceContext) -> CounterSource:
        return CounterSource(spec, context)

    def target(
        self, description: DeviceDescription, context: ITargetContext
    ) -> CounterTarget:
        return CounterTarget(description, context)


counterKind = CounterKind()
