"""
The views a QEMU dirty-bitmap collect reads through (L{BitmapViews}): a copy of
the interval's bitmap on a new empty ``null-co`` node, exported over QEMU's NBD
server, read, and removed again.

The image's own node cannot be exported: an NBD export forbids resizing its
node, and a qcow2 driver keeps the right to grow its file.  Nothing uses a
view, so its export conflicts with nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from xenmig.clients.nbd import connectBlockStatus
from xenmig.clients.qmp import JSONObject, QMPError
from xenmig.clients.qmpclient import QMPClient, executeAll
from xenmig.errors import DeviceError

log = Logger()

#: How often removing the bitmap's view node is tried while QEMU says it is in use.
VIEW_DELETE_ATTEMPTS = 20
#: Bit 0 of a ``qemu:dirty-bitmap:`` context's status: the range is dirty.
DIRTY = 1


class BitmapViews:
    """
    The view steps of L{xenmig.devices.disk.qemudirty.QEMUDirtyBitmap} (a part
    of it): the image's node, its description, the time-out of one NBD
    exchange, the bitmaps' granularity, and the views left in use.
    """

    reactor: Any
    node: str
    description: str
    timeout: float
    granularity: int
    _strayViews: list[str]

    async def _abandon(self, qmp: QMPClient, view: str) -> None:
        """Remove whatever of ``view`` a batch cut off by a cancel made."""
        await quietly(qmp.execute("block-export-del", {"id": view, "mode": "hard"}))
        try:
            await self._deleteView(qmp, view)
        except QMPError:
            pass  # never made

    async def _exportView(
        self, qmp: QMPClient, bitmap: str, view: str, size: int
    ) -> None:
        """
        Copy ``bitmap`` into a new, empty node ``view`` of the image's
        ``size`` (a ``null-co`` node), as a bitmap named like the node, and
        export that over NBD.  One round trip: QEMU runs a
        connection's commands in order.

        The image's own node cannot be exported: an NBD export forbids resizing
        its node, and a qcow2 driver keeps the right to grow its file.  Nothing
        uses the view, so its export conflicts with nothing.  A qcow2 file may
        grow between reading its size and the copy: then it is tried again.
        """
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
                    await quietly(
                        qmp.execute(
                            "block-dirty-bitmap-remove", {"node": view, "name": view}
                        )
                    )
                raise added
            refused = [answer for answer in rest if isinstance(answer, QMPError)]
            if not refused:
                return
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
            except CancelledError:
                self._strayViews.append(view)  # QEMU may not have: removed later
                raise
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


async def quietly(d: Deferred[Any]) -> None:
    try:
        await d
    except QMPError as e:
        log.debug("ignored while cleaning up: {e}", e=e)
