"""
The incoming QEMU's block node that takes over the installed image, over QMP.

An incoming QEMU must be started before the disk's image exists on the target:
the toolstack gives it a placeholder below the guest's block node (a ``null-co``
node of the image's size), and at the commit, once the image is installed at
its final path, the disk kind opens it in that QEMU (``blockdev-add``), puts it
below the guest's node in the placeholder's place (``blockdev-reopen`` of the
``raw`` node with the new ``file`` child) and removes the placeholder
(``blockdev-del``).  The guest's device never changes; it only ever sees the
placeholder (while it is paused) and then the installed image.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from xenmig.clients.qmp import QMPError
from xenmig.clients.qmpclient import QMPClient, executeAll, qmpSession
from xenmig.errors import CommitFailed, DeviceError, DeviceRefused

log = Logger()

#: Seconds a QMP session of the disk kind may take.  The device model's load
#: may hold the monitor meanwhile (QEMU serves one client at a time).
QMP_TIMEOUT = 120.0


def _nodes(client: QMPClient) -> Deferred[list[dict[str, Any]]]:
    return client.execute("query-named-block-nodes", {"flat": True})


class IncomingDisk:
    """
    The block node ``node`` of the QEMU at ``qmpPath`` (waiting for a migration),
    whose ``file`` child the image installed by device ``name`` replaces.
    """

    def __init__(
        self, reactor: Any, qmpPath: str, node: str, name: str, migrationId: str
    ) -> None:
        self.reactor = reactor
        self.qmpPath = qmpPath
        self.node = node
        self.name = name
        tag = hashlib.blake2b(f"{migrationId}/{name}".encode(), digest_size=6)
        #: The name of the installed image's node (at most 31 characters).
        self.imageNode = f"xenmig-{tag.hexdigest()}"
        self.placeholder = ""
        self.attached = False

    @property
    def what(self) -> str:
        return f"device {self.name}: node {self.node!r} of the QEMU at {self.qmpPath}"

    def _session(self, work: Any) -> Deferred[Any]:
        return qmpSession(self.reactor, self.qmpPath, QMP_TIMEOUT, work, self.what)

    # -- at Prepare -------------------------------------------------------------------

    async def check(self, destination: str, size: int | None) -> None:
        """
        The node exists, is a ``raw`` format node, and its child is not the
        destination (a placeholder); its size is ``size`` if given.

        @raise DeviceRefused: saying what the toolstack must change.
        """
        try:
            await self._session(lambda client: self._check(client, destination, size))
        except DeviceRefused:
            raise
        except DeviceError as e:
            raise DeviceRefused(f"device {self.name}: {e}")

    async def _check(
        self, client: QMPClient, destination: str, size: int | None
    ) -> None:
        nodes = {n["node-name"]: n for n in await _nodes(client)}
        node = nodes.get(self.node)
        if node is None:
            known = ", ".join(sorted(nodes)) or "none"
            raise DeviceRefused(
                f"{self.what}: no such node (it has {known});"
                f" start the incoming QEMU with -blockdev driver=raw,node-name="
                f"{self.node},file=PLACEHOLDER (doc/disk.md)"
            )
        if node.get("drv") != "raw":
            raise DeviceRefused(
                f"{self.what}: the node's driver is {node.get('drv')!r}; it must be a "
                f"'raw' node above a placeholder, whose file child the image replaces"
            )
        self.placeholder = await self._child(client)
        child = nodes.get(self.placeholder, {})
        filename = child.get("file", "")
        if filename and os.path.realpath(filename) == os.path.realpath(destination):
            raise DeviceRefused(
                f"{self.what}: the node already opens {destination}, where the "
                f"migrated image is to be installed; give it a placeholder instead "
                f"(driver=null-co)"
            )
        virtual = node.get("image", {}).get("virtual-size")
        if size is not None and virtual is not None and virtual != size:
            raise DeviceRefused(
                f"{self.what}: the node has {virtual} bytes, the image {size}; give "
                f"the placeholder the image's size (null-co's size={size})"
            )

    async def _child(self, client: QMPClient) -> str:
        """The node name of the ``file`` child of the guest's node."""
        graph = await client.execute("x-debug-query-block-graph")
        names = {n["id"]: n.get("name", "") for n in graph.get("nodes", [])}
        ids = [i for i, name in names.items() if name == self.node]
        for edge in graph.get("edges", []):
            if edge.get("parent") in ids and edge.get("name") == "file":
                return str(names.get(edge.get("child"), ""))
        raise DeviceRefused(f"{self.what}: the node has no file child")

    # -- at finish --------------------------------------------------------------------

    def checkAccess(self, staged: str, directory: str) -> None:
        """
        Blocking: whether the QEMU's user may open the image, staged at
        ``staged`` with the owner and mode it is installed with, once it is in
        ``directory``.

        @raise DeviceError: naming the QEMU's user and what it lacks.
        """
        try:
            user = qemuUser(self.qmpPath)
        except (ConnectionRefusedError, FileNotFoundError) as e:
            # The QEMU has gone since Prepare.  Its devmodel device says why,
            # in QEMU's own words, if it has one; the commit's attach fails
            # anyway.  Failing here first would hide that reason behind this one.
            log.info("{what}: gone ({error}); not checked", what=self.what, error=e)
            return
        except OSError as e:
            raise DeviceError(f"{self.what}: cannot tell who runs it: {e.strerror}")
        if user is None or user[0] == 0:
            return  # root, or not to be told: QEMU will say at the commit
        uid, gids = user
        image, folder = os.stat(staged), os.stat(directory)
        if not _may(uid, gids, image, 6) or not _may(uid, gids, folder, 1):
            raise DeviceError(
                f"{self.what}: that QEMU runs as uid {uid} (groups "
                f"{', '.join(map(str, sorted(gids)))}) and could not open the image "
                f"(owner {image.st_uid}:{image.st_gid}, mode "
                f"{image.st_mode & 0o777:04o}, in {directory}) to read and write it; "
                f"give it to QEMU's user or group (target-owner=, target-mode=, or "
                f"the daemon's --image-owner, --image-mode)"
            )

    # -- at the commit ----------------------------------------------------------------

    async def attach(self, path: str, format: str) -> None:
        """
        Open the installed image at ``path`` in the QEMU and put it below the
        guest's node in the placeholder's place; remove the placeholder.

        @raise CommitFailed: with QEMU's words; the placeholder stays.
        """
        log.debug("disk {device}: attaching {path}", device=self.name, path=path)
        try:
            await self._session(lambda client: self._attach(client, path, format))
        except CommitFailed:
            raise
        except DeviceError as e:
            raise CommitFailed(f"{self.what}: {e}")
        log.debug("disk {device}: attached {path}", device=self.name, path=path)

    async def _attach(self, client: QMPClient, path: str, format: str) -> None:
        status = (await client.execute("query-status"))["status"]
        if status not in ("paused", "inmigrate", "prelaunch"):
            raise CommitFailed(
                f"{self.what} is {status!r}: the guest must not run before its disk "
                f"is attached"
            )
        placeholder = self.placeholder or await self._child(client)
        await client.execute(
            "blockdev-add", self._options(self.imageNode, path, format)
        )
        # The switch and the placeholder's removal in one round trip (QEMU runs
        # them in order): a placeholder still in use, the switch refused, stays.
        reopened, dropped = await executeAll(
            client,
            [
                (
                    "blockdev-reopen",
                    {
                        "options": [
                            {
                                "driver": "raw",
                                "node-name": self.node,
                                "file": self.imageNode,
                            }
                        ]
                    },
                ),
                ("blockdev-del", {"node-name": placeholder}),
            ],
        )
        if isinstance(reopened, QMPError):
            await client.execute("blockdev-del", {"node-name": self.imageNode})
            raise reopened
        self.attached = True
        if isinstance(dropped, QMPError):  # an implicit child goes by itself
            log.info(
                "disk {device}: placeholder left: {error}",
                device=self.name,
                error=str(dropped),
            )

    @staticmethod
    def _options(
        node: str, path: str, format: str, readOnly: bool = False
    ) -> dict[str, Any]:
        file = {"driver": "file", "filename": path}
        if format == "qcow2":
            options: dict[str, Any] = {"driver": "qcow2", "file": file}
        else:
            options = dict(file)
        options["node-name"] = node
        if readOnly:
            options["read-only"] = True
        return options


def _may(uid: int, gids: set[int], st: os.stat_result, bits: int) -> bool:
    """Whether ``uid`` in ``gids`` has the permission ``bits`` (rwx) on ``st``."""
    shift = 6 if uid == st.st_uid else 3 if st.st_gid in gids else 0
    return (st.st_mode >> shift) & bits == bits


def qemuUser(qmpPath: str) -> tuple[int, set[int]] | None:
    """
    Blocking: the uid and the groups of the process serving the unix socket
    ``qmpPath`` (from the socket's peer and its ``/proc`` status, which follows
    a QEMU that dropped its privileges with ``-runas``); None if unknown.
    """
    with socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(5)
        connection.connect(qmpPath)
        credentials = connection.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
    pid = struct.unpack("3i", credentials)[0]
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
    except OSError:
        return None
    uid = int(fields["Uid"].split()[1])  # effective
    gids = {int(fields["Gid"].split()[1]), *map(int, fields["Groups"].split())}
    return uid, gids
