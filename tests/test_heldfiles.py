"""A destination that a process holds open is never replaced: refused, and named."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from xenmig.devices.disk.kind import diskKind
from xenmig.devices.file import fileKind
from xenmig.errors import CommitFailed, DeviceRefused
from xenmig.fs import holdersOf
from xenmig.model import DeviceSpec
from xenmig.testing import FakeSourceContext, FakeTargetContext, PipeWriter


class Holder:
    """A process (``sleep``) that has a file open on its descriptor 3."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            ["sh", "-c", f'exec 3<"{path}"; echo open; exec sleep 60'],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "open\n"
        # "open" is said before the shell execs sleep: wait for the exec.
        comm = Path(f"/proc/{self.process.pid}/comm")
        deadline = time.monotonic() + 10
        while comm.read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "the holder never became sleep"
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def holding() -> Iterator[list[Holder]]:
    """Holders made by a test, all killed afterwards."""
    made: list[Holder] = []
    yield made
    for holder in made:
        holder.stop()


def hold(holding: list[Holder], path: Path) -> Holder:
    holding.append(Holder(path))
    return holding[-1]


def test_holdersNamed(tmp_path: Path, holding: list[Holder]) -> None:
    """The processes that have a file open are named; a free or absent file has none."""
    path = tmp_path / "image"
    path.write_bytes(b"x" * 4096)
    assert holdersOf(str(path)) == []
    assert holdersOf(str(tmp_path / "absent")) == []
    holder = hold(holding, path)
    assert holdersOf(str(path)) == [("sleep", holder.pid)]
    holder.stop()
    assert holdersOf(str(path)) == []


async def prepared(tmp_path: Path, kind: str, destination: Path) -> tuple[object, ...]:
    """Source and target sides of a file or disk device to ``destination``."""
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(64 * 1024))
    spec = DeviceSpec.parse(
        f"{kind}:d0:path={source},target={destination},target-overwrite=yes"
    )
    kinds = {"file": fileKind, "disk": diskKind}
    device = kinds[kind].source(spec, FakeSourceContext(reactor))
    description = (await device.describe()).withTargetParams(spec)
    context = FakeTargetContext(
        reactor, [str(destination.parent)], stagingDir=str(tmp_path / "staging")
    )
    return device, kinds[kind].target(description, context)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("kind", ["file", "disk"])
async def test_heldDestinationRefusedAtPrepare(
    tmp_path: Path, holding: list[Holder], kind: str
) -> None:
    """target-overwrite=yes over a file a process has open is refused, naming it."""
    (tmp_path / "vms").mkdir()
    destination = tmp_path / "vms" / "vm1.img"
    destination.write_bytes(b"the image the incoming QEMU runs on")
    holder = hold(holding, destination)
    _, target = await prepared(tmp_path, kind, destination)
    with pytest.raises(DeviceRefused) as caught:
        await target.accept()  # type: ignore[attr-defined]
    message = str(caught.value)
    assert f"{destination} is open in sleep (pid {holder.pid})" in message
    assert "never replaces a file that a process holds open" in message
    assert destination.read_bytes() == b"the image the incoming QEMU runs on"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("kind", ["file", "disk"])
async def test_heldDestinationRefusedAtInstall(
    tmp_path: Path, holding: list[Holder], kind: str
) -> None:
    """A destination opened between Prepare and Commit is not replaced at Commit."""
    (tmp_path / "vms").mkdir()
    destination = tmp_path / "vms" / "vm1.img"
    destination.write_bytes(b"old")
    source, target = await prepared(tmp_path, kind, destination)
    await target.accept()  # type: ignore[attr-defined]
    writer = PipeWriter(target)  # type: ignore[arg-type]
    await writer.finish(await source.sendFinal(writer))  # type: ignore[attr-defined]
    holder = hold(holding, destination)
    with pytest.raises(CommitFailed) as caught:
        await target.commit()  # type: ignore[attr-defined]
    assert f"is open in sleep (pid {holder.pid})" in str(caught.value)
    assert destination.read_bytes() == b"old"
    await target.abort()  # type: ignore[attr-defined]
