"""
The disk kind hands the installed image to an incoming QEMU (``target-qmp``,
``target-node``): refused at Prepare when the QEMU is not set up for it, attached
only at the commit, the placeholder kept on an abort.  Real QEMUs, no guest.  And
the installed image's mode: the source's, or ``target-mode``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_twisted
from test_disk import FakeSourceContext, FakeTargetContext
from twisted.internet import reactor
from twisted.python.filepath import FilePath

from xenmig.clients.qmpclient import QMPClient
from xenmig.demo.testguest import QEMU, startQEMU, writeThroughQEMU
from xenmig.devices.disk.kind import DiskKind
from xenmig.errors import CommitFailed, DeviceError, DeviceRefused
from xenmig.model import DeviceDescription, DeviceSpec
from xenmig.testing import PipeWriter, requirePrograms

MiB = 1024 * 1024
SIZE = 8 * MiB


@pytest.fixture(autouse=True)
def _programs() -> None:
    requirePrograms(QEMU, "qemu-img")


@asynccontextmanager
async def incomingQEMU(
    root: FilePath, child: list[str], node: str = "disk0", more: tuple[str, ...] = ()
) -> AsyncIterator[tuple[QMPClient, str]]:
    """
    A paused QEMU (``-S``; as an incoming one is once it loaded the state) with
    the guest's raw node ``disk0`` over the node ``child`` makes (named ``ph``);
    the test's own monitor, and the QMP socket for xenmig.
    """
    control, free = root.child("control.qmp").path, root.child("in.qmp").path
    command = [
        QEMU, "-machine", "none", "-nodefaults", "-no-user-config",
        "-display", "none", "-S", *more, *child,
        "-blockdev", f"driver=raw,file=ph,node-name={node}",
        "-qmp", f"unix:{control},server=on,wait=off",
        "-qmp", f"unix:{free},server=on,wait=off",
    ]  # fmt: skip
    guest = await startQEMU(reactor, command, control)
    try:
        yield guest.qmp, free
    finally:
        await guest.terminate()


def placeholder(size: int = SIZE) -> list[str]:
    return ["-blockdev", f"driver=null-co,node-name=ph,size={size},read-zeroes=on"]


async def nodeFiles(qmp: QMPClient) -> dict[str, str]:
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    return {n["node-name"]: n["file"] for n in nodes}


async def staged(
    tmp_path: Any, root: FilePath, qmpPath: str, format: str = "raw", **keys: str
) -> tuple[Any, str, bytes]:
    """A source image migrated into a disk target (not yet committed)."""
    if qmpPath:
        keys = {"target-qmp": qmpPath, "target-node": "disk0", **keys}
    image = str(tmp_path / f"src.{format}")
    if format == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE)])
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 1M", image],
            check=True,
            capture_output=True,
        )
        content = b"\x33" * 4096
    else:
        content = os.urandom(MiB)
        with open(image, "wb") as f:
            f.write(content)
            f.truncate(SIZE)
        os.chmod(image, 0o640)
    spec = DeviceSpec.parse(
        f"disk:disk0:path={image},target=vm.img,format={format}"
        + "".join(f",{k}={v}" for k, v in keys.items())
    )
    kind = DiskKind()
    source = kind.source(spec, FakeSourceContext())
    description = await source.describe()
    description = DeviceDescription(
        "disk",
        "disk0",
        description.size,
        {**spec.targetParams, **description.params},
        precopy=True,
    )
    target = kind.target(description, FakeTargetContext([root], root))
    return (source, target), str(root.child("vm.img").path), content[:4096]


async def run(pair: Any) -> None:
    source, target = pair
    await target.accept()
    writer = PipeWriter(target)
    digest = await source.sendFinal(writer)
    assert await writer.finish(digest) == digest
    await source.release()


@pytest.mark.parametrize("format", ["raw", "qcow2"])
@pytest_twisted.ensureDeferred
async def test_attachedAtCommit(tmp_path: Any, format: str) -> None:
    """At the commit the QEMU's node opens the installed image; a write lands there."""
    root = FilePath(str(tmp_path))
    async with incomingQEMU(root, placeholder()) as (qmp, qmpPath):
        pair, destination, head = await staged(tmp_path, root, qmpPath, format)
        await run(pair)
        assert (await nodeFiles(qmp))["disk0"].endswith('"null-co", "size": 8388608}}')
        installed = await pair[1].commit()
        assert installed[0] == destination
        files = await nodeFiles(qmp)
        assert "ph" not in files  # the placeholder is gone
        assert files["disk0"] == destination or destination in files["disk0"]
        await writeThroughQEMU(qmp, "disk0", 2 * MiB, 4096, 0x77)
        await qmp.execute(
            "human-monitor-command", {"command-line": 'qemu-io disk0 "flush"'}
        )
    # The migrated content and the write after the attach are both in the file.
    for check in ("read -P 0x77 2M 4k", f"read -P 0x{head[0]:02x} 0 1"):
        result = subprocess.run(
            ["qemu-io", "-f", format, "-c", check, destination],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and "failed" not in result.stdout, result


@pytest_twisted.ensureDeferred
async def test_aRefusedAttachKeepsThePlaceholder(tmp_path: Any) -> None:
    """
    QEMU refuses to open the installed image at the commit (here its node
    name is taken): the commit fails with QEMU's words, the guest's node
    still has its placeholder, and nothing of the attempt stays in QEMU.
    """
    root = FilePath(str(tmp_path))
    async with incomingQEMU(root, placeholder()) as (qmp, qmpPath):
        pair, destination, _ = await staged(tmp_path, root, qmpPath)
        await run(pair)
        incoming = pair[1].incoming
        taken = {"driver": "null-co", "node-name": incoming.imageNode, "size": MiB}
        await qmp.execute("blockdev-add", taken)
        before = await nodeFiles(qmp)
        with pytest.raises(CommitFailed, match=incoming.imageNode):
            await pair[1].commit()
        assert not incoming.attached
        assert await nodeFiles(qmp) == before
        assert "null-co" in before["disk0"] and "ph" in before


@pytest_twisted.ensureDeferred
async def test_abortLeavesThePlaceholder(tmp_path: Any) -> None:
    """An abort after the transfer attaches nothing and installs nothing."""
    root = FilePath(str(tmp_path))
    async with incomingQEMU(root, placeholder()) as (qmp, qmpPath):
        pair, destination, _ = await staged(tmp_path, root, qmpPath)
        await run(pair)
        await pair[1].abort()
        files = await nodeFiles(qmp)
        assert set(files) == {"disk0", "ph"} and "null-co" in files["disk0"]
    assert not os.path.exists(destination)


@pytest_twisted.ensureDeferred
async def test_refusedWithoutTheNode(tmp_path: Any) -> None:
    """A QEMU without the named node is refused at Prepare, its nodes named."""
    root = FilePath(str(tmp_path))
    async with incomingQEMU(root, placeholder(), node="other") as (_, qmpPath):
        pair, _, _ = await staged(tmp_path, root, qmpPath)
        with pytest.raises(DeviceRefused, match=r"no such node \(it has other, ph\)"):
            await pair[1].accept()


@pytest_twisted.ensureDeferred
async def test_refusedWhenTheSizeDiffers(tmp_path: Any) -> None:
    """A placeholder of another size than the raw image is refused at Prepare."""
    root = FilePath(str(tmp_path))
    async with incomingQEMU(root, placeholder(4 * MiB)) as (_, qmpPath):
        pair, _, _ = await staged(tmp_path, root, qmpPath)
        with pytest.raises(
            DeviceRefused, match="the node has 4194304 bytes, the image"
        ):
            await pair[1].accept()


@pytest_twisted.ensureDeferred
async def test_refusedWhenTheQEMUHoldsTheDestination(tmp_path: Any) -> None:
    """A QEMU started on the destination itself is refused (it keeps the old file)."""
    root = FilePath(str(tmp_path))
    destination = root.child("vm.img").path
    with open(destination, "wb") as f:
        f.truncate(SIZE)
    child = ["-blockdev", f"driver=file,node-name=ph,filename={destination}"]
    async with incomingQEMU(root, child) as (_, qmpPath):
        pair, _, _ = await staged(
            tmp_path, root, qmpPath, **{"target-overwrite": "yes"}
        )
        with pytest.raises(DeviceRefused, match="vm.img is open in qemu-system"):
            await pair[1].accept()


@pytest_twisted.ensureDeferred
async def test_commitFailsWhenTheQEMUIsGone(tmp_path: Any) -> None:
    """The commit fails, naming the QEMU, when it went away after the transfer."""
    root = FilePath(str(tmp_path))
    async with incomingQEMU(root, placeholder()) as (qmp, qmpPath):
        pair, _, _ = await staged(tmp_path, root, qmpPath)
        await run(pair)
        await qmp.quit()
    with pytest.raises(CommitFailed, match="node 'disk0' of the QEMU at"):
        await pair[1].commit()


@pytest_twisted.ensureDeferred
async def test_aQEMUGoneBeforeTheEndFailsTheCommitNotTheTransfer(
    tmp_path: Any,
) -> None:
    """
    The incoming QEMU went away during the transfer (it refused the state, say):
    the disk does not fail its verification for it, which would hide the reason
    its devmodel device gives in QEMU's own words; the commit fails, naming the
    QEMU (the session's commit then reverses the install).
    """
    root = FilePath(str(tmp_path))
    async with incomingQEMU(root, placeholder()) as (qmp, qmpPath):
        pair, destination, _ = await staged(tmp_path, root, qmpPath)
        source, target = pair
        await target.accept()
        await qmp.quit()
    writer = PipeWriter(target)
    digest = await source.sendFinal(writer)
    assert await writer.finish(digest) == digest
    await source.release()
    with pytest.raises(CommitFailed, match="node 'disk0' of the QEMU at"):
        await target.commit()


@pytest.mark.parametrize(
    ("keys", "mode"), [({}, 0o640), ({"target-mode": "0604"}, 0o604)]
)
@pytest_twisted.ensureDeferred
async def test_imageModeTravels(tmp_path: Any, keys: dict[str, str], mode: int) -> None:
    """The source image's mode reaches the target, unless target-mode says another."""
    root = FilePath(str(tmp_path))
    pair, destination, _ = await staged(tmp_path, root, "", **keys)
    await run(pair)
    assert await pair[1].commit() == [destination]
    assert os.stat(destination).st_mode & 0o7777 == mode


@pytest.mark.skipif(os.getuid() != 0, reason="QEMU's -runas needs root")
@pytest_twisted.ensureDeferred
async def test_refusedWhenTheQEMUCouldNotOpenIt(tmp_path: Any) -> None:
    """A QEMU running as another user that could not open the image fails finish."""
    root = FilePath(str(tmp_path))
    async with incomingQEMU(root, placeholder(), more=("-runas", "nobody")) as (
        _,
        qmpPath,
    ):
        pair, destination, _ = await staged(tmp_path, root, qmpPath)
        with pytest.raises(DeviceError, match=r"runs as uid \d+ .*could not open"):
            await run(pair)
        await pair[1].abort()
    assert not os.path.exists(destination)


@pytest.mark.skipif(os.getuid() != 0, reason="QEMU's -runas needs root")
@pytest_twisted.ensureDeferred
async def test_anUnprivilegedQEMUGetsItsImage(tmp_path: Any) -> None:
    """With target-owner, a QEMU running as that user runs on the installed image."""
    directory = tempfile.mkdtemp(prefix="xm-owner-")  # not under pytest's 0700 dirs
    os.chmod(directory, 0o755)
    root = FilePath(directory)
    try:
        async with incomingQEMU(root, placeholder(), more=("-runas", "nobody")) as (
            qmp,
            qmpPath,
        ):
            pair, destination, _ = await staged(
                tmp_path, root, qmpPath, **{"target-owner": "nobody"}
            )
            await run(pair)
            await pair[1].commit()
            assert (await nodeFiles(qmp))["disk0"] == destination
            await writeThroughQEMU(qmp, "disk0", 2 * MiB, 4096, 0x66)
            await qmp.execute(
                "human-monitor-command", {"command-line": 'qemu-io disk0 "flush"'}
            )
        assert os.stat(destination).st_uid == pwd.getpwnam("nobody").pw_uid
        with open(destination, "rb") as f:
            f.seek(2 * MiB)
            assert f.read(4096) == b"\x66" * 4096
    finally:
        shutil.rmtree(directory, ignore_errors=True)
