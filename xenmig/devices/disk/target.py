"""
The ``disk`` device kind's target side: an image received in rounds and installed.

The staged image is L{imagestaging}; the source side is L{source}, the plug-in L{kind}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from xenmig.devices.disk.attach import IncomingDisk
from xenmig.devices.disk.blockmap import treeAlgorithm
from xenmig.devices.disk.imagestaging import ImageStaging
from xenmig.devices.disk.leaves import LEAF_SIZE
from xenmig.devices.disk.params import DiskParams
from xenmig.devices.staging import installAsFor, refuseIfHeld, sourceMode
from xenmig.errors import (
    BadSpec,
    DeviceError,
    DeviceRefused,
    PathNotAllowed,
    StreamError,
    XenmigError,
)
from xenmig.fs import InstallAs, freeBytes
from xenmig.interfaces import (
    IInstallingDevice,
    ITargetContext,
    ITargetDevice,
)
from xenmig.model import ContentDigest, DeviceDescription
from xenmig.records import (
    DataRecord,
    EndRecord,
    MetadataRecord,
    Record,
    RoundRecord,
    ZeroRecord,
)

#: Space the target wants beyond the source's allocated size: a fixed amount plus a
#: fraction, for filesystem metadata and for blocks the guest allocates meanwhile.
SPACE_MARGIN = 16 * 1024 * 1024
SPACE_MARGIN_FRACTION = 32


def spaceNeeded(allocated: int) -> int:
    """The free space the target asks for an image with ``allocated`` bytes."""
    return allocated + allocated // SPACE_MARGIN_FRACTION + SPACE_MARGIN


@implementer(ITargetDevice, IInstallingDevice)
class DiskTarget:
    """
    Receives an image into a staging file next to its destination, holes kept as
    holes; installs it by an atomic rename at commit.
    """

    requestMethods: frozenset[str] = frozenset()

    def __init__(self, description: DeviceDescription, context: ITargetContext) -> None:
        self.description = description
        self.context = context
        self.params = params = DiskParams.fromDescription(description)
        self.target = params.target
        self.overwrite = params.targetOverwrite
        self.maxSize = description.size if params.maxSize is None else params.maxSize
        if self.maxSize < description.size:
            raise BadSpec(
                f"device {description.name}: max_size is below the image size"
            )
        self.blockSize = params.blockSize
        self.destination: FilePath | None = None
        self.staged: ImageStaging | None = None
        self.round = -1
        self.final = False
        self.sourceMode: int | None = None
        self.incoming: IncomingDisk | None = None
        if params.targetQmp:
            self.incoming = IncomingDisk(
                context.reactor,
                context.resolveDestination(params.targetQmp).path,
                params.targetNode,
                description.name,
                context.migrationId,
            )

    @property
    def _name(self) -> str:
        return f"device {self.description.name}"

    def accept(self) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._accept())

    async def _accept(self) -> dict[str, Any]:
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
        try:
            await refuseIfHeld(self.context, destination)
        except DeviceRefused as e:
            raise DeviceRefused(f"{self._name}: {e}")
        await self._checkBacking(directory)
        await self._installAs()  # an unknown owner is refused now
        if self.incoming is not None:
            raw = self.params.format != "qcow2"
            await self.incoming.check(
                destination.path, self.description.size if raw else None
            )
        allocated = self.params.allocated
        if allocated is None:
            allocated = self.description.size
        need = spaceNeeded(allocated)
        free = await self.context.runInThread(freeBytes, directory)
        if need > free:
            raise DeviceRefused(
                f"{self._name}: not enough space in {directory}: {free} bytes free, "
                f"{need} needed (the image has {allocated} bytes allocated, plus a "
                f"margin); free space there or choose another destination"
            )
        staged = ImageStaging(
            self.context,
            self.context.stagingPathFor(destination),
            self.description.size,
            maxSize=self.maxSize,
            blockSize=self.blockSize,
        )
        try:
            await staged.open()
        except OSError as e:
            raise DeviceRefused(
                f"{self._name}: cannot create a staging file in {directory}: "
                f"{e.strerror}"
            )
        self.destination, self.staged = destination, staged
        answer: dict[str, Any] = {"destination": destination.path, "free": free}
        tables = staged.blocks.tables.most
        if tables:  # changed leaves welcome (older targets do not say so)
            answer.update(leaf_size=LEAF_SIZE, leaf_blocks=tables)
        return answer

    async def _checkBacking(self, directory: str) -> None:
        backing = self.params.backing
        if not backing:
            return
        # A peer's path: it may only ask about files within its roots.
        path = self.context.resolveDestination(
            os.path.join(directory, str(backing))
        ).path
        if not await self.context.runInThread(os.path.exists, path):
            raise DeviceRefused(
                f"{self._name}: the image's backing file {backing!r} does not exist "
                f"here ({path}); migrate or provide it first"
            )

    def receive(self, record: Record) -> Deferred[None] | None:
        if isinstance(record, DataRecord | ZeroRecord):
            if self.staged is None:
                raise StreamError(f"{self._name}: a record arrived before accept")
            try:
                waiting = self.staged.receive(record)
            except XenmigError as e:
                raise _named(self._name, e)
            return waiting.addErrback(self._namedFailure) if waiting else None
        if isinstance(record, RoundRecord):
            self.round, self.final = record.round, record.final
            if self.staged is not None:
                self.staged.startRound(record.round, record.final)
            if not record.final and self.staged is not None:
                self.staged.throughCache()  # live: rounds are read back in part
            if record.round > 0 and self.staged is not None:
                self.staged.flushInBackground()
            return None
        if isinstance(record, MetadataRecord):
            # The source image's mode (final round); newer sources may add more.
            if "mode" in record.metadata:
                self.sourceMode = sourceMode(record)
            leaves = record.metadata.get("leaf_size") == LEAF_SIZE
            if leaves and self.staged is not None:
                # A source that uses the leaf tables offered at accept: keep
                # them from its first round on.
                self.staged.keepLeaves()
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
        algorithm = treeAlgorithm(self.blockSize)
        if end.algorithm != algorithm:
            raise StreamError(
                f"{self._name}: the source's content digest is {end.algorithm!r}; "
                f"this target computes {algorithm!r} (xenmig versions differ?)"
            )
        d = Deferred.fromCoroutine(self._finish(end.size))
        return d.addErrback(self._namedFailure)

    async def _finish(self, size: int) -> ContentDigest:
        assert self.staged is not None
        digest = await self.staged.finishImage(size)
        attributes = await self._installAs()
        await self.staged.setAttributes(attributes)
        if self.incoming is not None:
            # Before READY: a QEMU that could not open it would fail the commit.
            assert self.destination is not None
            await self.context.runInThread(
                self.incoming.checkAccess,
                self.staged.path.path,
                self.destination.dirname(),
            )
        return digest

    def _installAs(self) -> Deferred[InstallAs]:
        return Deferred.fromCoroutine(
            installAsFor(
                self.context,
                self._name,
                self.params.targetOwner,
                self.params.targetMode,
                self.sourceMode,
            )
        )

    def commit(self) -> Deferred[list[str]]:
        return Deferred.fromCoroutine(self._commit())

    async def _commit(self) -> list[str]:
        assert self.staged is not None and self.destination is not None
        await self.staged.install(self.destination, self.overwrite)
        if self.incoming is None:
            return [self.destination.path]
        # Installed and durable: only now may the incoming QEMU use it.
        await self.incoming.attach(self.destination.path, self.params.format or "raw")
        return [
            self.destination.path,
            f"{self.destination.path} attached at {self.incoming.what}",
        ]

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


def _named(name: str, error: XenmigError) -> XenmigError:
    """``error`` with the device named in its message (same class)."""
    message = str(error)
    if message.startswith(name):
        return error
    return type(error)(f"{name}: {message}")
