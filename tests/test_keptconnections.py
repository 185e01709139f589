"""
Control connections a client keeps between migrations (``keepConnections``):
the pool alone on a fake clock, then migrations through a real daemon and the
fault proxy, counting the connections the daemon was opened.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

sys.path.insert(0, os.path.dirname(__file__))

from daemons import PKI, Daemon, denseFile, migrateFile, settled  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402

from xenmig import amp_commands as commands  # noqa: E402
from xenmig.digest import hashFile  # noqa: E402
from xenmig.errors import MigrationAborted  # noqa: E402
from xenmig.model import DeviceSpec  # noqa: E402
from xenmig.source.client import MigrationClient  # noqa: E402
from xenmig.source.connection import ClientTimeouts  # noqa: E402
from xenmig.source.idlepool import IdleConnections  # noqa: E402


class FakeControl:
    """A control connection as the pool sees it: open or lost; its answers."""

    def __init__(self, answer: Any = None) -> None:
        self.lost = False
        self.onLost: Any = "set by its migration"
        self.transport = None
        self.answer = answer
        self.asked: list[bytes] = []

    def callRemote(self, command: type, **kw: Any) -> Any:
        self.asked.append(command.commandName)
        if isinstance(self.answer, BaseException):
            return fail(self.answer)
        return succeed(self.answer)


# -- the pool -------------------------------------------------------------------------


def test_kept_for_a_while_then_hung_up() -> None:
    """A kept connection is taken by the next Prepare, or hung up once it
    waited its seconds; one lost meanwhile is never handed out."""
    clock, hungUp = Clock(), []
    pool = IdleConnections(clock, 30, hungUp.append)
    first, second = FakeControl(), FakeControl()
    pool.keep(first)
    assert first.onLost is None  # its migration's reconnecting is over
    clock.advance(29)
    assert pool.take() is first and not clock.getDelayedCalls()
    pool.keep(first)
    pool.keep(second)
    second.lost = True
    assert pool.take() is first  # the lost one dropped, the open one taken
    assert pool.take() is None
    pool.keep(first)
    clock.advance(30)
    assert hungUp == [first] and pool.take() is None and len(pool) == 0


def test_none_kept_by_default_nor_past_its_uses() -> None:
    """With 0 seconds nothing is kept; a connection that served its uses is
    closed rather than kept; close() hangs up whatever is kept."""
    clock, hungUp = Clock(), []
    off = IdleConnections(clock, 0, hungUp.append)
    control = FakeControl()
    off.keep(control)
    assert hungUp == [control] and off.take() is None
    pool = IdleConnections(clock, 30, hungUp.append, uses=3)
    kept = FakeControl()
    for _ in range(2):
        pool.keep(kept)
        assert pool.take() is kept
    pool.keep(kept)  # its third migration: closed
    assert hungUp[-1] is kept and pool.take() is None
    other = FakeControl()
    pool.keep(other)
    pool.close()
    assert hungUp[-1] is other and not clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_a_kept_connection_found_gone_is_replaced() -> None:
    """A Prepare on a kept connection that turns out to be gone (lost as it
    was sent) is sent on a new connection, not failed."""
    client = MigrationClient(reactor, "127.0.0.1", 1, keepConnections=30)
    stale = FakeControl(ConnectionLost("gone"))
    fresh = FakeControl({"offers": [], "protocol_version": 1})
    client.idle.keep(stale)

    async def connect() -> FakeControl:
        return fresh

    client.connectOrRetry = connect  # type: ignore[method-assign,assignment]
    control, answer = await client.prepareRemote(migration_id="m")
    assert control is fresh and answer["protocol_version"] == 1
    assert stale.asked == fresh.asked == [commands.Prepare.commandName]
    client.idle.close()


# -- through a daemon ------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


#: Time-outs for a loaded machine, the same for every client here.
TIMEOUTS = ClientTimeouts(connect=5.0, call=10.0, commit=10.0)


def clientThrough(daemon: Daemon, proxy: FaultProxy, keep: float) -> Any:
    return daemon.client(
        reactor, port=proxy.port, timeouts=TIMEOUTS, keepConnections=keep
    )


@pytest.mark.parametrize(("keep", "connections"), [(30.0, 1), (0.0, 3)])
@pytest_twisted.ensureDeferred
async def test_later_migrations_reuse_the_connection(
    daemons: Callable[..., Daemon],
    proxies: Callable[[Daemon], FaultProxy],
    tmp_path: Path,
    keep: float,
    connections: int,
) -> None:
    """
    Three small migrations one after the other: with connections kept, all
    three ride one connection (the state inline too); without, one each.
    The daemon prepared each, and each committed the same bytes.
    """
    daemon = await daemons().launch(reactor)
    proxy = proxies(daemon)
    source = denseFile(tmp_path / "state.bin", 64 * 1024)
    client = clientThrough(daemon, proxy, keep)
    for n in range(3):
        target = daemon.dest / f"state{n}.bin"
        migration = await migrateFile(client, source, target, f"vm{n}")
        assert hashFile(str(target)) == hashFile(str(source))
        status = await client.query(migration.migrationId)
        assert status["phase"] == "COMMITTED"
    stats = await deferToThread(proxy.stats)
    assert stats["connections"] == connections + 3  # and each query's own
    assert len(client.idle) == (1 if keep else 0)
    client.closeIdle()
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_an_aborted_migrations_connection_is_not_kept(
    daemons: Callable[..., Daemon],
    proxies: Callable[[Daemon], FaultProxy],
    tmp_path: Path,
) -> None:
    """Only a committed migration gives its connection back: after an abort
    the next migration opens a new one, and both outcomes stand."""
    daemon = await daemons().launch(reactor)
    proxy = proxies(daemon)
    source = denseFile(tmp_path / "state.bin", 4096)
    client = clientThrough(daemon, proxy, 30)
    spec = DeviceSpec.parse(f"file:f0:path={source},target=aborted.bin")
    aborted = await client.prepare("vm-a", [spec])
    await aborted.abort("the toolstack changed its mind")
    assert len(client.idle) == 0
    await migrateFile(client, source, daemon.dest / "kept.bin", "vm-b")
    with pytest.raises(MigrationAborted, match="changed its mind"):
        await aborted.commit()
    assert not (daemon.dest / "aborted.bin").exists()
    assert (daemon.dest / "kept.bin").read_bytes() == source.read_bytes()
    stats = await deferToThread(proxy.stats)
    assert stats["connections"] == 2 and len(client.idle) == 1
    client.closeIdle()
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_a_daemon_restarted_meanwhile_costs_a_new_connection(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The daemon restarts between two migrations: the kept connection is
    gone, and the next migration connects anew and commits."""
    daemon = await daemons().launch(reactor)
    source = denseFile(tmp_path / "state.bin", 4096)
    client = daemon.client(reactor, keepConnections=30)
    await migrateFile(client, source, daemon.dest / "one.bin", "vm1")
    assert len(client.idle) == 1
    daemon.stop()
    await daemon.launch(reactor)
    await migrateFile(client, source, daemon.dest / "two.bin", "vm2")
    assert (daemon.dest / "two.bin").read_bytes() == source.read_bytes()
    client.closeIdle()
    await settled(reactor)
