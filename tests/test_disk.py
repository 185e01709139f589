"""Tests for the disk device kind: sparse raw and qcow2 images, live rounds, failure."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import blake3
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import IPlugin
from twisted.python.filepath import FilePath
from zope.interface import implementer
from zope.interface.verify import verifyObject

from xenmig.destinations import resolveDestination
from xenmig.devices.disk.blockmap import (
    BLOCK_SIZE,
    BlockMap,
    BlockScanner,
    hashImage,
    treeAlgorithm,
    treeDigest,
)
from xenmig.devices.disk.imagestaging import BlockDigests
from xenmig.devices.disk.kind import diskKind
from xenmig.devices.disk.source import DiskSource, probeImage
from xenmig.devices.disk.target import DiskTarget
from xenmig.devices.sparse import DataExtents, dataExtents
from xenmig.digest import hashFile
from xenmig.errors import (
    BadSpec,
    DeviceError,
    DeviceRefused,
    PathNotAllowed,
    StreamError,
)
from xenmig.fs import InstallAs
from xenmig.interfaces import (
    IConvergencePolicy,
    IDeviceKind,
    IRecordWriter,
    ISourceContext,
    ISourceDevice,
    ITargetContext,
    ITargetDevice,
)
from xenmig.model import ContentDigest, DeviceDescription, DeviceSpec, RoundResult
from xenmig.records import (
    DataRecord,
    EndRecord,
    MetadataRecord,
    RoundRecord,
    ZeroRecord,
)
from xenmig.source.convergence import ConvergencePolicy, FixedRounds
from xenmig.testing import requirePrograms

MiB = 1024 * 1024
CI = os.environ.get("CI") == "true"


# -- fakes --------------------------------------------------------------------------


@implementer(ISourceContext)
class FakeSourceContext:
    """A source context whose thread pool is the reactor's."""

    migrationId = "m-disk-test"
    domain = "vm-test"

    def __init__(self) -> None:
        self.reactor = reactor

    def runInThread(self, function: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return deferToThread(function, *args, **kw)

    def callPeer(self, method: str, payload: dict[str, Any]) -> Deferred[dict]:
        return fail(DeviceError("no peer in this test"))


@implementer(ITargetContext)
class FakeTargetContext:
    """A target context allowing destinations under ``roots``; staging beside them."""

    migrationId = "m-disk-test"
    domain = "vm-test"
    peer = "source.example"
    installAs = InstallAs()

    def __init__(self, roots: list[FilePath], stagingDir: FilePath) -> None:
        self.reactor = reactor
        self.roots = roots
        self.stagingDir = stagingDir

    def runInThread(self, function: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return deferToThread(function, *args, **kw)

    def stagingPathFor(self, destination: FilePath, suffix: str = "") -> FilePath:
        return destination.sibling(
            f".{destination.basename()}.xenmig-{self.migrationId}{suffix}"
        )

    def resolveDestination(self, path: str) -> FilePath:
        return resolveDestination(path, self.roots)  # the daemon's own rules


@implementer(IRecordWriter)
class PipeWriter:
    """Hands every record straight to a target device, with its backpressure."""

    def __init__(self, target: ITargetDevice) -> None:
        self.target = target
        self.bytesWritten = 0
        self.dataRecords = 0
        self.onData: Callable[[int], None] | None = None
        self.failAfter: int | None = None

    def _deliver(self, record: Any) -> Deferred[None]:
        if self.failAfter is not None and self.dataRecords > self.failAfter:
            return fail(ConnectionError("stream connection lost"))
        d = maybeDeferred(self.target.receive, record)
        return d.addCallback(lambda _: None)

    def writeData(self, offset: int, data: bytes) -> Deferred[None]:
        self.bytesWritten += len(data)
        self.dataRecords += 1
        d = self._deliver(DataRecord(offset, data))
        if self.onData is not None:
            self.onData(self.dataRecords)
        return d

    def writeZero(self, offset: int, length: int) -> Deferred[None]:
        self.bytesWritten += length
        return self._deliver(ZeroRecord(offset, length))

    def writeMetadata(self, metadata: dict[str, Any]) -> Deferred[None]:
        return self._deliver(MetadataRecord(metadata))

    def startRound(self, number: int, final: bool) -> None:
        """What the framework does before each round: a ROUND record."""
        self.target.receive(RoundRecord(number, final))


@dataclasses.dataclass
class Migration:
    """A source and a target device wired by a L{PipeWriter}, as the client would."""

    source: DiskSource
    target: DiskTarget
    writer: PipeWriter
    results: list[RoundResult]

    async def rounds(
        self,
        policy: IConvergencePolicy,
        between: Callable[[int], Awaitable[None] | None] | None = None,
    ) -> list[RoundResult]:
        """Send pre-copy rounds until ``policy`` stops them."""
        number = len(self.results)
        while True:
            self.writer.startRound(number, False)
            result = await self.source.sendRound(self.writer, number)
            self.results.append(result)
            if not policy.proceed(number, result):
                return self.results
            if between is not None:
                await _maybeAwait(between(number))
            number += 1

    async def final(self) -> ContentDigest:
        """Send the final round and END; check the target's digest; commit."""
        self.writer.startRound(len(self.results), True)
        digest = await self.source.sendFinal(self.writer)
        end = EndRecord(digest.size, digest.algorithm, digest.digest)
        staged = await self.target.finish(end)
        assert staged == digest
        await self.target.commit()
        await self.source.release()
        return digest


async def _maybeAwait(value: Awaitable[None] | None) -> None:
    if value is not None:
        await value


def makeSpec(source: str, target: str, **extra: str) -> DeviceSpec:
    text = f"disk:d0:path={source},target={target}"
    for key, value in extra.items():
        text += f",{key.replace('_', '-')}={value}"
    return DeviceSpec.parse(text)


async def prepare(
    tmp_path: Any,
    image: str,
    destination: str | None = None,
    roots: list[FilePath] | None = None,
    source: DiskSource | None = None,
    **extra: str,
) -> Migration:
    """Describe, build the target, accept: the Prepare phase."""
    dest = destination or str(tmp_path / "dest" / "out.img")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if source is None:
        source = DiskSource(makeSpec(image, dest, **extra), FakeSourceContext())
    description = (await source.describe()).withTargetParams(source.spec)
    context = FakeTargetContext(
        roots or [FilePath(os.path.dirname(dest))], FilePath(str(tmp_path))
    )
    target = diskKind.target(description, context)
    params = await target.accept()
    source.accepted(params)
    return Migration(source, target, PipeWriter(target), [])


# -- images -------------------------------------------------------------------------


def needQemu() -> None:
    """Skip (or, on CI, fail) when qemu-img or qemu-io is missing."""
    requirePrograms("qemu-img", "qemu-io")


async def run(*argv: str) -> tuple[int, str]:
    """Run a program without blocking the reactor; its exit code and output."""
    out, err, code = await getProcessOutputAndValue(
        shutil.which(argv[0]) or argv[0], argv[1:], env=dict(os.environ)
    )
    return code, (out + err).decode(errors="replace")


def sparseImage(path: str, size: int, extents: list[tuple[int, int]]) -> None:
    """A sparse raw file of ``size`` with random bytes in each ``(offset, length)``."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in extents:
            f.seek(offset)
            f.write(os.urandom(length))


def pwrite(path: str, data: bytes, offset: int) -> None:
    """A guest write, as QEMU does it: in place, never through the migration."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


async def digestOf(path: str) -> ContentDigest:
    """The plain content digest of a file (to tell that it did not change)."""
    return await deferToThread(hashFile, path)


async def treeOf(path: str) -> ContentDigest:
    """The disk kind's content digest of an image, computed independently."""
    return await deferToThread(hashImage, path)


# -- plumbing -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fakes_and_devices_provide_their_interfaces(tmp_path: Any) -> None:
    """The kind, both device sides, the policies and the test fakes verify."""
    image = str(tmp_path / "a.img")
    sparseImage(image, 4 * MiB, [(0, 4096)])
    migration = await prepare(tmp_path, image)
    assert verifyObject(IPlugin, diskKind)
    assert verifyObject(IDeviceKind, diskKind)
    assert verifyObject(ISourceDevice, migration.source)
    assert verifyObject(ITargetDevice, migration.target)
    assert verifyObject(IRecordWriter, migration.writer)
    assert verifyObject(ISourceContext, migration.source.context)
    assert verifyObject(ITargetContext, migration.target.context)
    assert verifyObject(IConvergencePolicy, ConvergencePolicy())
    assert verifyObject(IConvergencePolicy, FixedRounds(2))
    await migration.target.abort()
    await migration.source.rollback()


def test_bad_specs_are_refused() -> None:
    """A spec without path or target, with a bad format or unknown key is BadSpec."""
    context = FakeSourceContext()
    for text in [
        "disk:d0:target=/x",
        "disk:d0:path=/x",
        "disk:d0:path=/x,target=/y,format=vmdk",
        "disk:d0:path=/x,target=/y,colour=red",
    ]:
        with pytest.raises(BadSpec, match="device d0"):
            diskKind.source(DeviceSpec.parse(text), context)


@pytest_twisted.ensureDeferred
async def test_describe_reports_sizes_and_format(tmp_path: Any) -> None:
    """describe() gives the apparent size, the allocated size and the raw format."""
    image = str(tmp_path / "a.img")
    sparseImage(image, 64 * MiB, [(MiB, 2 * MiB)])
    source = DiskSource(makeSpec(image, "/nowhere/b.img"), FakeSourceContext())
    description = await source.describe()
    assert (description.kind, description.size) == ("disk", 64 * MiB)
    assert description.precopy is True
    assert description.params["format"] == "raw"
    assert description.params["allocated"] == allocated(image)
    # The spec's target keys are the framework's to add, once (not describe's).
    assert "target" not in description.params
    sent = description.withTargetParams(source.spec)
    assert sent.params["target"] == "/nowhere/b.img"
    await source.rollback()


@pytest_twisted.ensureDeferred
async def test_declared_qcow2_that_is_raw_fails(tmp_path: Any) -> None:
    """A raw file declared format=qcow2 fails describe() naming the device."""
    image = str(tmp_path / "a.img")
    sparseImage(image, MiB, [])
    source = DiskSource(makeSpec(image, "/x/b", format="qcow2"), FakeSourceContext())
    with pytest.raises(DeviceError, match="device d0: .* is not a qcow2 image"):
        await source.describe()
    await source.rollback()


# -- whole images -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sparse_raw_gib_migrates_identical_and_sparse(tmp_path: Any) -> None:
    """A 1 GiB raw image with 10% data arrives identical, about as sparse, untouched."""
    needQemu()
    rng = random.Random(4)
    extents = [
        (rng.randrange(0, 1024 * MiB - 2 * MiB, 4096), rng.randrange(4096, 2 * MiB))
        for _ in range(100)
    ]
    image = str(tmp_path / "big.img")
    sparseImage(image, 1024 * MiB, extents)
    before = await digestOf(image)
    migration = await prepare(tmp_path, image)
    await migration.rounds(FixedRounds(1))
    digest = await migration.final()
    destination = str(tmp_path / "dest" / "out.img")
    assert before == await digestOf(image) == await digestOf(destination)
    assert digest == await treeOf(image) == await treeOf(destination)
    code, output = await run(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", image, destination
    )
    assert code == 0, output
    assert os.path.getsize(destination) == 1024 * MiB
    assert abs(allocated(destination) - allocated(image)) <= allocated(image) // 20
    assert os.listdir(tmp_path / "dest") == ["out.img"]
    assert migration.results[0].bytesSent <= allocated(image)


@pytest_twisted.ensureDeferred
async def test_qcow2_with_zero_clusters_and_live_writes(tmp_path: Any) -> None:
    """A qcow2 image written between rounds arrives clean and equal to the source."""
    needQemu()
    image = str(tmp_path / "vm.qcow2")
    destination = str(tmp_path / "dest" / "vm.qcow2")
    assert (await run("qemu-img", "create", "-q", "-f", "qcow2", image, "256M"))[0] == 0
    code, output = await run(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x5a 0 4M",
        "-c",
        "write -z 16M 8M",
        "-c",
        "write -P 0x33 100M 1M",
        "-c",
        "write -P 0x44 200M 64k",
        image,
    )
    assert code == 0, output
    migration = await prepare(tmp_path, image, destination, format="qcow2")
    assert migration.target.description.params["format"] == "qcow2"

    async def guestWrites(number: int) -> None:
        commands = [["write -P 0x77 50M 2M", "write -z 0 1M"], ["write -P 0x12 3M 4k"]]
        args = [arg for c in commands[number % 2] for arg in ("-c", c)]
        code, output = await run("qemu-io", "-f", "qcow2", *args, image)
        assert code == 0, output

    await migration.rounds(ConvergencePolicy(maxRounds=3, threshold=0), guestWrites)
    await guestWrites(1)
    await migration.final()
    code, output = await run("qemu-img", "check", "-f", "qcow2", destination)
    assert code == 0, output
    code, output = await run(
        "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", image, destination
    )
    assert code == 0, output
    assert allocated(destination) <= allocated(image) + MiB


# -- live rounds --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_live_rounds_send_only_changed_blocks(tmp_path: Any) -> None:
    """Writes during and between rounds are sent once each; the target equals the
    source as it was at the pause."""
    image = str(tmp_path / "live.img")
    sparseImage(image, 64 * MiB, [(0, 16 * MiB)])
    spec = makeSpec(image, str(tmp_path / "dest" / "out.img"))
    # One block per scan and no read-ahead batch: which blocks a write lands in
    # before or after they are read is then certain.
    source = DiskSource(spec, FakeSourceContext(), batchBlocks=2, depth=1)
    migration = await prepare(tmp_path, image, source=source)

    def duringRoundZero(records: int) -> None:
        if records == 3 and not migration.results:
            pwrite(image, b"\x01" * 4096, 1 * MiB)  # block 1: already read
            pwrite(image, b"\x02" * 4096, 12 * MiB)  # block 12: not yet read

    migration.writer.onData = duringRoundZero

    def between(number: int) -> None:
        migration.writer.onData = None
        if number == 1:
            for block in (2, 3, 4):
                pwrite(image, b"\x03" * 4096, block * MiB + 8192)
            pwrite(image, b"\x04" * 4096, 40 * MiB)  # a hole: 4 KiB of new data

    policy = ConvergencePolicy(maxRounds=5, threshold=512 * 1024)
    results = await migration.rounds(policy, between)
    assert [r.bytesSent for r in results] == [16 * MiB, MiB, 3 * MiB + 4096]
    # The guest is paused now: its last writes, then nothing.
    pwrite(image, b"\x05" * 4096, 20 * MiB + 4096)
    pwrite(image, bytes(MiB), 5 * MiB)
    digest = await migration.final()
    final = migration.source.history[-1]
    assert (final.final, final.dataBytes, final.changedBlocks) == (True, 4096, 2)
    assert final.zeroBytes == 2 * MiB - 4096  # block 5, and block 20 but its data
    assert digest == await treeOf(image)
    assert await treeOf(str(tmp_path / "dest" / "out.img")) == digest
    assert await digestOf(str(tmp_path / "dest" / "out.img")) == await digestOf(image)
    # Every block's digest came from the records: nothing was read back.
    staged = migration.target.staged
    assert staged is not None and staged.blocks.table(64 * MiB)[1] == []


@pytest_twisted.ensureDeferred
async def test_irregular_records_are_hashed_from_the_file(tmp_path: Any) -> None:
    """Records that do not cover a block from its start in order still give the
    right digest: those blocks are read back from the staged file."""
    image = str(tmp_path / "a.img")
    size = 6 * MiB + 5000
    sparseImage(image, size, [(0, size)])
    migration = await prepare(tmp_path, image)
    writer, target = migration.writer, migration.target
    expected = bytearray(size)  # what the staged image must hold
    rng = random.Random(7)

    async def data(offset: int, length: int) -> None:
        chunk = rng.randbytes(length)
        expected[offset : offset + length] = chunk
        await writer.writeData(offset, chunk)

    async def zeros(offset: int, length: int) -> None:
        expected[offset : offset + length] = bytes(length)
        await writer.writeZero(offset, length)

    writer.startRound(0, False)
    await data(0, MiB)  # block 0, whole
    await data(MiB, MiB // 2)  # block 1, only its first half
    await zeros(2 * MiB, 3 * MiB)  # blocks 2-4, whole zeros
    await data(5 * MiB + 100, 1000)  # block 5, from its middle
    await data(6 * MiB, 5000)  # the short last block, whole
    writer.startRound(1, True)
    await data(2 * MiB, 4096)  # block 2 from its start, then its rest as zeros
    await zeros(2 * MiB + 4096, MiB - 4096)
    await zeros(3 * MiB + 8192, 4096)  # block 3: a stray write in its middle
    model = tmp_path / "model.img"
    model.write_bytes(bytes(expected))
    want = await treeOf(str(model))
    staged = target.staged
    assert staged is not None
    digest = await target.finish(EndRecord(size, want.algorithm, want.digest))
    assert digest == want
    assert staged.blocks.table(size)[1] == [1, 3, 5]
    await target.commit()
    await migration.source.release()
    assert (tmp_path / "dest" / "out.img").read_bytes() == bytes(expected)


@pytest_twisted.ensureDeferred
async def test_end_with_another_digest_algorithm_is_refused(tmp_path: Any) -> None:
    """An END record with a plain blake3 digest fails the device, naming both."""
    image = str(tmp_path / "a.img")
    sparseImage(image, 2 * MiB, [(0, MiB)])
    migration = await prepare(tmp_path, image)
    await migration.rounds(FixedRounds(1))
    with pytest.raises(StreamError, match="device d0: .*'blake3'; .*'blake3-blocks"):
        migration.target.finish(EndRecord(2 * MiB, "blake3", bytes(32)))
    await migration.target.abort()
    await migration.source.rollback()
    assert os.listdir(tmp_path / "dest") == []


@pytest_twisted.ensureDeferred
async def test_write_during_final_pass_fails(tmp_path: Any) -> None:
    """An image written while the final round reads it (the VM was not really
    paused) fails the device instead of sending a torn image."""
    image = str(tmp_path / "a.img")
    sparseImage(image, 16 * MiB, [(0, 16 * MiB)])
    source = DiskSource(
        makeSpec(image, str(tmp_path / "dest" / "out.img")),
        FakeSourceContext(),
        batchBlocks=1,
        depth=1,
    )
    migration = await prepare(tmp_path, image, source=source)
    await migration.rounds(FixedRounds(1))
    pwrite(image, b"\x09" * 4096, 0)  # the last write before the pause ...
    os.utime(image, ns=(0, 0))  # ... long ago: a later write changes the mtime
    first = migration.writer.dataRecords + 1  # the final round's first record

    def guestStillWrites(records: int) -> None:
        if records == first:
            pwrite(image, b"x", 9 * MiB)

    migration.writer.onData = guestStillWrites
    migration.writer.startRound(1, True)
    with pytest.raises(DeviceError, match="device d0: .*written while its final"):
        await migration.source.sendFinal(migration.writer)
    await migration.target.abort()
    await migration.source.rollback()
    assert os.listdir(tmp_path / "dest") == []


@pytest_twisted.ensureDeferred
async def test_final_without_precopy_sends_everything(tmp_path: Any) -> None:
    """sendFinal alone (no pre-copy round) sends the whole image and its digest."""
    image = str(tmp_path / "a.img")
    sparseImage(image, 8 * MiB + 12345, [(3 * MiB, 100000), (8 * MiB, 12345)])
    migration = await prepare(tmp_path, image)
    digest = await migration.final()
    assert digest == await treeOf(image)
    assert digest == await treeOf(str(tmp_path / "dest" / "out.img"))
    assert digest.algorithm == treeAlgorithm(BLOCK_SIZE) == "blake3-blocks-1024k"


# -- refusals at Prepare ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_destination_outside_roots_is_refused(tmp_path: Any) -> None:
    """A destination outside the allowed roots is refused at accept."""
    image = str(tmp_path / "a.img")
    sparseImage(image, MiB, [])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(PathNotAllowed, match="device d0: .*outside the allowed roots"):
        await prepare(
            tmp_path,
            image,
            str(outside / "b.img"),
            roots=[FilePath(str(tmp_path / "r"))],
        )
    assert os.listdir(outside) == []


@pytest_twisted.ensureDeferred
async def test_existing_destination_is_refused_unless_overwrite(tmp_path: Any) -> None:
    """An existing destination is refused, and replaced when overwrite is asked."""
    image = str(tmp_path / "a.img")
    sparseImage(image, 4 * MiB, [(0, MiB)])
    existing = tmp_path / "dest" / "out.img"
    existing.parent.mkdir()
    existing.write_bytes(b"old")
    with pytest.raises(DeviceRefused, match="device d0: .*already exists"):
        await prepare(tmp_path, image)
    assert existing.read_bytes() == b"old"
    migration = await prepare(tmp_path, image, target_overwrite="yes")
    digest = await migration.final()
    assert await treeOf(str(existing)) == digest
    assert os.listdir(existing.parent) == ["out.img"]


@pytest_twisted.ensureDeferred
async def test_lack_of_space_is_refused_at_accept(tmp_path: Any) -> None:
    """A target filesystem with less free space than the image's allocation refuses."""
    image = str(tmp_path / "a.img")
    sparseImage(image, 4 * MiB, [(0, MiB)])
    source = DiskSource(makeSpec(image, str(tmp_path / "out.img")), FakeSourceContext())
    description = (await source.describe()).withTargetParams(source.spec)
    huge = dataclasses.replace(
        description, params={**description.params, "allocated": 1 << 60}
    )
    context = FakeTargetContext([FilePath(str(tmp_path))], FilePath(str(tmp_path)))
    target = diskKind.target(huge, context)
    with pytest.raises(DeviceRefused, match="device d0: not enough space"):
        await target.accept()
    await target.abort()
    await source.rollback()
    assert sorted(os.listdir(tmp_path)) == ["a.img"]


# -- failures during the transfer ---------------------------------------------------


@pytest.fixture
def smallFilesystem(tmp_path: Any) -> Any:
    """A 64 MiB tmpfs mounted for the test (root only), unmounted afterwards."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        if CI:
            pytest.fail(f"cannot mount a tmpfs on CI: {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


@pytest_twisted.ensureDeferred
async def test_full_target_filesystem_aborts_cleanly(
    tmp_path: Any, smallFilesystem: Any
) -> None:
    """An image that outgrows the target filesystem fails with a clear message, and
    abort leaves nothing there."""
    image = str(tmp_path / "grow.img")
    sparseImage(image, 256 * MiB, [(0, 8 * MiB)])
    destination = str(smallFilesystem / "vm.img")
    migration = await prepare(tmp_path, image, destination)
    # The guest allocates 96 MiB more after Prepare accepted the image.
    fillHoles(image, [(64 * MiB, 96 * MiB)])
    before = await digestOf(image)
    with pytest.raises(DeviceError, match="device d0: no space left on the target"):
        await migration.rounds(FixedRounds(1))
    await migration.target.abort()
    await migration.source.rollback()
    assert os.listdir(smallFilesystem) == []
    assert await digestOf(image) == before


def fillHoles(path: str, extents: list[tuple[int, int]]) -> None:
    """Write random data into an existing image (the guest filling holes)."""
    for offset, length in extents:
        pwrite(path, os.urandom(length), offset)


@pytest_twisted.ensureDeferred
async def test_image_truncated_under_sender_fails(tmp_path: Any) -> None:
    """An image truncated between rounds fails the next round naming the device."""
    image = str(tmp_path / "a.img")
    sparseImage(image, 32 * MiB, [(0, 32 * MiB)])
    migration = await prepare(tmp_path, image)
    await migration.rounds(FixedRounds(1))
    os.truncate(image, 16 * MiB)
    with pytest.raises(DeviceError, match="device d0: .*changed size.*truncated"):
        await migration.source.sendFinal(migration.writer)
    await migration.target.abort()
    await migration.source.rollback()
    assert os.listdir(tmp_path / "dest") == []


@pytest_twisted.ensureDeferred
async def test_image_truncated_during_round_fails(tmp_path: Any) -> None:
    """An image truncated while a round reads it fails that round."""
    image = str(tmp_path / "a.img")
    sparseImage(image, 32 * MiB, [(0, 32 * MiB)])
    source = DiskSource(
        makeSpec(image, str(tmp_path / "dest" / "out.img")),
        FakeSourceContext(),
        batchBlocks=1,
        depth=1,
    )
    migration = await prepare(tmp_path, image, source=source)

    def truncate(records: int) -> None:
        if records == 4:
            os.truncate(image, 10 * MiB)

    migration.writer.onData = truncate
    with pytest.raises(DeviceError, match="device d0: .*truncated"):
        await migration.rounds(FixedRounds(1))
    await migration.target.abort()
    await migration.source.rollback()
    assert os.listdir(tmp_path / "dest") == []


@pytest_twisted.ensureDeferred
async def test_stream_lost_mid_round_leaves_nothing(tmp_path: Any) -> None:
    """A stream cut mid-round fails the round; abort and rollback leave the
    destination empty and the source intact."""
    image = str(tmp_path / "a.img")
    sparseImage(image, 64 * MiB, [(0, 40 * MiB)])
    before = await digestOf(image)
    migration = await prepare(tmp_path, image)
    migration.writer.failAfter = 10
    with pytest.raises(ConnectionError):
        await migration.rounds(FixedRounds(1))
    with pytest.raises(DeviceError, match="earlier round failed"):
        await migration.source.sendFinal(migration.writer)
    await migration.target.abort()
    await migration.source.rollback()
    assert os.listdir(tmp_path / "dest") == []
    assert await digestOf(image) == before
    with pytest.raises(DeviceError, match="released"):
        await migration.source.sendRound(migration.writer, 1)


@pytest_twisted.ensureDeferred
async def test_rollback_during_a_round_stops_it(tmp_path: Any) -> None:
    """rollback() while a round runs cancels it and closes the image safely."""
    image = str(tmp_path / "a.img")
    sparseImage(image, 64 * MiB, [(0, 64 * MiB)])
    migration = await prepare(tmp_path, image)
    stalled: Deferred[None] = Deferred()
    original = migration.writer.writeData
    migration.writer.writeData = lambda offset, data: stalled  # type: ignore
    migration.writer.startRound(0, False)
    running = migration.source.sendRound(migration.writer, 0)
    await migration.source.rollback()
    assert running.called
    running.addErrback(lambda _: None)
    migration.writer.writeData = original  # type: ignore[method-assign]
    await migration.target.abort()
    assert os.listdir(tmp_path / "dest") == []


# -- block map units ----------------------------------------------------------------


def test_scan_pieces_follow_extents(tmp_path: Any) -> None:
    """A changed block is sent as its data extents, holes and zero data as zeros."""
    path = str(tmp_path / "a.img")
    sparseImage(path, 3 * MiB + 1000, [(4096, 8192), (2 * MiB + 4096, 4096)])
    pwrite(path, bytes(4096), MiB)  # allocated, but zeros
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = BlockMap(3 * MiB + 1000)
        scans = BlockScanner(fd, blocks, "test").scanBlocks(range(0, blocks.count))
        layout = [
            [(p.offset, p.length, p.data is not None) for p in s.pieces] for s in scans
        ]
        again = BlockScanner(fd, blocks, "test").scanBlocks(range(0, blocks.count))
    finally:
        os.close(fd)
    assert layout[0] == [
        (0, 4096, False),
        (4096, 8192, True),
        (12288, MiB - 12288, False),
    ]
    assert layout[1] == [(MiB, MiB, False)]
    assert layout[2][1] == (2 * MiB + 4096, 4096, True)
    assert layout[3] == [(3 * MiB, 1000, False)]
    assert [s.pieces for s in again] == [(), (), (), ()]
    assert blocks.contentDigest() == hashImage(path)
    assert blocks.count == 4 and BLOCK_SIZE == MiB


def test_scan_within_cuts_changed_blocks_to_the_ranges(tmp_path: Any) -> None:
    """With ``within`` (the dirty ranges), a changed block's pieces are cut to
    them and its whole digest recorded; a block never sent goes whole."""
    path = str(tmp_path / "a.img")
    size = 4 * MiB
    sparseImage(path, size, [(0, 2 * MiB)])  # blocks 0, 1 data; 2, 3 holes
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = BlockMap(size)
        scanner = BlockScanner(fd, blocks, "test")
        scanner.scanBlocks(range(0, 3))  # block 3 never scanned: no digest
        pwrite(path, b"\x07" * 4096, 65536 + 4096)  # block 0
        pwrite(path, b"\x08" * 8192, 2 * MiB + 100 * 4096)  # block 2, a hole
        within = [(65536, 131072), (2 * MiB + 393216, 2 * MiB + 458752)]
        scans = scanner.scanBlocks(range(0, 4), within=within)
    finally:
        os.close(fd)
    layout = [
        [(p.offset, p.length, p.data is not None) for p in s.pieces] for s in scans
    ]
    assert layout[0] == [(65536, 65536, True)]
    assert scans[0].pieces[0].data == open(path, "rb").read()[65536:131072]
    assert layout[1] == []  # unchanged
    assert layout[2] == [
        (2 * MiB + 393216, 16384, False),
        (2 * MiB + 409600, 8192, True),
        (2 * MiB + 417792, 40960, False),
    ]
    assert layout[3] == [(3 * MiB, MiB, False)]  # no digest before: whole
    assert blocks.contentDigest() == hashImage(path)


def test_data_extents_agree_with_seek_data(tmp_path: Any) -> None:
    """Asked piece by piece, L{DataExtents} gives the ranges SEEK_DATA/SEEK_HOLE
    give for the whole file, and sees data written into a hole since."""
    path = str(tmp_path / "a.img")
    size = 8 * MiB
    sparseImage(path, size, [(4096, 3 * MiB), (5 * MiB, MiB + 512)])
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = DataExtents(fd)
        rng = random.Random(7)
        for _ in range(200):
            start = rng.randrange(size)
            end = rng.randrange(start, size + 1)
            assert extents.within(start, end) == list(dataExtents(fd, start, end))
        pwrite(path, b"x" * 4096, 7 * MiB)
        assert extents.within(7 * MiB, size) == list(dataExtents(fd, 7 * MiB, size))
        assert extents.within(7 * MiB, size)[0][0] == 7 * MiB
    finally:
        os.close(fd)


def test_data_extents_ask_once_per_extent(tmp_path: Any, monkeypatch: Any) -> None:
    """A dense file read in 1 MiB pieces costs two lseek calls, not two per piece
    (on tmpfs each SEEK_HOLE walks the pages up to the next hole)."""
    path = str(tmp_path / "dense.img")
    with open(path, "wb") as f:
        f.write(b"\1" * (16 * MiB))
    calls = []
    realLseek = os.lseek

    def lseek(fd: int, position: int, how: int) -> int:
        calls.append(how)
        return realLseek(fd, position, how)

    fd = os.open(path, os.O_RDONLY)
    try:
        extents = DataExtents(fd)
        monkeypatch.setattr(os, "lseek", lseek)
        pieces = [extents.within(o, o + MiB) for o in range(0, 16 * MiB, MiB)]
    finally:
        os.close(fd)
    assert pieces == [[(o, o + MiB)] for o in range(0, 16 * MiB, MiB)]
    assert len(calls) == 2


def assertDigestsAreTheModels(
    digests: BlockDigests,
    model: bytearray,
    size: int,
    blockSize: int,
    irregular: bool,
) -> None:
    """
    The block digests, with the blocks they could not tell (none unless the
    writes were ``irregular``) hashed from ``model`` as the target reads them
    back, are the digests of ``model``.
    """
    table, unknown = digests.table(size)
    assert irregular or unknown == []
    for index in unknown:
        chunk = bytes(model[index * blockSize : (index + 1) * blockSize])
        table[index * 32 : (index + 1) * 32] = blake3.blake3(chunk).digest()
    want = b"".join(
        blake3.blake3(bytes(model[start : start + blockSize])).digest()
        for start in range(0, size, blockSize)
    )
    assert treeDigest(size, blockSize, table) == treeDigest(size, blockSize, want)


@pytest.mark.parametrize("seed", range(40))
def test_block_digests_follow_any_records(seed: int) -> None:
    """Whatever records arrive (whole blocks in order, from a block's middle,
    partial, zeros across blocks), the table's digests plus the blocks it says to
    read back give the digest of the content written."""
    rng = random.Random(seed)
    blockSize = 16384
    size = rng.choice([10 * blockSize, 10 * blockSize + 5000])
    count = -(-size // blockSize)
    model = bytearray(size)
    digests = BlockDigests(blockSize)
    irregular = False

    def write(offset: int, length: int, zero: bool) -> None:
        data = None if zero else rng.randbytes(length)
        model[offset : offset + length] = data or bytes(length)
        digests.add(offset, length, data)

    for _ in range(rng.randrange(1, 12)):
        kind = rng.random()
        if kind < 0.5:  # a pass over some blocks, as a source sends them
            first = rng.randrange(0, count)
            for index in range(first, rng.randrange(first, count) + 1):
                start = index * blockSize
                stop = min(start + blockSize, size)
                cut = rng.randrange(start, stop + 1)
                if cut > start:
                    write(start, cut - start, rng.random() < 0.3)
                if stop > cut:
                    write(cut, stop - cut, rng.random() < 0.5)
        else:  # anything
            irregular = True
            offset = rng.randrange(0, size - 1)
            write(
                offset,
                rng.randrange(1, min(3 * blockSize, size - offset) + 1),
                rng.random() < 0.4,
            )
    # whole blocks in order: nothing to read
    assertDigestsAreTheModels(digests, model, size, blockSize, irregular)


def test_block_digests_of_whole_passes_need_no_reading() -> None:
    """Passes of whole blocks (a short last one included, and holes never sent)
    give every digest without reading the staged file."""
    blockSize, size = 16384, 4 * 16384 + 100
    digests = BlockDigests(blockSize)
    model = bytearray(size)
    for _ in range(2):  # two rounds: blocks 0, 1 and the tail; block 2 a hole
        for index in (0, 1, 4):
            start = index * blockSize
            chunk = random.randbytes(min(blockSize, size - start) - 10)
            model[start : start + len(chunk)] = chunk
            digests.add(start, len(chunk), chunk)
            digests.add(start + len(chunk), 10)
        digests.add(3 * blockSize, blockSize)  # zeros, whole
    table, unknown = digests.table(size)
    assert unknown == []
    want = b"".join(
        blake3.blake3(bytes(model[start : start + blockSize])).digest()
        for start in range(0, size, blockSize)
    )
    assert table == want
    assert BlockDigests(blockSize).table(size)[0] == b"".join(
        blake3.blake3(bytes(min(blockSize, size - start))).digest()
        for start in range(0, size, blockSize)
    )


def test_probe_reads_qcow2_backing_file(tmp_path: Any) -> None:
    """probeImage names qcow2 images and their backing file; others are raw."""
    needQemu()
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "1M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"]
        + [top],
        check=True,
    )
    results = []
    for path in (base, top, __file__):
        fd = os.open(path, os.O_RDONLY)
        info = probeImage(fd)
        results.append((info.format, info.backing))
        os.close(fd)
    assert results == [("qcow2", ""), ("qcow2", "base.qcow2"), ("raw", "")]


@pytest_twisted.ensureDeferred
async def test_missing_backing_file_is_refused(tmp_path: Any) -> None:
    """A qcow2 overlay whose backing file is absent on the target is refused."""
    needQemu()
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    assert (await run("qemu-img", "create", "-q", "-f", "qcow2", base, "1M"))[0] == 0
    code, output = await run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top,
    )
    assert code == 0, output
    with pytest.raises(DeviceRefused, match="device d0: .*backing file 'base.qcow2'"):
        await prepare(tmp_path, top)


def test_handle_request_is_refused() -> None:
    """The disk target answers no handler-scoped requests."""
    description = DeviceDescription("disk", "d0", MiB, {"target": "/x/y.img"})
    target = DiskTarget(description, FakeTargetContext([], FilePath("/tmp")))
    failures: list[Any] = []
    target.handleRequest("free-space", {}).addErrback(failures.append)
    assert failures and failures[0].check(DeviceError)
