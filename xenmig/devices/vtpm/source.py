"""The source side of the ``vtpm`` kind: the state blobs out of a running swtpm."""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from zope.interface import implementer

from xenmig.clients.swtpm import (
    CAPS_FOR_MIGRATION,
    CONFIG_FLAG_FILE_KEY,
    CONFIG_FLAG_MIGRATION_KEY,
    SwtpmBusy,
    SwtpmError,
    SwtpmNotRunning,
)
from xenmig.clients.swtpmcontrol import SwtpmControl
from xenmig.devices.vtpm.params import VTPMParams
from xenmig.digest import hashBytes
from xenmig.errors import (
    DeviceError,
)
from xenmig.interfaces import (
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

log = Logger()

#: A vTPM's state is a few KiB (permanent about 2 KB, volatile about 10 KB).
SIZE_ESTIMATE = 16 * 1024
#: The largest DATA record the source writes.
CHUNK = 1024 * 1024
#: The metadata key that announces one blob, and the format of that announcement.
BLOB_KEY = "vtpm-blob"
FORMAT = 1


class VTPMOwnedByQEMU(DeviceError):
    """The vTPM is attached to QEMU, whose own stream carries its state."""


def namedError(name: str, error: SwtpmError) -> SwtpmError:
    """The same error, of the same class, with the device named first."""
    copy = type(error).__new__(type(error))
    copy.__dict__.update(error.__dict__)
    Exception.__init__(copy, f"vtpm device {name}: {error}")
    return copy


def qemuMessage(name: str, why: str) -> str:
    return (
        f"vtpm device {name}: {why}; QEMU carries the TPM state inside its own "
        f"migration stream (the devmodel device), so migrating it here as well would "
        f"move the same TPM twice: leave the vtpm device out of this migration"
    )


def controlSocketInUse(path: str) -> bool:
    """
    Blocking, cheap: whether a connection to the unix socket ``path`` is open
    now (an accepted socket, state 03, in ``/proc/net/unix``); True when that
    cannot be read.  Only then is it worth asking ``ss`` who holds it.
    """
    try:
        with open("/proc/net/unix", "rb") as table:
            text = table.read()
    except OSError:
        return True
    # The kernel writes names as raw bytes; only the lines naming ``path`` are
    # split (a host has thousands of sockets, and this runs per migration).
    name = os.fsencode(path)
    found = text.find(name)
    while found != -1:
        start = text.rfind(b"\n", 0, found) + 1
        end = text.find(b"\n", found)
        end = len(text) if end == -1 else end
        fields = text[start:end].split(maxsplit=7)
        if len(fields) >= 8 and fields[7] == name and fields[5] == b"03":
            return True
        found = text.find(name, end)
    return False


async def controlSocketHolders(reactor: Any, path: str) -> list[tuple[str, int]]:
    """
    The processes connected to the unix control socket ``path`` (name, pid).

    Uses ``ss -xpn``; an empty list when ``ss`` is missing or shows nothing.
    """
    ss = shutil.which("ss")
    if ss is None:
        return []
    out, _, code = await getProcessOutputAndValue(ss, ["-xpn"], reactor=reactor)
    if code != 0:
        return []
    rows = [line.split() for line in out.decode("utf-8", "replace").splitlines()[1:]]
    # Netid State Recv-Q Send-Q Local Inode Peer PeerInode Process
    peers = {row[7] for row in rows if len(row) >= 8 and row[4] == path}
    holders = []
    for row in rows:
        if len(row) >= 9 and row[4] != path and row[5] in peers:
            for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', " ".join(row[8:])):
                holders.append((name, int(pid)))
    return holders


# -- source --------------------------------------------------------------------------


@implementer(ISourceDevice)
class VTPMSource:
    """Takes the three state blobs out of a running swtpm through its control socket."""

    precopy = False

    def __init__(self, spec: DeviceSpec, context: ISourceContext) -> None:
        self.spec = spec
        self.context = context
        params = VTPMParams.fromSpec(spec)
        self.qemu = params.qemu
        self.expectKey = bool(params.sourceKey)
        self.control = SwtpmControl(context.reactor, params.ctrl, params.timeout)

    async def _guard(self, work: Any) -> Any:
        try:
            return await work
        except SwtpmError as e:
            raise namedError(self.spec.name, e)

    def describe(self) -> Deferred[DeviceDescription]:
        return Deferred.fromCoroutine(self._guard(self._describe()))

    async def _describe(self) -> DeviceDescription:
        name = self.spec.name
        if self.qemu:
            raise VTPMOwnedByQEMU(qemuMessage(name, "it is attached to QEMU (qemu=1)"))
        # QEMU's tpm-emulator holds the control socket for good: ask the kernel who
        # holds it before waiting on it (that wait would end only in a time-out).
        address = self.control.address
        if await self.context.runInThread(controlSocketInUse, address):
            await self._refuseIfQEMU()
        try:
            async with self.control.session() as control:  # one connection
                caps = await control.getCapability()
                missing = CAPS_FOR_MIGRATION & ~caps
                if missing:
                    raise DeviceError(
                        f"vtpm device {name}: the swtpm at {control.address} lacks "
                        f"the state-blob control commands (capabilities 0x{caps:x}): "
                        f"upgrade swtpm"
                    )
                config = await control.getConfig()
                await control.getEstablished()  # SwtpmNotRunning if stopped
        except (SwtpmBusy, SwtpmNotRunning):
            # A QEMU that attached since keeps it busy, or (a moment after it
            # attached, before its reset) lets a TPM not yet running answer:
            # either way, the vTPM is QEMU's to migrate.
            await self._refuseIfQEMU()
            raise
        if self.expectKey and not config & CONFIG_FLAG_FILE_KEY:
            raise DeviceError(
                f"vtpm device {name}: key= was given but the swtpm at "
                f"{self.control.address} runs without --key: check its command line"
            )
        params: dict[str, Any] = {
            "format": FORMAT,
            "file_key": bool(config & CONFIG_FLAG_FILE_KEY),
            "migration_key": bool(config & CONFIG_FLAG_MIGRATION_KEY),
        }
        return DeviceDescription("vtpm", name, SIZE_ESTIMATE, params)

    async def _refuseIfQEMU(self) -> None:
        holders = await controlSocketHolders(self.context.reactor, self.control.address)
        qemus = [f"{n} (pid {pid})" for n, pid in holders if "qemu" in n.lower()]
        if qemus:
            raise VTPMOwnedByQEMU(
                qemuMessage(
                    self.spec.name,
                    f"its control socket {self.control.address} is held by "
                    f"{', '.join(qemus)}",
                )
            )

    def accepted(self, params: dict[str, Any]) -> None:
        pass

    def sendRound(self, writer: IRecordWriter, round: int) -> Deferred[RoundResult]:
        return fail(DeviceError(f"vtpm device {self.spec.name}: no pre-copy rounds"))

    def sendFinal(self, writer: IRecordWriter) -> Deferred[ContentDigest]:
        return Deferred.fromCoroutine(self._guard(self._sendFinal(writer)))

    async def _sendFinal(self, writer: IRecordWriter) -> ContentDigest:
        blobs = await self.control.getStateBlobs(decrypt=True)
        offset = 0
        for blob in blobs:
            await writer.writeMetadata(
                {
                    BLOB_KEY: blob.name,
                    "type": blob.blobType,
                    "flags": blob.flags,
                    "offset": offset,
                    "length": len(blob.data),
                    "digest": hashBytes(blob.data).hex,
                }
            )
            for start in range(0, len(blob.data), CHUNK):
                await writer.writeData(offset + start, blob.data[start : start + CHUNK])
            offset += len(blob.data)
        log.info(
            "vtpm {device}: sent {size} bytes of state ({sizes})",
            device=self.spec.name,
            size=offset,
            sizes=", ".join(f"{b.name} {len(b.data)}" for b in blobs),
        )
        return hashBytes(b"".join(blob.data for blob in blobs))

    def rollback(self) -> Deferred[None]:
        # GET_STATEBLOB changes nothing in the TPM (tested): nothing to undo.
        return succeed(None)

    def release(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._guard(self._release()))

    async def _release(self) -> None:
        try:
            await self.control.shutdown()
        except SwtpmError as e:
            raise DeviceError(
                f"vtpm device {self.spec.name}: the source swtpm could not be shut "
                f"down after the commit ({e}): the target runs this TPM now; stop the "
                f"source swtpm yourself"
            )
