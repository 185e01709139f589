"""The ``disk`` device kind: raw and qcow2 images, sparse, with live pre-copy rounds."""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from xenmig.blockmap import (
    BLOCK_SIZE,
    BlockMap,
    BlockScan,
    BlockScanner,
    ContentStream,
    hashSparseFile,
)
from xenmig.errors import (
    BadSpec,
    DeviceError,
    DeviceRefused,
    PathNotAllowed,
    StreamError,
    XenmigError,
)
from xenmig.interfaces import (
    IDeviceKind,
    IRecordWriter,
    ISourceContext,
    ISourceDevice,
    ITargetContext,
    ITargetDevice,
)
from xenmig.model import ContentDigest, DeviceDescription, DeviceSpec, RoundResult
from xenmig.records import (
    DataRecord,
    EndRecord,
    MetadataRecord,
    Record,
    RoundRecord,
    ZeroRecord,
)
from xenmig.staging import StagedFile

log = Logger()
T = TypeVar("T")

KIND = "disk"
FORMATS = frozenset({"raw", "qcow2"})
YES = frozenset({"1", "yes", "true", "on"})
SOURCE_KEYS = frozenset({"path", "format"})
TARGET_KEYS = frozenset({"target", "target-overwrite"})
QCOW2_MAGIC = b"QFI\xfb"
#: magic, version, backing file offset and length, cluster bits, virtual size.
_QCOW2_HEADER = struct.Struct(">4sIQIIQ")
#: Blocks one thread reads and hashes at a time, and scans kept in flight.
BATCH_BLOCKS = 16
SCAN_DEPTH = 2
#: Space the target wants beyond the source's allocated size: a fixed amount plus a
#: fraction, for filesystem metadata and for blocks the guest allocates meanwhile.
SPACE_MARGIN = 16 * 1024 * 1024
SPACE_MARGIN_FRACTION = 32
#: Metadata key of the final round: every byte below this offset has been sent.
FINAL_THROUGH = "final_through"


@dataclass(frozen=True)
class ImageInfo:
    """What the first bytes of an image say about it."""

    format: str
    backing: str = ""
    virtualSize: int = 0


def probeImage(fd: int) -> ImageInfo:
    """Blocking: the format, backing file and virtual size of the image at ``fd``."""
    header = os.pread(fd, _QCOW2_HEADER.size, 0)
    if len(header) < _QCOW2_HEADER.size or header[:4] != QCOW2_MAGIC:
        return ImageInfo("raw")
    _, _, offset, length, _, virtualSize = _QCOW2_HEADER.unpack(header)
    backing = ""
    if offset and 0 < length <= 1023:
        backing = os.pread(fd, length, offset).decode("utf-8", "replace")
    return ImageInfo("qcow2", backing, virtualSize)


def growthLimit(size: int, info: ImageInfo) -> int:
    """
    The largest size the image may reach while the guest runs: a raw image keeps
    its size; a qcow2 container grows by at most every guest cluster once more,
    plus its metadata (L2 and refcount tables, at most 1/8 of that here).
    """
    if info.format != "qcow2":
        return size
    return size + info.virtualSize + info.virtualSize // 8 + 64 * 1024 * 1024


def freeBytes(path: str) -> int:
    """Blocking: bytes available to unprivileged writers on ``path``'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def spaceNeeded(allocated: int) -> int:
    """The free space the target asks for an image with ``allocated`` bytes."""
    return allocated + allocated // SPACE_MARGIN_FRACTION + SPACE_MARGIN


@dataclass(frozen=True)
class RoundStats:
    """What one round of one disk sent (the final round has ``final`` set)."""

    round: int
    final: bool
    dataBytes: int
    zeroBytes: int
    changedBlocks: int
    seconds: float


@dataclass
class _Tally:
    dataBytes: int = 0
    zeroBytes: int = 0
    changedBlocks: int = 0


@implementer(ISourceDevice)
class DiskSource:
    """
    Sends an image file read-only: a full sparse pass, rounds of changed blocks
    while the VM runs, and the last changes once it is paused.

    Changed blocks are found by comparing per-block digests (L{BlockMap}), so this
    works on any file, without help from the hypervisor.
    """

    precopy = True

    def __init__(
        self,
        spec: DeviceSpec,
        context: ISourceContext,
        blockSize: int = BLOCK_SIZE,
        batchBlocks: int = BATCH_BLOCKS,
        depth: int = SCAN_DEPTH,
    ) -> None:
        self.spec = spec
        self.context = context
        self.path = _sourceParams(spec)
        self.format = spec.params.get("format", "")
        self.blockSize = blockSize
        self.batchBlocks = batchBlocks
        self.depth = depth
        self.history: list[RoundStats] = []
        self._fd: int | None = None
        self._scanner: BlockScanner | None = None
        self._baseline = False
        self._busy: Deferred[Any] | None = None
        self._broken = ""
        self._threads: set[Deferred[Any]] = set()
        self._closed = False

    @property
    def _name(self) -> str:
        return f"device {self.spec.name}"

    def describe(self) -> Deferred[DeviceDescription]:
        return self._thread(self._describe)

    def _describe(self) -> DeviceDescription:
        st, info = self._open()
        scanner = self._scanner
        assert scanner is not None
        params: dict[str, Any] = {
            "format": info.format,
            "allocated": st.st_blocks * 512,
            "max_size": scanner.maxSize,
            "block_size": self.blockSize,
            **self.spec.targetParams,
        }
        if info.backing:
            params["backing"] = info.backing
        return DeviceDescription(KIND, self.spec.name, st.st_size, params, precopy=True)

    def _open(self) -> tuple[os.stat_result, ImageInfo]:
        """Blocking: open the image read-only (once) and check it."""
        if self._closed:
            raise DeviceError(f"{self._name}: the device was already released")
        fd = self._fd
        if fd is None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise DeviceError(
                    f"{self._name}: cannot open {self.path}: {e.strerror}"
                )
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DeviceError(f"{self._name}: {self.path} is not a regular file")
            info = probeImage(fd)
            if self.format == "qcow2" and info.format != "qcow2":
                raise DeviceError(f"{self._name}: {self.path} is not a qcow2 image")
        except BaseException:
            if self._fd is None:
                os.close(fd)
            raise
        # A raw image that happens to start like a qcow2 one is the user's call.
        info = dataclasses.replace(info, format=self.format or info.format)
        if self._fd is None:
            self._fd = fd
            self._scanner = BlockScanner(
                fd,
                BlockMap(st.st_size, self.blockSize),
                f"{self._name}: {self.path}",
                growable=info.format == "qcow2",
                maxSize=growthLimit(st.st_size, info),
            )
        return st, info

    def accepted(self, params: dict[str, Any]) -> None:
        log.debug(
            "disk {device} accepted by the target: {params}",
            device=self.spec.name,
            params=params,
        )

    def sendRound(self, writer: IRecordWriter, round: int) -> Deferred[RoundResult]:
        return self._start(self._sendRound(writer, round))

    async def _sendRound(self, writer: IRecordWriter, round: int) -> RoundResult:
        first = not self._baseline
        tally = await self._pass(writer, round, final=False, content=None)
        self._baseline = True
        # Until a round compares digests there is no measure of the rate of change:
        # the first full pass reports what it sent as the estimate.
        changed = tally.dataBytes + tally.zeroBytes
        remaining = tally.dataBytes if first else changed
        return RoundResult(tally.dataBytes, remaining)

    def sendFinal(self, writer: IRecordWriter) -> Deferred[ContentDigest]:
        return self._start(self._sendFinal(writer))

    async def _sendFinal(self, writer: IRecordWriter) -> ContentDigest:
        content = ContentStream()
        round = len([r for r in self.history if not r.final])
        await self._pass(writer, round, final=True, content=content)
        self._baseline = True
        digest = content.result()
        scanner = self._scanner
        assert scanner is not None
        # The guest is paused: the image may not have moved during the final pass.
        await self._thread(scanner.checkSize)
        return digest

    def _start(self, coroutine: Any) -> Deferred[Any]:
        refusal = ""
        if self._closed:
            refusal = "the device was already released or rolled back"
        elif self._busy is not None:
            refusal = "a round is already being sent"
        elif self._broken:
            refusal = f"an earlier round failed ({self._broken}); start over"
        if refusal:
            coroutine.close()
            return fail(DeviceError(f"{self._name}: {refusal}"))
        d = Deferred.fromCoroutine(coroutine)
        self._busy = d

        def done(result: object) -> object:
            self._busy = None
            if isinstance(result, Failure):
                # Digests were recorded for blocks that may never have arrived:
                # the block map no longer tells what the target holds.
                self._broken = result.getErrorMessage() or repr(result.value)
            return result

        return d.addBoth(done)

    async def _pass(
        self,
        writer: IRecordWriter,
        round: int,
        final: bool,
        content: ContentStream | None,
    ) -> _Tally:
        """Scan every block, send the changed ones; hash the content if asked."""
        await self._thread(self._open)
        scanner = self._scanner
        assert scanner is not None
        started = time.monotonic()
        await self._thread(scanner.startPass)
        count = scanner.blocks.count
        batches = deque(
            (first, min(first + self.batchBlocks, count))
            for first in range(0, count, self.batchBlocks)
        )
        pending: deque[Deferred[list[BlockScan]]] = deque()
        sender = _PieceSender(writer)
        # Content is hashed in the scanning thread, in offset order: one scan at a
        # time then (its records are still written while the next scan reads).
        depth = 1 if content is not None else self.depth
        # A final pass over blocks sent before tells the target how far it got, so
        # the target can hash the image behind it (a first pass arrives in order:
        # the target hashes it as it writes).
        marking = final and self._baseline

        def submit() -> None:
            first, last = batches.popleft()
            pending.append(self._thread(scanner.scan, first, last, content))

        try:
            while batches and len(pending) < depth:
                submit()
            while pending:
                scans = await pending.popleft()
                if batches:
                    submit()
                await sender.send(scans)
                if marking:
                    await sender.mark(scanner.blocks.blockRange(scans[-1].index)[1])
            await sender.flush()
        finally:
            for d in pending:
                d.addErrback(lambda _: None)
        tally = sender.tally
        self.history.append(
            RoundStats(
                round,
                final,
                tally.dataBytes,
                tally.zeroBytes,
                tally.changedBlocks,
                time.monotonic() - started,
            )
        )
        log.info(
            "disk {device} round {round}{final}: {data} data bytes, {zero} zero bytes "
            "in {blocks} changed blocks",
            device=self.spec.name,
            round=round,
            final=" (final)" if final else "",
            data=tally.dataBytes,
            zero=tally.zeroBytes,
            blocks=tally.changedBlocks,
        )
        return tally

    def _thread(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run ``function`` in the pool; the returned Deferred may be cancelled, but the
        image stays open until the thread is done with it.
        """
        work = self.context.runInThread(function, *args)
        self._threads.add(work)
        result: Deferred[T] = Deferred()

        def finished(outcome: object) -> object:
            self._threads.discard(work)
            return outcome

        work.addBoth(finished).chainDeferred(result)
        return result

    def rollback(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    def release(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        """Stop any round, wait for its threads, close the image (never modified)."""
        self._closed = True
        if self._busy is not None:
            self._busy.addErrback(lambda _: None)
            self._busy.cancel()
        while self._threads:
            await DeferredList(list(self._threads), consumeErrors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _PieceSender:
    """Writes the pieces of scanned blocks, joining adjacent zero pieces."""

    def __init__(self, writer: IRecordWriter) -> None:
        self.writer = writer
        self.tally = _Tally()
        self._zeroStart = 0
        self._zeroLength = 0

    async def send(self, scans: list[BlockScan]) -> None:
        for scan in scans:
            if scan.pieces:
                self.tally.changedBlocks += 1
            for piece in scan.pieces:
                if piece.data is None:
                    self.tally.zeroBytes += piece.length
                    end = self._zeroStart + self._zeroLength
                    if self._zeroLength and end == piece.offset:
                        self._zeroLength += piece.length
                        continue
                    await self.flush()
                    self._zeroStart, self._zeroLength = piece.offset, piece.length
                else:
                    await self.flush()
                    await self.writer.writeData(piece.offset, piece.data)
                    self.tally.dataBytes += piece.length

    async def mark(self, offset: int) -> None:
        """Tell the target that everything below ``offset`` has been sent."""
        await self.flush()
        await self.writer.writeMetadata({FINAL_THROUGH: offset})

    async def flush(self) -> None:
        if self._zeroLength:
            start, length = self._zeroStart, self._zeroLength
            self._zeroLength = 0
            await self.writer.writeZero(start, length)


def _sourceParams(spec: DeviceSpec) -> str:
    """Check a source spec; return the image path."""
    unknown = set(spec.params) - SOURCE_KEYS | set(spec.targetParams) - TARGET_KEYS
    if unknown:
        raise BadSpec(
            f"device {spec.name}: unknown disk parameter(s) "
            f"{', '.join(sorted(unknown))} (known: path, format, target, "
            f"target-overwrite)"
        )
    path = spec.params.get("path")
    if not path:
        raise BadSpec(f"device {spec.name}: the disk kind needs path=SOURCE_IMAGE")
    if not spec.targetParams.get("target"):
        raise BadSpec(f"device {spec.name}: the disk kind needs target=DESTINATION")
    if spec.params.get("format", "raw") not in FORMATS:
        raise BadSpec(f"device {spec.name}: format must be raw or qcow2")
    return path


@implementer(ITargetDevice)
class DiskTarget:
    """
    Receives an image into a staging file next to its destination, holes kept as
    holes; installs it by an atomic rename at commit.
    """

    requestMethods: frozenset[str] = frozenset()

    def __init__(self, description: DeviceDescription, context: ITargetContext) -> None:
        self.description = description
        self.context = context
        name = description.name
        params = description.params
        self.target = params.get("target")
        if not isinstance(self.target, str) or not self.target:
            raise BadSpec(f"device {name}: target=DESTINATION is missing")
        if params.get("format", "raw") not in FORMATS:
            raise BadSpec(
                f"device {name}: unsupported image format {params['format']!r}"
            )
        self.overwrite = str(params.get("target-overwrite", "")).lower() in YES
        self.maxSize = int(params.get("max_size", description.size))
        if self.maxSize < description.size:
            raise BadSpec(f"device {name}: max_size is below the image size")
        self.destination: FilePath | None = None
        self.staged: ImageStaging | None = None
        self.round = -1
        self.final = False

    @property
    def _name(self) -> str:
        return f"device {self.description.name}"

    def accept(self) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._accept())

    async def _accept(self) -> dict[str, Any]:
        assert isinstance(self.target, str)
        try:
            destination = self.context.resolveDestination(self.target)
        except PathNotAllowed as e:
            raise PathNotAllowed(f"{self._name}: {e}")
        directory = destination.dirname()
        if not self.overwrite and await self.context.runInThread(
            os.path.lexists, destination.path
        ):
            raise DeviceRefused(
                f"{self._name}: {destination.path} already exists; ask for "
                f"target-overwrite=yes to replace it"
            )
        await self._checkBacking(directory)
        allocated = int(self.description.params.get("allocated", self.description.size))
        need = spaceNeeded(allocated)
        free = await self.context.runInThread(freeBytes, directory)
        if need > free:
            raise DeviceRefused(
                f"{self._name}: not enough space in {directory}: {free} bytes free, "
                f"{need} needed (the image has {allocated} bytes allocated, plus a "
                f"margin); free space there or choose another destination"
            )
        staged = ImageStaging(
            self.context, self.context.stagingPathFor(destination), self.maxSize
        )
        try:
            await staged.open()
        except OSError as e:
            raise DeviceRefused(
                f"{self._name}: cannot create a staging file in {directory}: "
                f"{e.strerror}"
            )
        self.destination, self.staged = destination, staged
        return {"destination": destination.path, "free": free}

    async def _checkBacking(self, directory: str) -> None:
        backing = self.description.params.get("backing")
        if not backing:
            return
        path = os.path.join(directory, str(backing))
        if not await self.context.runInThread(os.path.exists, path):
            raise DeviceRefused(
                f"{self._name}: the image's backing file {backing!r} does not exist "
                f"here ({path}); migrate or provide it first"
            )

    def receive(self, record: Record) -> Deferred[None] | None:
        if isinstance(record, DataRecord | ZeroRecord):
            if self.staged is None:
                raise StreamError(f"{self._name}: a record arrived before accept")
            if record.offset < self.staged.finalThrough:
                raise StreamError(
                    f"{self._name}: a record at {record.offset} arrived below the "
                    f"final_through marker {self.staged.finalThrough}"
                )
            try:
                waiting = self.staged.receive(record)
            except XenmigError as e:
                raise _named(self._name, e)
            return waiting.addErrback(self._namedFailure) if waiting else None
        if isinstance(record, RoundRecord):
            self.round, self.final = record.round, record.final
            if record.round > 0 and self.staged is not None:
                self.staged.flushInBackground()
            return None
        if isinstance(record, MetadataRecord):
            through = record.metadata.get(FINAL_THROUGH)
            if self.final and self.staged is not None and isinstance(through, int):
                try:
                    self.staged.markFinal(through)
                except XenmigError as e:
                    raise _named(self._name, e)
            return None
        raise StreamError(f"{self._name}: unexpected {type(record).__name__}")

    def finish(self, end: EndRecord) -> Deferred[ContentDigest]:
        if self.staged is None:
            raise StreamError(f"{self._name}: the stream ended before accept")
        if end.size > self.maxSize:
            raise StreamError(
                f"{self._name}: the source sent {end.size} bytes, at most "
                f"{self.maxSize} were declared"
            )
        d = Deferred.fromCoroutine(self.staged.finishAt(end.size))
        return d.addErrback(self._namedFailure)

    def commit(self) -> Deferred[list[str]]:
        return Deferred.fromCoroutine(self._commit())

    async def _commit(self) -> list[str]:
        assert self.staged is not None and self.destination is not None
        await self.staged.install(self.destination, self.overwrite)
        return [self.destination.path]

    def abort(self) -> Deferred[None]:
        staged, self.staged = self.staged, None
        if staged is None:
            return succeed(None)
        return Deferred.fromCoroutine(staged.discard())

    def handleRequest(self, method: str, payload: dict[str, Any]) -> Deferred[dict]:
        return fail(DeviceError(f"{self._name}: the disk kind answers no requests"))

    def _namedFailure(self, failure: Failure) -> Failure:
        if isinstance(failure.value, XenmigError):
            return Failure(_named(self._name, failure.value))
        return failure


class ImageStaging(StagedFile):
    """
    A L{StagedFile} for images received in rounds.

    - Its final size arrives with the END record: a qcow2 container grows while
      the guest runs, so it is staged at its growth limit and cut at the end.
    - Rounds rewrite earlier blocks, so the content must be hashed again from the
      file.  The final round comes in offset order with C{final_through} markers:
      everything below a marker is final, and is hashed in the background while
      the rest arrives, so little is left to hash once END arrives.
    - Each pre-copy round is fsynced in the background as the next one starts.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.content: ContentStream | None = None
        self.finalThrough = 0
        self._hashing: Deferred[None] | None = None
        self._flushing: Deferred[None] | None = None
        self._reader: int | None = None  # the staged file is open write-only

    def _hashThrough(self, stop: int) -> None:
        """Blocking: hash the staged content up to ``stop``."""
        assert self.content is not None
        if self._reader is None:
            self._reader = os.open(self.path.path, os.O_RDONLY | os.O_CLOEXEC)
        self.content.hashFile(self._reader, stop)

    def _closeReader(self) -> None:
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None

    def markFinal(self, offset: int) -> None:
        """Everything below ``offset`` is final: hash it in the background."""
        if offset < self.finalThrough or offset > self.size:
            raise StreamError(f"final_through marker {offset} is out of order")
        self.finalThrough = offset
        if self.content is None:
            self.content = ContentStream()
        if self._hashing is None:
            self._hashing = Deferred.fromCoroutine(self._hashAhead())

    async def _hashAhead(self) -> None:
        content = self.content
        assert content is not None
        try:
            while content.position < self.finalThrough and self._failure is None:
                through = self.finalThrough
                await self._idle()  # the records before the marker are written
                if self._fd is None or self._failure is not None:
                    break
                await self.context.runInThread(self._hashThrough, through)
        finally:
            self._hashing = None

    def flushInBackground(self) -> None:
        """Start writing what arrived so far to disk, so the last fsync is short."""
        if self._flushing is not None or self._fd is None or self._failure:
            return
        flushing = self.context.runInThread(os.fsync, self._fd)

        def done(result: object) -> None:
            self._flushing = None

        self._flushing = flushing.addBoth(done)

    async def _quiet(self) -> None:
        """Wait for background hashing and flushing to let go of the file."""
        while self._hashing is not None or self._flushing is not None:
            for work in (self._hashing, self._flushing):
                if work is not None:
                    await DeferredList([work], consumeErrors=True)

    async def finishAt(self, size: int) -> ContentDigest:
        """Write out the queue, cut to ``size``, fsync; the staged content digest."""
        await self._idle()
        await self._quiet()
        if self._failure is not None:
            self._failure.raiseException()
        await self.context.runInThread(self._cut, size)
        self.size = size
        content = self.content
        if content is not None and content.position <= size:
            try:
                await self.context.runInThread(self._hashThrough, size)
            finally:
                self._closeReader()
            return content.result()
        if self.hasher.sequential and self.hasher.position <= size:
            return self.hasher.result(size)
        return await self.context.runInThread(hashSparseFile, self.path.path, size)

    def _cut(self, size: int) -> None:
        fd = self._fd
        assert fd is not None
        os.ftruncate(fd, size)
        os.fsync(fd)

    async def discard(self) -> None:
        self._failure = self._failure or Failure(DeviceError("staging discarded"))
        await self._quiet()
        self._closeReader()
        await super().discard()


def _named(name: str, error: XenmigError) -> XenmigError:
    """``error`` with the device named in its message (same class)."""
    message = str(error)
    if message.startswith(name):
        return error
    return type(error)(f"{name}: {message}")


@implementer(IPlugin, IDeviceKind)
class DiskKind:
    """
    Raw and qcow2 images, live:
    ``disk:NAME:path=SRC,target=DST[,format=raw|qcow2][,target-overwrite=yes]``.
    """

    kind = KIND
    summary = "raw and qcow2 disk images, sparse, with live pre-copy rounds"

    def source(self, spec: DeviceSpec, context: ISourceContext) -> DiskSource:
        return DiskSource(spec, context)

    def target(
        self, description: DeviceDescription, context: ITargetContext
    ) -> DiskTarget:
        return DiskTarget(description, context)


diskKind = DiskKind()
