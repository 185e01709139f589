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

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from xenmig.clients.nbd import connectBlockStatus
from xenmig.clients.qmp import JSONObject, QMPConnectionError, QMPError
from xenmig.clients.qmpclient import QMPClient, executeAll, qmpSession
from xenmig.errors import DeviceError
from xenmig.interfaces import IDirtyBlocks

#: How often removing the bitmap's view node is tried while QEMU says it is in use.
VIEW_DELETE_ATTEMPTS = 20

log = Logger()
T = TypeVar("T")

#: Bit 0 of a ``qemu:dirty-bitmap:`` context's status: the range is dirty.
DIRTY = 1
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
class QEMUDirtyBitmap:
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
        try:
            socket = await self._server(qmp)
            view = await self._exportView(qmp, done, self._sizeIn(nodes))
        except BaseException:
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

    async def _exportView(self, qmp: QMPClient, bitmap: str, size: int) -> str:
        """
        Copy ``bitmap`` into a new, empty node of the image's ``size`` (a
        ``null-co`` node, the "view"), as a bitmap named like the node, and
        export that over NBD; return the name.  One round trip: QEMU runs a
        connection's commands in order.

        The image's own node cannot be exported: an NBD export forbids resizing
        its node, and a qcow2 driver keeps the right to grow its file.  Nothing
        uses the view, so its export conflicts with nothing.  A qcow2 file may
        grow between reading its size and the copy: then it is tried again.
        """
        view = f"{bitmap}-view"
        for _ in range(5):
            added, *rest = await executeAll(
                qmp,
                [
                    (
                        "blockdev-add",
                        {"driver": "null-co", "node-name": view, "size": size},
                    ),
                    (
                        "block-dirty-bitmap-add",
                        {**self._bitmap(view, view), "disabled": True},
                    ),
                    (
                        "block-dirty-bitmap-merge",
                        {
                            "node": view,
                            "target": view,
                            "bitmaps": [{"node": self.node, "name": bitmap}],
                        },
                    ),
                    (
                        "block-export-add",
                        {
                            "type": "nbd",
                            "id": view,
                            "node-name": view,
                            "name": view,
                            "writable": False,
                            "bitmaps": [view],
                        },
                    ),
                ],
            )
            if isinstance(added, QMPError):  # what followed did nothing of ours
                bitmapAdded, _, exported = rest
                if not isinstance(exported, QMPError):
                    await self._dropExport(qmp, view)
                if not isinstance(bitmapAdded, QMPError):
                    await _quietly(
                        qmp.execute(
                            "block-dirty-bitmap-remove", {"node": view, "name": view}
                        )
                    )
                raise added
            refused = [answer for answer in rest if isinstance(answer, QMPError)]
            if not refused:
                return view
            if not isinstance(rest[-1], QMPError):  # exported an empty copy
                await self._dropExport(qmp, view)
            await qmp.execute("blockdev-del", {"node-name": view})
            grown = await self._nodeSize(qmp)
            if grown == size:
                raise refused[0]
            size = grown
        raise DeviceError(
            f"{self.description}: the image kept growing while its dirty bitmap "
            "was copied"
        )

    def _sizeIn(self, nodes: Any) -> int:
        """The image node's size, from ``query-named-block-nodes``' answer."""
        if isinstance(nodes, QMPError):
            raise nodes
        for node in nodes:
            if node.get("node-name") == self.node:
                return int(node["image"]["virtual-size"])
        raise DeviceError(f"{self.description}: node {self.node} is gone from QEMU")

    async def _nodeSize(self, qmp: QMPClient) -> int:
        return self._sizeIn(
            await qmp.execute("query-named-block-nodes", {"flat": True})
        )

    def _bitmap(self, node: str, name: str) -> JSONObject:
        return {
            "node": node,
            "name": name,
            "granularity": self.granularity,
            "persistent": False,
        }

    async def _read(self, socket: str, export: str) -> list[tuple[int, int]]:
        client = await connectBlockStatus(
            self.reactor,
            socket,
            export,
            f"qemu:dirty-bitmap:{export}",
            self.timeout,
        )
        ranges: list[tuple[int, int]] = []
        try:
            await client.marked(DIRTY, lambda start, stop: ranges.append((start, stop)))
        finally:
            client.close()
        return ranges

    async def _deleteView(self, qmp: QMPClient, view: str) -> None:
        """
        Remove the view node.  QEMU may still count it in use for a moment after
        its export went (seen on a loaded machine): then it is asked again, a few
        times.  A view still in use after that is no reason to fail the round,
        whose ranges were read: it only holds a copy of a bitmap no one reads
        again, and is removed at the next round or at L{stop}.
        """
        for attempt in range(VIEW_DELETE_ATTEMPTS):
            try:
                await qmp.execute("blockdev-del", {"node-name": view})
                return
            except QMPError as e:
                if "in use" not in e.desc:
                    raise
                if attempt + 1 == VIEW_DELETE_ATTEMPTS:
                    log.warn(
                        "{what}: {view} still in use; removed later",
                        what=self.description,
                        view=view,
                    )
                    self._strayViews.append(view)
                    return
                log.debug(
                    "{what}: {view} still in use; again",
                    what=self.description,
                    view=view,
                )
                await deferLater(self.reactor, 0.02 * (attempt + 1), lambda: None)

    async def _deleteStrayViews(self, qmp: QMPClient) -> None:
        """Remove the views an earlier round left in use, those QEMU now lets go."""
        for view in list(self._strayViews):
            try:
                await qmp.execute("blockdev-del", {"node-name": view})
            except QMPError as e:
                if "in use" in e.desc:
                    continue
                # gone already, or refused for good: nothing more to do
            self._strayViews.remove(view)

    async def _dropExport(self, qmp: QMPClient, export: str, bitmap: str = "") -> None:
        """
        Remove an export (and the image's disabled ``bitmap``, if named, in
        the same round trip) and wait until QEMU has removed the export (its
        bitmap is busy till then).  Its one client, ours, has read what it
        needed and hung up, but QEMU may not have seen that yet: the export
        goes "hard", dropping what it still counts as connected, instead of
        refusing as "still in use".
        """
        deleted = qmp.waitEvent("BLOCK_EXPORT_DELETED", self.timeout)
        commands: list[tuple[str, JSONObject]] = [
            ("block-export-del", {"id": export, "mode": "hard"})
        ]
        if bitmap:
            commands.append(
                ("block-dirty-bitmap-remove", {"node": self.node, "name": bitmap})
            )
        try:
            dropped, *removed = await executeAll(qmp, commands)
            if isinstance(dropped, QMPError):
                raise dropped
        except BaseException:
            deleted.addErrback(lambda _: None)
            deleted.cancel()
            raise
        await deleted
        for answer in removed:
            if isinstance(answer, QMPError):
                raise answer

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
        active, self._active = self._active, ""
        leaving, self._sharing = self._sharing, False
        if leaving:
            _servers[self._serverKey].users -= 1
        if active or leaving:
            try:
                await self._session(lambda qmp: self._cleanUp(qmp, active, leaving))
            except QMPConnectionError as e:
                # QEMU has exited (as a released source VM's does): nothing of
                # ours is left in it.
                log.info("{what}: nothing to clean up: {e}", what=self.description, e=e)
                if leaving:
                    self._forgetServer()
            except Exception as e:
                log.warn("{what}: could not clean up: {e}", what=self.description, e=e)
                if leaving:
                    self._forgetServer()

    async def _cleanUp(self, qmp: QMPClient, bitmap: str, leaving: bool) -> None:
        await self._deleteStrayViews(qmp)
        if bitmap:
            await _quietly(
                qmp.execute(
                    "block-dirty-bitmap-remove", {"node": self.node, "name": bitmap}
                )
            )
        # Checked inside this QMP session, which QEMU runs alone: another
        # bitmap that took the server meanwhile keeps it running.
        shared = _servers.get(self._serverKey)
        if leaving and shared is not None and shared.users == 0:
            if shared.directory:
                await _quietly(qmp.execute("nbd-server-stop"))
            self._forgetServer()

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


async def _quietly(d: Deferred[Any]) -> None:
    try:
        await d
    except QMPError as e:
        log.debug("ignored while cleaning up: {e}", e=e)
