"""The file kind and its staging, driven source to target without a daemon."""

import grp
import os
import pwd
from dataclasses import replace

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import succeed

from xenmig.devices.file import FileKind
from xenmig.digest import hashFile
from xenmig.errors import (
    BadSpec,
    DeviceError,
    DeviceRefused,
    PathNotAllowed,
    StreamError,
)
from xenmig.fs import InstallAs
from xenmig.model import DeviceSpec
from xenmig.records import DataRecord
from xenmig.testing import FakeSourceContext, FakeTargetContext, PipeWriter


def sparseFile(path, size=8 << 20):
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.seek(4 << 20)
        f.write(b"tail" * 1000)
        f.truncate(size)


async def pair(tmp_path, spec, installAs=None, **targetKw):
    kind = FileKind()
    roots = targetKw.pop("roots", [str(tmp_path / "dest")])
    os.makedirs(roots[0], exist_ok=True)
    source = kind.source(DeviceSpec.parse(spec), FakeSourceContext(reactor))
    description = await source.describe()
    params = {**DeviceSpec.parse(spec).targetParams, **description.params}
    description = type(description)(
        description.kind, description.name, description.size, params
    )
    context = FakeTargetContext(
        reactor, roots, stagingDir=str(tmp_path / "staging"), installAs=installAs
    )
    target = kind.target(description, context)
    return source, target, context


@pytest_twisted.ensureDeferred
async def test_migrateSparse(tmp_path):
    """A sparse file arrives equal, still sparse, only at commit, staging gone."""
    src = tmp_path / "src"
    sparseFile(src)
    os.chmod(src, 0o640)
    source, target, context = await pair(tmp_path, f"file:f:path={src},target=out")
    await target.accept()
    writer = PipeWriter(target)
    digest = await source.sendFinal(writer)
    received = await writer.finish(digest)
    assert received == digest
    destination = tmp_path / "dest" / "out"
    assert not destination.exists()
    assert await target.commit() == [str(destination)]
    assert destination.read_bytes() == src.read_bytes()
    assert os.stat(destination).st_blocks <= os.stat(src).st_blocks + 16
    assert writer.dataBytes < 2 << 20
    assert oct(os.stat(destination).st_mode & 0o777) == "0o640"  # the source's
    assert os.listdir(tmp_path / "staging") == []
    assert hashFile(str(destination)) == digest


@pytest_twisted.ensureDeferred
async def test_abortLeavesNothing(tmp_path):
    """Abort after part of the state arrived leaves no destination and no staging."""
    src = tmp_path / "src"
    sparseFile(src)
    source, target, context = await pair(tmp_path, f"file:f:path={src},target=out")
    await target.accept()
    target.receive(DataRecord(0, b"partial"))
    await target.abort()
    assert not (tmp_path / "dest" / "out").exists()
    assert os.listdir(tmp_path / "staging") == []


@pytest_twisted.ensureDeferred
async def test_existingRefused(tmp_path):
    """An existing destination is refused at accept unless overwrite is asked."""
    src = tmp_path / "src"
    src.write_bytes(b"new")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "out").write_bytes(b"old")
    source, target, _ = await pair(tmp_path, f"file:f:path={src},target=out")
    with pytest.raises(DeviceRefused, match="already exists"):
        await target.accept()
    spec = f"file:f:path={src},target=out,target-overwrite=yes"
    source, target, _ = await pair(tmp_path, spec)
    await target.accept()
    writer = PipeWriter(target)
    await writer.finish(await source.sendFinal(writer))
    await target.commit()
    assert (tmp_path / "dest" / "out").read_bytes() == b"new"


@pytest_twisted.ensureDeferred
async def test_outsideRoots(tmp_path):
    """A destination outside the allowed roots is refused when the target is built."""
    src = tmp_path / "src"
    src.write_bytes(b"x")
    with pytest.raises(PathNotAllowed):
        await pair(tmp_path, f"file:f:path={src},target=../../etc/passwd")


@pytest_twisted.ensureDeferred
async def test_missingSource(tmp_path):
    """A missing source file fails at describe, naming the device and the path."""
    kind = FileKind()
    spec = DeviceSpec.parse(f"file:blob:path={tmp_path}/nope,target=x")
    with pytest.raises(DeviceError, match="device blob: .*nope"):
        await kind.source(spec, FakeSourceContext(reactor)).describe()


@pytest_twisted.ensureDeferred
async def test_recordBeyondDeclaredSize(tmp_path):
    """A record past the declared size is refused by the staging file."""
    src = tmp_path / "src"
    src.write_bytes(b"1234")
    source, target, _ = await pair(tmp_path, f"file:f:path={src},target=out")
    await target.accept()
    with pytest.raises(StreamError, match="beyond the declared size"):
        target.receive(DataRecord(2, b"xyz"))
    await target.abort()


@pytest_twisted.ensureDeferred
async def test_truncatedUnderSender(tmp_path):
    """A file truncated while it is sent fails the source with a clear error."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(4 << 20))
    source, target, _ = await pair(tmp_path, f"file:f:path={src},target=out")
    await target.accept()

    class Truncating(PipeWriter):
        def writeData(self, offset, data):
            os.truncate(src, 1 << 20)
            return super().writeData(offset, data)

    with pytest.raises(DeviceError, match="truncated"):
        await source.sendFinal(Truncating(target))
    await target.abort()


@pytest_twisted.ensureDeferred
async def test_fullFilesystem(tmp_path):
    """Filling the target filesystem fails with a clear message and leaves nothing."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=2m tmpfs {small}"):
        reason = "needs root and mount(8) for a small tmpfs"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run this test: {reason}")
        pytest.skip(reason)
    try:
        src = tmp_path / "src"
        src.write_bytes(os.urandom(4 << 20))
        source, target, context = await pair(
            tmp_path, f"file:f:path={src},target={small}/out", roots=[str(small)]
        )
        target.params = replace(target.params, allocated=0)  # past the space check
        await target.accept()
        writer = PipeWriter(target)
        with pytest.raises(DeviceError, match="no space left"):
            await writer.finish(await source.sendFinal(writer))
        await target.abort()
        context.cleanup()
        assert os.listdir(small) == []
    finally:
        os.system(f"umount {small}")


class WithoutMetadata(PipeWriter):
    """A stream as a source before the mode travelled sends it: no METADATA."""

    def writeMetadata(self, metadata):
        return succeed(None)


async def installedMode(tmp_path, spec, writerType=PipeWriter, installAs=None):
    """Migrate ``src`` (mode 0754) with ``spec``; the installed file's stat."""
    src = tmp_path / "src"
    src.write_bytes(b"state" * 1000)
    os.chmod(src, 0o754)
    source, target, _ = await pair(tmp_path, spec, installAs=installAs)
    await target.accept()
    writer = writerType(target)
    await writer.finish(await source.sendFinal(writer))
    [path] = await target.commit()
    return os.stat(path)


@pytest_twisted.ensureDeferred
async def test_modeTravels(tmp_path):
    """The source file's permission bits (not set-id bits) reach the target."""
    st = await installedMode(tmp_path, f"file:f:path={tmp_path / 'src'},target=out")
    assert oct(st.st_mode & 0o7777) == "0o754"


@pytest_twisted.ensureDeferred
async def test_olderSourceGivesOwnerOnly(tmp_path):
    """A stream without the mode (an older source) installs the file as 0600."""
    spec = f"file:f:path={tmp_path / 'src'},target=out"
    st = await installedMode(tmp_path, spec, WithoutMetadata)
    assert oct(st.st_mode & 0o777) == "0o600"


@pytest_twisted.ensureDeferred
async def test_daemonDefaultOverSourceMode(tmp_path):
    """The daemon's --image-mode and --image-owner win over the source's mode."""
    spec = f"file:f:path={tmp_path / 'src'},target=out"
    daemon = InstallAs(uid=os.getuid(), gid=os.getgid(), mode=0o660)
    st = await installedMode(tmp_path, spec, installAs=daemon)
    assert oct(st.st_mode & 0o777) == "0o660"


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file away needs root")
@pytest_twisted.ensureDeferred
async def test_deviceKeysSetOwnerAndMode(tmp_path):
    """target-owner and target-mode win over the daemon's default and the source."""
    nobody, nogroup = (
        pwd.getpwnam("nobody"),
        grp.getgrgid(pwd.getpwnam("nobody").pw_gid),
    )
    spec = (
        f"file:f:path={tmp_path / 'src'},target=out,"
        f"target-owner=nobody:{nogroup.gr_name},target-mode=0640"
    )
    daemon = InstallAs(uid=0, gid=0, mode=0o600)
    st = await installedMode(tmp_path, spec, installAs=daemon)
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert oct(st.st_mode & 0o777) == "0o640"


@pytest_twisted.ensureDeferred
async def test_unknownOwnerRefusedAtPrepare(tmp_path):
    """A target-owner unknown on the target is refused at Prepare, named."""
    (tmp_path / "src").write_bytes(b"x")
    spec = f"file:f:path={tmp_path / 'src'},target=out,target-owner=no-such-user-xm"
    _, target, _ = await pair(tmp_path, spec)
    with pytest.raises(DeviceRefused, match="target-owner=no-such-user-xm: no user"):
        await target.accept()


def test_badModeIsABadSpec(tmp_path):
    """A malformed target-mode is refused when the spec is read, on the source."""
    with pytest.raises(BadSpec, match="target-mode: '0999' is not an octal mode"):
        FileKind().source(
            DeviceSpec.parse("file:f:path=/x,target=y,target-mode=0999"),
            FakeSourceContext(reactor),
        )
