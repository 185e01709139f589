"""Receiving a state file on the target: staged, written and hashed off the reactor."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from xenmig.destinations import openResolvedDirectory
from xenmig.digest import ContentHasher, hashFile
from xenmig.errors import (
    BadSpec,
    CommitFailed,
    DeviceError,
    DeviceRefused,
    StreamError,
)
from xenmig.fs import (
    DEFAULT_MODE,
    WRITEBACK_STEP,
    InstallAs,
    checkOwner,
    describeHolders,
    directlyWritable,
    holdersOf,
    openDirect,
    parseMode,
    parseOwner,
    punchHole,
    startWriteback,
)
from xenmig.interfaces import ITargetContext
from xenmig.model import ContentDigest
from xenmig.pump import BatchPump
from xenmig.records import DataRecord, MetadataRecord, ZeroRecord
from xenmig.threads import ThreadCalls

T = TypeVar("T")


def recordWeight(record: DataRecord | ZeroRecord) -> int:
    """The memory a queued record holds."""
    return len(record.data) if isinstance(record, DataRecord) else 64


#: The most a thread-pool call writes (and hashes) at once.  Each call is one
#: ``pwritev`` after the batch's hashing, so the disk waits while the batch is
#: hashed and the hash while it is written: on this machine's ext4 (direct
#: I/O) 8 MiB took a 1 GiB stream from 1.53-1.67 s to 1.38-1.50 s against
#: 4 MiB, 16 MiB was no better; the queue's bound (``highWater``) is unchanged.
BATCH = 8 * 1024 * 1024


class StagedFile:
    """
    A file being received into staging, then installed by an atomic rename.

    Records are queued and written in batches in the thread pool, in arrival order,
    and hashed as they are written (unless ``hashing`` is false: an owner that
    hashes the content itself).  ``receive`` returns a Deferred (backpressure)
    while more than ``highWater`` bytes wait, so memory stays bounded.  Records may
    reach up to ``maxSize`` (default ``size``), for state whose final size is only
    known at the end (``finish(size)`` cuts the file to it).  Subclasses may use
    ``fd`` (opened read-write), ``failure`` and ``drained()``.

    Data aligned for it (what the stream receiver assembles: page-aligned
    blocks of whole pages at page offsets) is written with direct I/O where the
    filesystem offers it: to the disk from the record's memory, without a copy
    into the page cache and without filling it with the whole file; the rest
    (a short last record, unaligned data) through the cache.

    ``finish`` takes the digest and fsyncs only once every queued record is
    written (L{drained}), and ``discard`` closes the file only once every
    thread-pool call on it has returned (L{onFile}): a descriptor closed under
    a call could, reused by another file, have that file cut or written.
    """

    def __init__(
        self,
        context: ITargetContext,
        path: FilePath,
        size: int,
        highWater: int = 16 * 1024 * 1024,
        lowWater: int = 12 * 1024 * 1024,
        maxBatch: int = BATCH,
        maxSize: int | None = None,
        hashing: bool = True,
    ) -> None:
        self.context = context
        self.path = path
        self.size = size
        self.maxSize = max(size, maxSize or 0)
        self.hashing = hashing
        self.highWater = highWater
        self.lowWater = lowWater
        self.maxBatch = maxBatch
        self.hasher = ContentHasher()
        self.bytesReceived = 0
        self._fd: int | None = None
        self._direct: int | None = None  # the same file, opened with O_DIRECT
        #: Bytes written with direct I/O (the rest went through the page cache).
        self.directBytes = 0
        #: Whether aligned data may still be written with direct I/O.
        self.writeDirectly = True
        self._writes: BatchPump[DataRecord | ZeroRecord] = BatchPump(
            context.runInThread,
            self._writeBatch,
            recordWeight,
            highWater,
            lowWater,
            maxBatch,
            onFailure=self.writingFailed,
        )
        self._written = 0  # the end of the highest range ever written
        self._writeback = 0  # where the last writeback request ended
        #: Thread-pool calls on the staged file, which discard waits for.
        self._fileCalls = ThreadCalls(context.runInThread)
        self._discarded = False

    async def open(self) -> None:
        """Create the staging file (owner-only) at its declared size, all holes."""
        self._fd = await self.onFile(self._create)

    def onFile(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Call ``function(*args)``, which uses the staged file, in the thread
        pool; L{discard} closes the file only once it has returned.

        @raise DeviceError: if the staging was discarded.
        """
        if self._discarded:
            raise DeviceError(f"the staging {self.path.path} was discarded")
        return self._fileCalls.run(function, *args)

    def _create(self) -> int:
        fd = os.open(
            self.path.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        os.ftruncate(fd, self.size)
        try:
            self._direct = openDirect(self.path.path)
        except OSError:
            os.close(fd)
            raise
        return fd

    def receive(self, record: DataRecord | ZeroRecord) -> Deferred[None] | None:
        """Queue one record; a Deferred if the caller should wait before the next."""
        if self.failure is not None:
            self.failure.raiseException()
        length = len(record.data) if isinstance(record, DataRecord) else record.length
        if record.offset < 0 or record.offset + length > self.maxSize:
            raise StreamError(
                f"record for {length} bytes at offset {record.offset} lies beyond the "
                f"declared size of {self.maxSize} bytes"
            )
        self.bytesReceived += length
        return self._writes.put(record)

    def throughCache(self) -> None:
        """
        Write everything from now on through the page cache: for an owner that
        will read back what it wrote (an image received in several rounds
        re-reads blocks that a later round rewrites in part), which the cache
        then serves instead of the disk.
        """
        self.writeDirectly = False

    def writingFailed(self, failure: Failure) -> None:
        """
        Writing failed (no space, an I/O error); for subclasses that make callers
        wait on work of their own, which must now be released too.
        """

    def _writeBatch(self, batch: list[DataRecord | ZeroRecord]) -> None:
        fd = self._fd
        assert fd is not None
        run: list[bytes] = []  # contiguous data written directly, not yet written
        start = end = 0
        try:
            for record in batch:
                if isinstance(record, DataRecord):
                    data, offset = record.data, record.offset
                    if (
                        self._direct is not None
                        and self.writeDirectly
                        and directlyWritable(data, offset)
                    ):
                        if run and offset != end:
                            self._writeDirect(run, start)
                            run = []
                        if not run:
                            start = offset
                        run.append(data)
                        end = offset + len(data)
                    else:
                        if run:
                            self._writeDirect(run, start)
                            run = []
                        self._pwriteAll(fd, data, offset)
                    if self.hashing:
                        self.hasher.update(offset, data)
                    stop = offset + len(data)
                else:
                    if run:
                        self._writeDirect(run, start)
                        run = []
                    if record.offset < self._written:
                        punchHole(fd, record.offset, record.length)
                    if self.hashing:
                        self.hasher.zeros(record.offset, record.length)
                    stop = record.offset + record.length
                self._written = max(self._written, stop)
            if run:
                self._writeDirect(run, start)
            if self._written - self._writeback >= WRITEBACK_STEP:
                startWriteback(fd, self._writeback, self._written - self._writeback)
                self._writeback = self._written
        except OSError as e:
            raise DeviceError(self._describeError(e))

    def _writeDirect(self, parts: list[bytes], offset: int) -> None:
        """
        Write contiguous ``parts`` at ``offset`` with direct I/O, or through
        the cache if the filesystem refuses it after all.
        """
        direct = self._direct
        assert direct is not None and self._fd is not None
        views = [memoryview(part) for part in parts]
        try:
            while views:
                written = os.pwritev(direct, views, offset)
                offset += written
                self.directBytes += written
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if views and written:
                    views[0] = views[0][written:]
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._direct = None
            os.close(direct)
            for view in views:
                self._pwriteAll(self._fd, view, offset)  # type: ignore[arg-type]
                offset += len(view)

    @staticmethod
    def _pwriteAll(fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written

    def _describeError(self, error: OSError) -> str:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"no space left on the target filesystem while writing "
                f"{self.path.path}: free space there or choose another destination"
            )
        return f"writing {self.path.path} failed: {error.strerror}"

    @property
    def fd(self) -> int | None:
        """The staging file's descriptor (read-write), once open and until closed."""
        return self._fd

    @property
    def failure(self) -> Failure | None:
        """Why writing failed (or stopped: discarded), if it did."""
        return self._writes.failure

    async def drained(self) -> None:
        """Wait until every queued record is written; raise if writing failed."""
        await self._writes.whenIdle()
        if self.failure is not None:
            self.failure.raiseException()

    async def finish(self, size: int | None = None) -> ContentDigest:
        """
        Write out the queue, cut the file to ``size`` (default: the declared size),
        fsync, and return the digest of the staged content.
        """
        size = self.size if size is None else size
        await self.drained()
        if size != self.size:
            await self.onFile(os.ftruncate, self._fd, size)
            self.size = size
        await self.onFile(os.fsync, self._fd)
        if self.hashing and self.hasher.sequential and self.hasher.position <= size:
            return self.hasher.result(size)
        return await self.onFile(hashFile, self.path.path, size)

    async def setAttributes(self, attributes: InstallAs) -> None:
        """Give the staged file the owner, group and mode it is installed with."""
        try:
            await self.onFile(attributes.apply, self._fd)
        except OSError as e:
            raise DeviceError(
                f"cannot give {self.path.path} owner {attributes.uid}:"
                f"{attributes.gid} and mode {attributes.mode:o}: {e.strerror} (the "
                f"daemon must run as root to give files away)"
            )

    async def install(self, destination: FilePath, overwrite: bool = False) -> None:
        """
        Move the staged file to ``destination`` atomically and durably.

        @raise CommitFailed: if ``destination`` exists and ``overwrite`` is false.
        """
        await self.onFile(self._install, destination, overwrite)

    def _install(self, destination: FilePath, overwrite: bool) -> None:
        self._close()
        # By a descriptor of the directory, walked again without following
        # symbolic links: one swapped in since Prepare cannot lead elsewhere.
        directory = openResolvedDirectory(destination.dirname())
        name = destination.basename()
        try:
            if overwrite:
                holders = holdersOf(name, directory)
                if holders:
                    raise CommitFailed(heldMessage(destination.path, holders))
                os.replace(self.path.path, name, dst_dir_fd=directory)
            else:
                os.link(self.path.path, name, dst_dir_fd=directory)
                os.unlink(self.path.path)
            os.fsync(directory)
        except FileExistsError:
            raise CommitFailed(
                f"{destination.path} appeared before commit; not replaced"
            )
        except OSError as e:
            raise CommitFailed(f"installing {destination.path} failed: {e.strerror}")
        finally:
            os.close(directory)

    async def discard(self) -> None:
        """
        Remove the staged file; nothing of it remains.  Writing stops, and the
        file is closed once no thread-pool call uses it.
        """
        self._discarded = True
        self._writes.stop(Failure(DeviceError("staging discarded")))
        await self._writes.whenIdle()
        await self._fileCalls.idle()
        await self.context.runInThread(self._discard)

    def _discard(self) -> None:
        self._close()
        try:
            os.unlink(self.path.path)
        except FileNotFoundError:
            pass

    def _close(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def heldMessage(path: str, holders: list[tuple[str, int]]) -> str:
    """Why a destination that processes hold open is not replaced."""
    return (
        f"{path} is open in {describeHolders(holders)}: xenmig never replaces a "
        f"file that a process holds open (what it writes would go to the replaced "
        f"file, and be lost); stop it first, or hand the incoming VM its migrated "
        f"state another way (doc/toolstacks.md)"
    )


async def refuseIfHeld(context: ITargetContext, destination: FilePath) -> None:
    """
    @raise DeviceRefused: if a process holds ``destination`` open (at Prepare:
        the install would replace a file in use).
    """
    holders = await context.runInThread(holdersOf, destination.path)
    if holders:
        raise DeviceRefused(heldMessage(destination.path, holders))


def checkInstallKeys(what: str, owner: str, mode: str) -> None:
    """
    @raise BadSpec: if ``target-owner`` or ``target-mode`` is malformed (names
        are looked up on the target only, L{installAsFor}).
    """
    try:
        if owner:
            checkOwner(owner)
        if mode:
            parseMode(mode)
    except ValueError as e:
        raise BadSpec(f"{what}: target-{'owner' if owner else 'mode'}: {e}")


def sourceMode(record: MetadataRecord) -> int | None:
    """The source file's mode that a METADATA record carries, if it does."""
    mode = record.metadata.get("mode")
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode <= 0o7777:
        return mode & 0o777  # never set-id bits from a peer
    return None


async def installAsFor(
    context: ITargetContext, what: str, owner: str, mode: str, fromSource: int | None
) -> InstallAs:
    """
    Who owns an installed file and its mode: the device's keys, else the
    daemon's defaults, else (the mode) the source file's, else 0600.

    @raise DeviceRefused: naming a user or group unknown on this host.
    """
    given = InstallAs(mode=parseMode(mode) if mode else None)
    if owner:
        try:
            given = given.over(await context.runInThread(parseOwner, owner))
        except ValueError as e:
            raise DeviceRefused(f"{what}: target-owner={owner}: {e}")
    attributes = given.over(context.installAs)
    fallback = DEFAULT_MODE if fromSource is None else fromSource
    return attributes.over(InstallAs(mode=fallback))
