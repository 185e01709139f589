"""The ``file`` device kind: any opaque state file, sent sparsely, installed whole."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin
from twisted.python.filepath import FilePath
from zope.interface import implementer

from xenmig.devices.sparse import sendFile
from xenmig.devices.staging import (
    StagedFile,
    checkInstallKeys,
    installAsFor,
    refuseIfHeld,
    sourceMode,
)
from xenmig.errors import DeviceError, DeviceRefused, StreamError
from xenmig.fs import InstallAs, freeBytes
from xenmig.interfaces import (
    IDeviceKind,
    IInstallingDevice,
    IRecordWriter,
    ISourceContext,
    ISourceDevice,
    ITargetContext,
    ITargetDevice,
)
from xenmig.model import ContentDigest, DeviceDescription, DeviceSpec, RoundResult
from xenmig.params import DeviceParams, Where, flag, key, text, whole
from xenmig.records import DataRecord, EndRecord, MetadataRecord, Record, ZeroRecord


@dataclass(frozen=True)
class FileParams(DeviceParams):
    """The ``file`` kind's parameters: ``path=SRC,target=DST[,target-overwrite=1]``."""

    KIND = "file"

    path: str = key("path", text, "", required=True, usage="path=SOURCE_FILE")
    target: str = key("target", text, "", required=True, usage="target=DESTINATION")
    targetOverwrite: bool = key("target-overwrite", flag, False)
    targetOwner: str = key("target-owner", text, "")
    targetMode: str = key("target-mode", text, "")
    #: The bytes the file takes on the source's disk.
    allocated: int | None = key("allocated", whole, where=Where.DESCRIPTION)

    def check(self, what: str, where: Where) -> None:
        checkInstallKeys(what, self.targetOwner, self.targetMode)


@implementer(ISourceDevice)
class FileSource:
    """Sends one file, read-only, with holes and zero chunks as ZERO records."""

    precopy = False

    def __init__(self, spec: DeviceSpec, context: ISourceContext) -> None:
        self.spec = spec
        self.context = context
        self.path = FileParams.fromSpec(spec).path

    def describe(self) -> Deferred[DeviceDescription]:
        return self.context.runInThread(self._describe)

    def _describe(self) -> DeviceDescription:
        try:
            stat = os.stat(self.path)
        except OSError as e:
            raise DeviceError(f"device {self.spec.name}: {self.path}: {e.strerror}")
        if not os.path.isfile(self.path):
            raise DeviceError(f"device {self.spec.name}: {self.path} is not a file")
        if not os.access(self.path, os.R_OK):
            raise DeviceError(f"device {self.spec.name}: {self.path} is not readable")
        params = {"allocated": stat.st_blocks * 512}
        return DeviceDescription("file", self.spec.name, stat.st_size, params)

    def accepted(self, params: dict[str, Any]) -> None:
        pass

    def sendRound(self, writer: IRecordWriter, round: int) -> Deferred[RoundResult]:
        raise NotImplementedError("the file kind has no pre-copy rounds")

    def sendFinal(self, writer: IRecordWriter) -> Deferred[ContentDigest]:
        return Deferred.fromCoroutine(self._sendFinal(writer))

    async def _sendFinal(self, writer: IRecordWriter) -> ContentDigest:
        mode = await self.context.runInThread(os.stat, self.path)
        # The file's mode travels with it (older targets ignore it).
        await writer.writeMetadata({"mode": stat.S_IMODE(mode.st_mode)})
        digest = await sendFile(self.context, writer, self.path)
        size = os.stat(self.path).st_size
        if size != digest.size:
            raise DeviceError(
                f"device {self.spec.name}: {self.path} changed size from "
                f"{digest.size} to {size} bytes while it was sent"
            )
        return digest

    def rollback(self) -> Deferred[None]:
        return Deferred.fromCoroutine(_nothing())

    def release(self) -> Deferred[None]:
        return Deferred.fromCoroutine(_nothing())


async def _nothing() -> None:
    return None


@implementer(ITargetDevice, IInstallingDevice)
class FileTarget:
    """Receives one file into staging; installs it at ``target`` on commit."""

    requestMethods = frozenset({"free-space"})

    def __init__(self, description: DeviceDescription, context: ITargetContext) -> None:
        self.description = description
        self.context = context
        self.params = FileParams.fromDescription(description)
        self.overwrite = self.params.targetOverwrite
        self.destination: FilePath = context.resolveDestination(self.params.target)
        self.staged: StagedFile | None = None
        self.sourceMode: int | None = None

    def _installAs(self) -> Deferred[InstallAs]:
        what = f"device {self.description.name}"
        owner, mode = self.params.targetOwner, self.params.targetMode
        return Deferred.fromCoroutine(
            installAsFor(self.context, what, owner, mode, self.sourceMode)
        )

    def accept(self) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._accept())

    async def _accept(self) -> dict[str, Any]:
        name = self.description.name
        if not self.overwrite and await self.context.runInThread(
            os.path.lexists, self.destination.path
        ):
            raise DeviceRefused(
                f"{self.destination.path} already exists (ask for target-overwrite=yes "
                f"to replace it)"
            )
        await refuseIfHeld(self.context, self.destination)
        await self._installAs()  # an unknown owner is refused now
        need = self.params.allocated
        if need is None:
            need = self.description.size
        free = await self.context.runInThread(freeBytes, self.destination.dirname())
        if need > free:
            raise DeviceRefused(
                f"{self.destination.dirname()} has {free} bytes free, {need} needed"
            )
        path = self.context.stagingPathFor(self.destination)
        self.staged = StagedFile(self.context, path, self.description.size)
        await self.staged.open()
        return {"destination": self.destination.path, "name": name}

    def receive(self, record: Record) -> Deferred[None] | None:
        if isinstance(record, DataRecord | ZeroRecord):
            assert self.staged is not None
            length = (
                len(record.data) if isinstance(record, DataRecord) else record.length
            )
            if self.staged.bytesReceived + length > self.description.size:
                # Each byte is sent once, as data or as zeros: more is not this file.
                raise StreamError(
                    f"device {self.description.name}: the source sent more than "
                    f"the {self.description.size} bytes it declared"
                )
            return self.staged.receive(record)
        if isinstance(record, MetadataRecord):
            self.sourceMode = sourceMode(record)
        return None

    def finish(self, end: EndRecord) -> Deferred[ContentDigest]:
        assert self.staged is not None
        if end.size != self.description.size:
            raise StreamError(
                f"the source sent {end.size} bytes, {self.description.size} declared"
            )
        return Deferred.fromCoroutine(self._finish())

    async def _finish(self) -> ContentDigest:
        assert self.staged is not None
        digest = await self.staged.finish()
        await self.staged.setAttributes(await self._installAs())
        return digest

    def commit(self) -> Deferred[list[str]]:
        return Deferred.fromCoroutine(self._commit())

    async def _commit(self) -> list[str]:
        assert self.staged is not None
        await self.staged.install(self.destination, self.overwrite)
        return [self.destination.path]

    def abort(self) -> Deferred[None]:
        if self.staged is None:
            return Deferred.fromCoroutine(_nothing())
        return Deferred.fromCoroutine(self.staged.discard())

    def handleRequest(self, method: str, payload: dict[str, Any]) -> Deferred[dict]:
        d = self.context.runInThread(freeBytes, self.destination.dirname())
        return d.addCallback(lambda free: {"free": free})


@implementer(IPlugin, IDeviceKind)
class FileKind:
    """Any opaque state file: ``file:NAME:path=SRC,target=DST[,target-overwrite=1]``."""

    kind = "file"
    summary = "an opaque state file, sent sparsely and installed atomically"

    def source(self, spec: DeviceSpec, context: ISourceContext) -> FileSource:
        return FileSource(spec, context)

    def target(
        self, description: DeviceDescription, context: ITargetContext
    ) -> FileTarget:
        return FileTarget(description, context)


fileKind = FileKind()
