"""The source side of the ``disk`` kind: block scans, rounds and the final pass."""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig.devices.disk.blockmap import BLOCK_SIZE, BlockMap, BlockScan, BlockScanner
from xenmig.devices.disk.leaves import LEAF_SIZE, available
from xenmig.devices.disk.params import KIND, DiskParams
from xenmig.devices.disk.qemudirty import QEMUDirtyBitmap
from xenmig.devices.disk.reflinkdirty import IQuiescedDirtyBlocks, ReflinkSnapshots
from xenmig.errors import DeviceError
from xenmig.interfaces import (
    IDirtyBlocks,
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
from xenmig.threads import ThreadCalls

log = Logger()

QCOW2_MAGIC = b"QFI\xfb"
#: magic, version, backing file offset and length, cluster bits, virtual size.
_QCOW2_HEADER = struct.Struct(">4sIQIIQ")
#: Blocks one thread call scans at most, the changed data it may hold before it
#: returns early, and the calls kept in flight.  Few calls for a pass that finds
#: little (each one costs a round trip through a busy reactor), bounded memory
#: for one that finds much.
BATCH_BLOCKS = 128
BATCH_BYTES = 16 * 1024 * 1024
SCAN_DEPTH = 2
#: Bytes per bit of QEMU's dirty bitmap (``qmp=``): the final round sends only
#: the written 64 KiB pieces of a changed block, not all of its 1 MiB.
DIRTY_GRANULARITY = 64 * 1024


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


@dataclass(frozen=True)
class RoundStats:
    """What one round of one disk sent (the final round has ``final`` set)."""

    round: int
    final: bool
    dataBytes: int
    zeroBytes: int
    changedBlocks: int
    seconds: float
    #: Blocks read and hashed: all of them, or those a dirty-block source named.
    scannedBlocks: int = 0


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
    works on any file, without help from the hypervisor.  With a dirty-block
    source (L{IDirtyBlocks}: ``qmp=SOCKET``, QEMU's dirty bitmaps, or
    ``reflink=1``, snapshots on a filesystem with reflinks) rounds after the
    first read only the blocks it names.
    """

    precopy = True

    def __init__(
        self,
        spec: DeviceSpec,
        context: ISourceContext,
        blockSize: int = BLOCK_SIZE,
        batchBlocks: int = BATCH_BLOCKS,
        depth: int = SCAN_DEPTH,
        batchBytes: int = BATCH_BYTES,
        dirty: IDirtyBlocks | None = None,
    ) -> None:
        self.spec = spec
        self.context = context
        params = DiskParams.fromSpec(spec)
        self.path = params.path
        if dirty is None and params.reflink:
            dirty = ReflinkSnapshots(self.path, context.runInThread)
        elif dirty is None and params.qmp:
            dirty = QEMUDirtyBitmap(
                context.reactor,
                params.qmp,
                self.path,
                node=params.qmpNode,
                granularity=min(DIRTY_GRANULARITY, blockSize),
            )
        self.dirty = dirty
        self._tracking = False
        self.format = params.format
        self.blockSize = blockSize
        self.batchBlocks = batchBlocks
        self.batchBytes = batchBytes
        self.depth = depth
        self.history: list[RoundStats] = []
        self._fd: int | None = None
        self._scanner: BlockScanner | None = None
        self._baseline = False
        self._busy: Deferred[Any] | None = None
        self._broken = ""
        self._threads = ThreadCalls(context.runInThread)
        self._closed = False

    @property
    def _name(self) -> str:
        return f"device {self.spec.name}"

    def describe(self) -> Deferred[DeviceDescription]:
        return self._threads.run(self._describe)

    def _describe(self) -> DeviceDescription:
        st, info = self._open()
        scanner = self._scanner
        assert scanner is not None
        params: dict[str, Any] = {
            "format": info.format,
            "allocated": st.st_blocks * 512,
            "max_size": scanner.maxSize,
            "block_size": self.blockSize,
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
        # A target that keeps leaf tables says so (older ones say nothing): with
        # a dirty-block source, rounds after the first then send changed leaves.
        leafBlocks = params.get("leaf_blocks")
        scanner = self._scanner
        if (
            scanner is not None
            and self.dirty is not None
            and available()
            and params.get("leaf_size") == LEAF_SIZE
            and isinstance(leafBlocks, int)
            and leafBlocks > 0
        ):
            scanner.blocks.leaves.limit(leafBlocks)
            scanner.leafy = scanner.blocks.leaves.most > 0
        log.debug(
            "disk {device} accepted by the target: {params}",
            device=self.spec.name,
            params=params,
        )

    def sendRound(self, writer: IRecordWriter, round: int) -> Deferred[RoundResult]:
        return self._start(self._sendRound(writer, round))

    async def _sendRound(self, writer: IRecordWriter, round: int) -> RoundResult:
        first = not self._baseline
        scanner = self._scanner
        if first and scanner is not None and scanner.leafy:
            # The target offered leaf tables: both sides keep them from now on.
            await writer.writeMetadata({"leaf_size": LEAF_SIZE})
        tally = await self._pass(writer, round, final=False)
        self._baseline = True
        if self._tracking and IQuiescedDirtyBlocks.providedBy(self.dirty):
            # While the VM runs: so that the paused window finds little to do.
            await self.dirty.settle()
        # Until a round compares digests there is no measure of the rate of change:
        # the first full pass reports what it sent as the estimate.
        changed = tally.dataBytes + tally.zeroBytes
        remaining = tally.dataBytes if first else changed
        return RoundResult(tally.dataBytes, remaining)

    def sendFinal(self, writer: IRecordWriter) -> Deferred[ContentDigest]:
        return self._start(self._sendFinal(writer))

    async def _sendFinal(self, writer: IRecordWriter) -> ContentDigest:
        round = len([r for r in self.history if not r.final])
        await self._pass(writer, round, final=True)
        self._baseline = True
        # The image's mode travels with it (older targets ignore it).
        st = await self._threads.run(os.fstat, self._fd)
        await writer.writeMetadata({"mode": stat.S_IMODE(st.st_mode)})
        scanner = self._scanner
        assert scanner is not None
        # The guest is paused: the image may not have moved during the final pass.
        await self._threads.run(scanner.checkUntouched)
        # Every block's digest is now the one of its content at the pause, as the
        # target holds it: the content digest is the tree over them.
        return scanner.blocks.contentDigest()

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
    ) -> _Tally:
        """Scan every block and send the changed ones, in offset order."""
        await self._threads.run(self._open)
        scanner = self._scanner
        assert scanner is not None
        started = time.monotonic()
        # The pass's size and modification time first: in the final round, a
        # write that lands while the changes are being found then fails the
        # device (checkUntouched) instead of slipping past them.
        await self._threads.run(scanner.startPass)
        changed = await self._changedRanges(final)
        batches = deque(_batches(scanner.blocks, changed, self.batchBlocks))
        scanned = sum(len(batch) for batch in batches)
        # Scans in flight, in offset order, with the blocks each was given.
        pending: deque[tuple[Deferred[list[BlockScan]], Sequence[int]]] = deque()
        sender = _PieceSender(writer)

        # In the final round the target takes the written parts of a block and
        # reads the rest back from its staging file; earlier rounds send changed
        # blocks whole, so that no read-backs pile up for the paused window,
        # except the changed leaves of blocks whose leaf tables both sides keep.
        within = changed if final or scanner.leafy else None

        def submit(indices: Sequence[int], next: bool = False) -> None:
            scan = self._threads.run(
                scanner.scanBlocks, indices, self.batchBytes, within, final
            )
            if next:  # the rest of a batch that returned early comes first
                pending.appendleft((scan, indices))
            else:
                pending.append((scan, indices))

        try:
            while batches and len(pending) < self.depth:
                submit(batches.popleft())
            while pending:
                scanning, indices = pending.popleft()
                scans = await scanning
                if len(scans) < len(indices):
                    submit(indices[len(scans) :], next=True)
                while batches and len(pending) < self.depth:
                    submit(batches.popleft())
                await sender.send(scans)
            await sender.flush()
        finally:
            for d, _ in pending:
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
                scanned,
            )
        )
        log.info(
            "disk {device} round {round}{final}: {data} data bytes, {zero} zero bytes "
            "in {blocks} changed blocks of {scanned} read",
            device=self.spec.name,
            round=round,
            final=" (final)" if final else "",
            data=tally.dataBytes,
            zero=tally.zeroBytes,
            blocks=tally.changedBlocks,
            scanned=scanned,
        )
        return tally

    async def _changedRanges(self, final: bool) -> list[tuple[int, int]] | None:
        """
        The byte ranges this pass must read, or None for all of them: the first
        pass reads everything (and, if live, the dirty-block source starts
        recording before it reads), later ones what the source recorded.
        """
        dirty = self.dirty
        if dirty is None:
            return None
        if not self._baseline:
            if not final:
                self._tracking = True
                await dirty.start()
            return None
        if not self._tracking:
            return None
        if final and IQuiescedDirtyBlocks.providedBy(dirty):
            return await dirty.collectQuiesced()  # the VM is paused
        return await dirty.collect()

    def rollback(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    def release(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        """
        Stop any round, wait for its threads, stop recording writes, close the
        image (never modified).
        """
        self._closed = True
        if self._busy is not None:
            self._busy.addErrback(lambda _: None)
            self._busy.cancel()
        await self._threads.idle()
        if self._tracking and self.dirty is not None:
            self._tracking = False
            await self.dirty.stop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _batches(
    blocks: BlockMap, ranges: list[tuple[int, int]] | None, most: int
) -> list[Sequence[int]]:
    """
    The blocks to scan, in batches of at most ``most`` in offset order: every
    block when ``ranges`` is None, else those that cover ``ranges`` and every
    block without a digest (those a growing image added since the last pass).
    """
    count = blocks.count
    if ranges is None:
        return [
            range(first, min(first + most, count)) for first in range(0, count, most)
        ]
    wanted = set(blocks.unknownBlocks())
    size = blocks.blockSize
    for start, stop in ranges:
        wanted.update(range(start // size, min(-(-stop // size), count)))
    ordered = sorted(wanted)
    return [ordered[i : i + most] for i in range(0, len(ordered), most)]


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

    async def flush(self) -> None:
        if self._zeroLength:
            start, length = self._zeroStart, self._zeroLength
            self._zeroLength = 0
            await self.writer.writeZero(start, length)
