"""
The garbage collector held off in the paused window (``xenmig.source.collector``):
the holds alone on a fake clock, then migrations through a real daemon, looking
at the collector from inside the window and after it.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

sys.path.insert(0, os.path.dirname(__file__))

from daemons import PKI, Daemon, denseFile, settled  # noqa: E402

from xenmig.errors import MigrationAborted  # noqa: E402
from xenmig.model import DeviceSpec  # noqa: E402
from xenmig.source import collector  # noqa: E402
from xenmig.source.collector import CollectorHold  # noqa: E402
from xenmig.source.phase import Phase  # noqa: E402


@pytest.fixture(autouse=True)
def collectorOn() -> Iterator[None]:
    """Each test starts with the collector on and no hold; it ends so too."""
    was = gc.isenabled()
    gc.enable()
    assert collector.holding() == 0
    yield
    assert collector.holding() == 0, "a test left a hold on"
    if not was:
        gc.disable()


def test_a_hold_keeps_the_collector_off_until_released() -> None:
    """Held, the collector is off (and a second hold() changes nothing);
    released, it is on again and the timer is gone."""
    clock = Clock()
    hold = CollectorHold(clock, limit=5)
    hold.hold()
    hold.hold()
    assert not gc.isenabled() and hold.held and collector.holding() == 1
    hold.release()
    hold.release()
    assert gc.isenabled() and not hold.held and collector.holding() == 0
    assert clock.getDelayedCalls() == []


def test_holds_nest_and_each_ends_by_its_limit() -> None:
    """Two migrations at once: the collector comes back only when neither
    holds it; a hold nobody releases ends after its limit."""
    clock = Clock()
    first, second = CollectorHold(clock, limit=5), CollectorHold(clock, limit=8)
    first.hold()
    clock.advance(2)
    second.hold()
    clock.advance(3)  # the first's limit
    assert not first.held and second.held and not gc.isenabled()
    clock.advance(4.9)
    assert not gc.isenabled()
    clock.advance(0.1)  # the second's limit
    assert gc.isenabled() and not second.held and collector.holding() == 0


def test_a_collector_the_process_turned_off_stays_off() -> None:
    """A process that runs without the collector keeps it so after a hold;
    a limit of 0 holds nothing."""
    clock = Clock()
    gc.disable()
    hold = CollectorHold(clock)
    hold.hold()
    hold.release()
    assert not gc.isenabled()
    gc.enable()
    CollectorHold(clock, limit=0).hold()
    assert gc.isenabled() and collector.holding() == 0


# -- through a daemon ------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest_twisted.ensureDeferred
async def test_held_from_the_pause_to_the_commit(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The collector is on through Prepare, off from the pause (transfer)
    until the commit's answer, then on again; the state is installed."""
    daemon = await daemons().launch(reactor)
    source = denseFile(tmp_path / "state.bin", 300 * 1024)
    client = daemon.client(reactor)
    spec = DeviceSpec.parse(f"file:f0:path={source},target=f0.bin")
    migration = await client.prepare("vm-c", [spec])
    assert gc.isenabled()
    await migration.transfer()
    assert not gc.isenabled() and migration.collector.held
    await migration.commit()
    assert migration.phase is Phase.COMMITTED
    assert gc.isenabled() and not migration.collector.held
    assert (daemon.dest / "f0.bin").read_bytes() == source.read_bytes()
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_released_by_an_abort_after_the_pause(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Aborted in the paused window, the migration lets the collector go:
    the VM resumes on the source, and nothing is installed."""
    daemon = await daemons().launch(reactor)
    source = denseFile(tmp_path / "state.bin", 4096)
    client = daemon.client(reactor)
    spec = DeviceSpec.parse(f"file:f0:path={source},target=f0.bin")
    migration = await client.prepare("vm-a", [spec])
    await migration.transfer()
    assert not gc.isenabled()
    await migration.abort("the toolstack changed its mind")
    assert migration.phase is Phase.ABORTED and gc.isenabled()
    with pytest.raises(MigrationAborted, match="changed its mind"):
        await migration.commit()
    assert not (daemon.dest / "f0.bin").exists()
    await settled(reactor)
