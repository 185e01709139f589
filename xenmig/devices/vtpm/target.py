"""
The ``vtpm`` device kind: a running swtpm's state, restored into a resuming swtpm.

The target side; the source side is in L{source}, the plug-in in L{kind}.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import alsoProvides, implementer

from xenmig.clients.swtpm import (
    BLOB_NAMES,
    BLOB_TYPES,
    CAPS_FOR_MIGRATION,
    CONFIG_FLAG_FILE_KEY,
    CONFIG_FLAG_MIGRATION_KEY,
    INIT_FLAG_DELETE_VOLATILE,
    MAX_BLOB,
    StateBlob,
    SwtpmError,
    SwtpmNotRunning,
)
from xenmig.clients.swtpmcontrol import ControlCommands, SwtpmControl
from xenmig.clients.swtpmprocess import KeyOption, SwtpmProcess, swtpmFeatures
from xenmig.destinations import openResolvedDirectory
from xenmig.devices.vtpm.params import VTPMParams
from xenmig.devices.vtpm.source import (
    BLOB_KEY,
    namedError,
)
from xenmig.digest import ALGORITHM, hashBytes
from xenmig.errors import (
    BadSpec,
    CommitFailed,
    DeviceRefused,
    DigestMismatch,
    StreamError,
    UnknownDevice,
)
from xenmig.fs import fsyncDirectory
from xenmig.interfaces import (
    IInstallingDevice,
    IStagelessDevice,
    ITargetContext,
    ITargetDevice,
)
from xenmig.model import (
    ContentDigest,
    DeviceDescription,
)
from xenmig.records import DataRecord, EndRecord, MetadataRecord, Record, ZeroRecord

log = Logger()


def _keyPath(context: ITargetContext, value: Any) -> str:
    """A key file the peer names: inside its roots, and no option separator."""
    path = context.resolveDestination(str(value)).path
    if "," in path:
        raise BadSpec(
            f"the key file {path!r} has a ',' in its name (swtpm splits on it)"
        )
    return path


# -- target --------------------------------------------------------------------------


@implementer(ITargetDevice, IInstallingDevice)
class VTPMTarget:
    """Receives the blobs, verifies them, and loads them into a swtpm at commit."""

    requestMethods: frozenset[str] = frozenset()

    def __init__(self, description: DeviceDescription, context: ITargetContext):
        self.description = description
        self.context = context
        self.name = description.name
        self.params = params = VTPMParams.fromDescription(description)
        self.control: SwtpmControl | None = None
        self.destination: FilePath | None = None
        self.key = self.migrationKey = None
        # A peer names these paths: they must lie within its roots like any path.
        if params.targetCtrl:
            socket = context.resolveDestination(params.targetCtrl).path
            self.control = SwtpmControl(context.reactor, socket, params.targetTimeout)
            alsoProvides(self, IStagelessDevice)  # the blobs go into that swtpm
        else:
            self.destination = context.resolveDestination(params.targetStatedir)
            mode, form = params.targetKeyMode, params.targetKeyFormat
            if params.targetKey:
                self.key = KeyOption(_keyPath(context, params.targetKey), mode, form)
            if params.targetMigrationKey:
                path = _keyPath(context, params.targetMigrationKey)
                self.migrationKey = KeyOption(path, mode, form)
        self.timeout = params.targetTimeout
        self.allowUnencrypted = params.targetAllowUnencrypted
        self.overwrite = params.targetOverwrite
        self.receiver = BlobReceiver(self.name)
        self.blobs: list[StateBlob] | None = None
        self.staged: FilePath | None = None
        self.swtpm: SwtpmProcess | None = None

    # accept

    def accept(self) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._accept())

    async def _accept(self) -> dict[str, Any]:
        try:
            if self.control is not None:
                async with self.control.session() as control:  # one connection
                    return await self._acceptControl(control)
            return await self._acceptStateDir()
        except SwtpmError as e:
            raise DeviceRefused(str(namedError(self.name, e)))

    def _needKeys(self, fileKey: bool, migrationKey: bool, where: str) -> None:
        if self.params.migrationKey and not migrationKey:
            raise DeviceRefused(
                f"vtpm device {self.name}: the source swtpm encrypts its state with a "
                f"migration key, and {where} has none: give it the same key "
                f"(swtpm --migration-key, or target-migration-key=FILE)"
            )
        if self.params.fileKey and not fileKey and not self.allowUnencrypted:
            raise DeviceRefused(
                f"vtpm device {self.name}: the source keeps its TPM state encrypted "
                f"(--key) and {where} would store it in plain: give it a state key "
                f"(swtpm --key, or target-key=FILE), or target-allow-unencrypted=1"
            )

    async def _acceptControl(self, control: ControlCommands) -> dict[str, Any]:
        caps = await control.getCapability()
        if CAPS_FOR_MIGRATION & ~caps:
            raise DeviceRefused(
                f"vtpm device {self.name}: the swtpm at {control.address} lacks the "
                f"state-blob control commands: upgrade swtpm on this host"
            )
        await self._checkNotRunning(control)
        config = await control.getConfig()
        self._needKeys(
            bool(config & CONFIG_FLAG_FILE_KEY),
            bool(config & CONFIG_FLAG_MIGRATION_KEY),
            f"the target swtpm at {control.address}",
        )
        return {"mode": "ctrl"}

    async def _checkNotRunning(self, control: ControlCommands) -> None:
        try:
            await control.getEstablished()
        except SwtpmNotRunning:
            return
        raise DeviceRefused(
            f"vtpm device {self.name}: the swtpm at {control.address} already runs a "
            f"TPM; start a fresh swtpm without INIT (no --flags startup-*, no QEMU "
            f"attached) for the incoming VM"
        )

    async def _acceptStateDir(self) -> dict[str, Any]:
        assert self.destination is not None
        features = await swtpmFeatures(self.context.reactor)
        if self.migrationKey is not None and not features.migrationKey:
            raise DeviceRefused(
                f"vtpm device {self.name}: target-migration-key was given but "
                f"{features.executable} has no --migration-key: upgrade swtpm"
            )
        self._needKeys(
            self.key is not None, self.migrationKey is not None, "target-statedir"
        )
        problem = await self.context.runInThread(self._checkDestination)
        if problem:
            raise DeviceRefused(f"vtpm device {self.name}: {problem}")
        return {"mode": "statedir"}

    def _checkDestination(self) -> str:
        assert self.destination is not None
        path = self.destination.path
        for key in (self.key, self.migrationKey):
            if key is not None and not os.access(key.path, os.R_OK):
                return f"the key file {key.path} is missing or unreadable on this host"
        if not os.path.isdir(os.path.dirname(path)):
            return f"the parent directory of {path} does not exist"
        if os.path.lexists(path) and not self.overwrite:
            return f"{path} already exists (ask for target-overwrite=1 to replace it)"
        return ""

    # receive and verify

    def receive(self, record: Record) -> None:
        self.receiver.receive(record)
        return None

    def finish(self, end: EndRecord) -> Deferred[ContentDigest]:
        return Deferred.fromCoroutine(self._finish(end))

    async def _finish(self, end: EndRecord) -> ContentDigest:
        blobs, digest = self.receiver.finish(end)
        try:
            if self.control is not None:
                # STOP and SET now, INIT at commit: swtpm checks each blob as it
                # is set (keys, integrity), so a bad one fails before the point of
                # no return; it writes nothing to disk before INIT.  One
                # connection for the whole step: its first command finds the
                # swtpm still there and free, as at Prepare.
                async with self.control.session() as control:
                    await self._checkNotRunning(control)
                    await control.stop()
                    for blob in blobs:
                        if blob.data:
                            await control.setStateBlob(blob)
            else:
                await self._materialise(blobs)
        except SwtpmError as e:
            raise namedError(self.name, e)
        self.blobs = blobs
        return digest

    async def _materialise(self, blobs: list[StateBlob]) -> None:
        """Have a short-lived swtpm write the state files into staging."""
        state = self.context.stagingDir.child("swtpm-state")
        await self.context.runInThread(state.makedirs, True)
        sockets = await self.context.runInThread(tempfile.mkdtemp, "", "xenmig-vtpm-")
        self.swtpm = SwtpmProcess(
            self.context.reactor,
            state.path,
            socketDir=sockets,
            key=self.key,
            migrationKey=self.migrationKey,
            controlTimeout=self.timeout,
        )
        try:
            # swtpm keeps SET blobs in memory until INIT; the resumed copy runs no
            # TPM command: STORE_VOLATILE writes its state out and it ends.
            await self.swtpm.start()
            await self.swtpm.control.loadStateBlobs(blobs, initFlags=0)
            await self.swtpm.control.storeVolatile()
            await self.swtpm.shutdown()
        finally:
            await self.swtpm.stop()
            await self.context.runInThread(shutil.rmtree, sockets, True)
        await self.context.runInThread(_syncStateDir, state.path)
        self.staged = state

    # commit and abort

    def commit(self) -> Deferred[list[str]]:
        return Deferred.fromCoroutine(self._commit())

    async def _commit(self) -> list[str]:
        if self.blobs is None:
            raise CommitFailed(f"vtpm device {self.name}: commit before finish")
        if self.control is not None:
            try:
                await self.control.init(INIT_FLAG_DELETE_VOLATILE)
            except SwtpmError as e:
                raise CommitFailed(
                    f"vtpm device {self.name}: resuming the swtpm at "
                    f"{self.control.address} with the migrated state failed: {e}"
                )
            return [f"vtpm {self.name} resumed in swtpm at {self.control.address}"]
        assert self.staged is not None and self.destination is not None
        try:
            await self.context.runInThread(
                _install, self.staged.path, self.destination.path, self.overwrite
            )
        except OSError as e:
            raise CommitFailed(
                f"vtpm device {self.name}: installing {self.destination.path} failed: "
                f"{e}"
            )
        return [self.destination.path]

    def abort(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._abort())

    async def _abort(self) -> None:
        # Blobs set into a target swtpm at finish live only in its memory until
        # INIT (never sent): the toolstack discards that swtpm.  Our own helper
        # swtpm and the staged files (inside stagingDir) are removed here.
        if self.swtpm is not None:
            await self.swtpm.stop()
        if self.staged is not None:
            await self.context.runInThread(shutil.rmtree, self.staged.path, True)
            self.staged = None

    def handleRequest(self, method: str, payload: dict[str, Any]) -> Deferred[dict]:
        return fail(UnknownDevice(f"vtpm device {self.name} answers no {method!r}"))


def _syncStateDir(path: str) -> None:
    """Blocking: drop swtpm's lock file and make the state files durable."""
    lock = os.path.join(path, ".lock")
    if os.path.lexists(lock):
        os.remove(lock)
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsyncDirectory(path)


def _install(staged: str, destination: str, overwrite: bool) -> None:
    """
    Blocking: put a copy of the staged state directory at ``destination``,
    owner-only (directory 0700, files 0600).  Everything happens through a
    descriptor of the parent directory walked without following symbolic
    links, so a link swapped in since Prepare cannot lead the state elsewhere.
    """
    parent, base = os.path.split(destination)
    directory = openResolvedDirectory(parent)
    token = secrets.token_hex(4)
    incoming, old = f".{base}.incoming.{token}", None
    try:
        os.mkdir(incoming, 0o700, dir_fd=directory)
        try:
            _copyState(staged, directory, incoming)
            if _existsIn(directory, base):
                if not overwrite:
                    raise FileExistsError(
                        errno.EEXIST, "appeared meanwhile", destination
                    )
                old = f".{base}.old.{token}"
                os.rename(base, old, src_dir_fd=directory, dst_dir_fd=directory)
            os.rename(incoming, base, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True, dir_fd=directory)
            raise
        os.fsync(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True, dir_fd=directory)
    finally:
        os.close(directory)


def _existsIn(directory: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _copyState(staged: str, directory: int, name: str) -> None:
    """Blocking: copy swtpm's state files (not its lock) into ``name``, 0600."""
    target = os.open(
        name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory
    )
    try:
        for entry in os.scandir(staged):
            if entry.name == ".lock":
                continue
            if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", entry.path)
            with open(entry.path, "rb") as source:
                data = source.read()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(entry.name, flags, 0o600, dir_fd=target)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        os.fsync(target)
    finally:
        os.close(target)


# -- the stream of blobs -------------------------------------------------------------


class BlobReceiver:
    """
    Collects and checks the blobs of one vTPM stream; does no I/O.

    Each blob is announced by a METADATA record (type, flags, offset, length,
    digest) and followed by DATA records at consecutive offsets.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.announced: list[dict[str, Any]] = []
        self.data = bytearray()
        self.declared = 0

    def receive(self, record: Record) -> None:
        """Take one record; raise L{StreamError} if it does not fit."""
        if isinstance(record, MetadataRecord):
            if BLOB_KEY in record.metadata:
                self._announce(record.metadata)
        elif isinstance(record, DataRecord):
            self._append(record.offset, record.data)
        elif isinstance(record, ZeroRecord):
            self._append(record.offset, bytes(min(record.length, MAX_BLOB + 1)))

    def _announce(self, metadata: dict[str, Any]) -> None:
        where = f"vtpm device {self.name}"
        index = len(self.announced)
        if index >= len(BLOB_TYPES):
            raise StreamError(f"{where}: more than {len(BLOB_TYPES)} blobs announced")
        fields = (metadata.get(k) for k in ("type", "flags", "offset", "length"))
        blobType, flags, offset, length = fields
        if not all(isinstance(v, int) for v in (blobType, flags, offset, length)):
            raise StreamError(f"{where}: malformed blob announcement {metadata!r}")
        assert isinstance(length, int)
        if blobType != BLOB_TYPES[index] or metadata[BLOB_KEY] != BLOB_NAMES[index + 1]:
            raise StreamError(f"{where}: blob {metadata[BLOB_KEY]!r} out of order")
        if offset != self.declared or len(self.data) != self.declared:
            raise StreamError(f"{where}: blob {metadata[BLOB_KEY]} at a wrong offset")
        if not 0 <= length <= MAX_BLOB:
            raise StreamError(f"{where}: blob {metadata[BLOB_KEY]} of {length} bytes")
        if not isinstance(metadata.get("digest"), str):
            raise StreamError(f"{where}: blob {metadata[BLOB_KEY]} has no digest")
        self.announced.append(dict(metadata))
        self.declared += length

    def _append(self, offset: int, data: bytes) -> None:
        if offset != len(self.data) or offset + len(data) > self.declared:
            raise StreamError(
                f"vtpm device {self.name}: {len(data)} bytes at offset {offset} do not "
                f"follow the announced blobs ({len(self.data)} of {self.declared} "
                f"bytes received)"
            )
        self.data += data

    def finish(self, end: EndRecord) -> tuple[list[StateBlob], ContentDigest]:
        """The verified blobs and their content digest; StreamError if any is bad."""
        where = f"vtpm device {self.name}"
        if len(self.announced) != len(BLOB_TYPES) or len(self.data) != self.declared:
            raise StreamError(
                f"{where}: the state is truncated ({len(self.announced)} of "
                f"{len(BLOB_TYPES)} blobs, {len(self.data)} of {self.declared} bytes); "
                f"the target TPM was not initialised"
            )
        if end.size != len(self.data):
            raise StreamError(
                f"{where}: the source sent {end.size} bytes, {len(self.data)} arrived"
            )
        blobs = []
        for meta in self.announced:
            start = meta["offset"]
            data = bytes(self.data[start : start + meta["length"]])
            if hashBytes(data).hex != meta["digest"]:
                raise DigestMismatch(
                    f"{where}: the {meta[BLOB_KEY]} blob differs from what the source "
                    f"sent (digest mismatch): the state was damaged in transit; the "
                    f"target TPM was not initialised"
                )
            blobs.append(StateBlob(meta["type"], meta["flags"], data))
        digest = hashBytes(bytes(self.data))
        if end.algorithm == ALGORITHM and end.digest != digest.digest:
            raise DigestMismatch(
                f"{where}: the state's digest differs from the source's"
            )
        return blobs, digest
