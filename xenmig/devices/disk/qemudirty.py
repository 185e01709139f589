"""
QEMU's dirty bitmaps as the source of a disk's changed blocks.

A disk image that a running QEMU writes (``disk:NAME:path=IMG,qmp=SOCKET``)
need not be read whole in every round: QEMU records every write that reaches
the image's file in a dirty bitmap, and each round reads only the blocks the
bitmap names.  The bitmap sits on the image's protocol node (the ``file``
node), so it counts file offsets, which is what the disk kind sends: guest
offsets for a raw image, and clusters, L2 and refcount tables for a qcow2
container.

Each round uses one short QMP connection, as libxl does: QEMU serves one QMP
client at a time, and the devmodel kind and the domain control need it too.

 1. ``transaction``: add the next bitmap and disable the current one at once,
    so that every write lands in exactly one of them;
 2. copy the disabled bitmap onto a new empty node of the image's size (a
    ``null-co`` "view", see L{QEMUDirtyBitmap._exportView}) and export the
    view's bitmap over NBD from QEMU's own server, on a unix socket in a
    private directory (``nbd-server-start``, ``block-export-add``);
 3. read the dirty ranges with ``NBD_CMD_BLOCK_STATUS`` (L{xenmig.clients.nbd});
 4. remove the export and the disabled bitmap, then the view.

Commands that need not wait for each other go together (L{executeAll}): four
round trips to QEMU's monitor a round, where one command at a time took ten.

The first bitmap is added before the first full pass reads the image: writes
during that pass are in it.  L{QEMUDirtyBitmap.stop} removes what is left and
stops the NBD server it started.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from zope.interface import implementer

from xenmig.clients.qmp import JSONObject, QMPConnectionError, QMPError
from xenmig.clients.qmpclient import QMPClient, executeAll, qmpSession
from xenmig.devices.disk.bitmapviews import BitmapViews, quietly
from xenmig.errors import DeviceError
from xenmig.interfaces import IDirtyBlocks

log = Logger()
T = TypeVar("T")

#: Drivers of protocol nodes that hold an image file.
PROTOCOL_DRIVERS = frozenset({"file", "host_device"})


@dataclass
class _SharedServer:
    """QEMU's one NBD server, as this process's bitmaps of that QEMU use it."""

    directory: str = ""
    users: int = 0


#: The NBD servers started here, by the real path of their QEMU's QMP socket.
_servers: dict[str, _SharedServer] = {}


@implementer(IDirtyBlocks)
class QEMUDirtyBitmap(BitmapViews):
    """
    The writes QEMU makes to the image at ``path``, from its QMP socket.

    @param node: the protocol node's name; found from ``path`` when empty.
    @param granularity: bytes per bit of the bitmap, a power of two: the ranges
        collected are multiples of it (the disk kind asks for 64 KiB).
    @param timeout: seconds each QMP session (one per step) or NBD exchange may
        take.
    """

    def __init__(
        self,
        reactor: Any,
        qmpPath: str,
        path: str,
        node: str = "",
        granularity: int = 64 * 1024,
        timeout: float = 10.0,
    ) -> None:
        if granularity < 512 or granularity & (granularity - 1):
            raise ValueError("a dirty bitmap's granularity is a power of two >= 512")
        self.reactor = reactor
        self.qmpPath = qmpPath
        self.path = path
        self.node = node
        self.granularity = granularity
        self.timeout = timeout
        self.description = f"QEMU's dirty bitmap on {path} (QMP {qmpPath})"
        self._prefix = f"xenmig-{uuid.uuid4().hex[:12]}"
        self._generation = 0
        self._active = ""
        self._serverKey = os.path.realpath(qmpPath)
        self._sharing = False
        self._stopped = False
        #: Views QEMU still counted in use after every retry: removed later.
        self._strayViews: list[str] = []

    # -- IDirtyBlocks ---------------------------------------------------------------

    def start(self) -> Deferred[None]:
        return self._session(self._start)

    def collect(self) -> Deferred[list[tuple[int, int]]]:
        return self._session(self._collect)

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    # -- steps ------------------------------------------------------------------------

    async def _start(self, qmp: QMPClient) -> None:
        if self._active or self._stopped:
            raise DeviceError(f"{self.description}: already started")
        if not self.node:
            self.node = await self._findNode(qmp)
        name = self._nextName()
        await qmp.execute("block-dirty-bitmap-add", self._bitmap(self.node, name))
        self._active = name
        log.info(
            "recording writes to {path} in dirty bitmap {name} on node {node}",
            path=self.path,
            name=name,
            node=self.node,
        )

    async def _collect(self, qmp: QMPClient) -> list[tuple[int, int]]:
        if not self._active or self._stopped:
            raise DeviceError(f"{self.description}: not recording")
        if self._strayViews:
            await self._deleteStrayViews(qmp)
        done, following = self._active, self._nextName()
        # The swap, and the size a view needs, in one round trip.
        swap, nodes = await executeAll(
            qmp,
            [
                (
                    "transaction",
                    {
                        "actions": [
                            {
                                "type": "block-dirty-bitmap-add",
                                "data": self._bitmap(self.node, following),
                            },
                            {
                                "type": "block-dirty-bitmap-disable",
                                "data": {"node": self.node, "name": done},
                            },
                        ]
                    },
                ),
                ("query-named-block-nodes", {"flat": True}),
            ],
        )
        if isinstance(swap, QMPError):
            raise swap
        self._active = following
        view = f"{done}-view"
        try:
            socket = await self._server(qmp)
            await self._exportView(qmp, done, view, self._sizeIn(nodes))
        except BaseException as e:
            if isinstance(e, CancelledError):  # QEMU may have run the batch
                await self._abandon(qmp, view)
            await qmp.execute(
                "block-dirty-bitmap-remove", {"node": self.node, "name": done}
            )
            raise
        try:
            try:
                return await self._read(socket, view)
            finally:
                await self._dropExport(qmp, view, done)
        finally:
            await self._deleteView(qmp, view)

    async def _server(self, qmp: QMPClient) -> str:
        """
        QEMU's NBD server on a private socket: QEMU runs one, so the bitmaps of
        one QEMU in this process share it (a VM's several disks); the first to
        need it starts it, the last to stop stops it.
        """
        shared = _servers.setdefault(self._serverKey, _SharedServer())
        if not self._sharing:
            shared.users += 1
            self._sharing = True
        if not shared.directory:
            directory = tempfile.mkdtemp(prefix="xenmig-nbd-")
            socket = os.path.join(directory, "nbd.sock")
            try:
                await qmp.execute(
                    "nbd-server-start",
                    {"addr": {"type": "unix", "data": {"path": socket}}},
                )
            except QMPError as e:
                shutil.rmtree(directory, ignore_errors=True)
                raise DeviceError(
                    f"{self.description}: QEMU cannot export the bitmap: {e.desc} "
                    "(QEMU runs one NBD server; is another one running, e.g. for a "
                    "storage migration?)"
                )
            shared.directory = directory
        return os.path.join(shared.directory, "nbd.sock")

    async def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if not self._generation:
            return  # no bitmap was ever asked of QEMU
        # What to remove is decided inside the clean-up's own QMP session:
        # QEMU serves one session at a time, so a start or collect under way
        # now ends first, and may add a bitmap or take the NBD server.
        try:
            await self._session(self._cleanUp)
        except QMPConnectionError as e:
            # QEMU has exited (as a released source VM's does): nothing of
            # ours is left in it.
            log.info("{what}: nothing to clean up: {e}", what=self.description, e=e)
            if self._leaveServer():
                self._forgetServer()
        except Exception as e:
            log.warn("{what}: could not clean up: {e}", what=self.description, e=e)
            if self._leaveServer():
                self._forgetServer()

    async def _cleanUp(self, qmp: QMPClient) -> None:
        await self._deleteStrayViews(qmp)
        bitmap, self._active = self._active, ""
        if bitmap:
            await quietly(
                qmp.execute(
                    "block-dirty-bitmap-remove", {"node": self.node, "name": bitmap}
                )
            )
        # Checked inside this QMP session, which QEMU runs alone: another
        # bitmap that took the server meanwhile keeps it running.
        shared = _servers.get(self._serverKey)
        if self._leaveServer() and shared is not None and shared.users == 0:
            if shared.directory:
                await quietly(qmp.execute("nbd-server-stop"))
            self._forgetServer()

    def _leaveServer(self) -> bool:
        """Stop counting as a user of the shared NBD server; whether this was one."""
        leaving, self._sharing = self._sharing, False
        if leaving:
            _servers[self._serverKey].users -= 1
        return leaving

    def _forgetServer(self) -> None:
        """Drop the shared server's record once nobody uses it."""
        shared = _servers.get(self._serverKey)
        if shared is not None and shared.users == 0:
            del _servers[self._serverKey]
            if shared.directory:
                shutil.rmtree(shared.directory, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------

    def _nextName(self) -> str:
        name = f"{self._prefix}-{self._generation}"
        self._generation += 1
        return name

    async def _findNode(self, qmp: QMPClient) -> str:
        nodes: list[JSONObject] = await qmp.execute(
            "query-named-block-nodes", {"flat": True}
        )
        wanted = os.path.realpath(self.path)
        found = sorted(
            {
                node["node-name"]
                for node in nodes
                if node.get("drv") in PROTOCOL_DRIVERS
                and os.path.realpath(str(node.get("file", ""))) == wanted
            }
        )
        if len(found) == 1:
            return found[0]
        if not found:
            files = sorted({str(node.get("file", "")) for node in nodes}) or ["none"]
            raise DeviceError(
                f"{self.description}: QEMU has no block node for this image "
                f"(its images: {', '.join(files)})"
            )
        raise DeviceError(
            f"{self.description}: QEMU has several nodes for this image "
            f"({', '.join(found)}); name one with qmp-node=NAME"
        )

    def _session(self, work: Callable[[QMPClient], Awaitable[T]]) -> Deferred[T]:
        """
        Run ``work`` on a fresh QMP connection, closed afterwards, within
        ``timeout`` seconds (L{qmpSession}): a hung QEMU must not hold a
        migration.  QEMU's refusals become L{DeviceError}s naming the bitmap.
        """

        async def named(qmp: QMPClient) -> T:
            try:
                return await work(qmp)
            except QMPError as e:
                raise DeviceError(f"{self.description}: {e}")

        return qmpSession(
            self.reactor, self.qmpPath, self.timeout, named, self.description
        )
