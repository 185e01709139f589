"""TLS session resumption: a client's later connections resume; the peer stays known."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.daemons import PKI, Daemon, denseFile, migrateFile, settled
from xenmig.cli import pki
from xenmig.digest import hashFile
from xenmig.errors import NotAuthorized


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    made = PKI(tmp_path_factory.mktemp("pki"))
    pki.issueHost(made.ca, "other.test")
    return made


def peers(daemon: Daemon, identity: str) -> Daemon:
    path = daemon.root / "peers.toml"
    path.write_text(f"[[peer]]\nidentity = '{identity}'\n")
    daemon.extra += ["--peers", str(path)]
    return daemon


@pytest_twisted.ensureDeferred
async def test_laterConnectionsResumeAsTheSamePeer(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    """
    After its first full handshakes, a client's control connections and
    streams resume their TLS session; the daemon still knows the peer by its
    certificate (its policy admits it, its status names it); after a restart
    of the daemon the old ticket is refused and a full handshake serves.
    """
    daemon = await peers(daemons(), "source.test").launch(reactor)
    client = daemon.client(reactor, inline=False)  # the file on a stream connection
    controls, streams = client.tls.sessions, client.streamEndpoint.context.sessions
    source = denseFile(tmp_path / "source.bin", 4096)
    for n in range(2):
        migration = await migrateFile(client, source, f"x{n}.bin", f"vm{n}")
        assert hashFile(str(daemon.dest / f"x{n}.bin")) == hashFile(str(source))
        status = await client.query(migration.migrationId)  # type: ignore[attr-defined]
        assert status["peer"] == "source.test" and status["phase"] == "COMMITTED"
    # Connections: Prepare, stream, query, then Prepare, stream, query.
    assert controls.resumed == 3 and streams.resumed == 1
    daemon.stop()
    await daemon.launch(reactor)
    await migrateFile(client, source, "x2.bin", "vm2")
    assert controls.resumed == 3 and streams.resumed == 1  # full handshakes
    await migrateFile(client, source, "x3.bin", "vm3")
    assert controls.resumed == 4 and streams.resumed == 2
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_aResumedPeerIsStillRefused(daemons: Callable[..., Daemon]) -> None:
    """
    A peer of the CA that the daemon's peers file does not list is refused on
    its full handshake's connection and again on the connection that resumed
    it: the resumed session carries its certificate, the policy applies.
    """
    daemon = await peers(daemons(), "other.test").launch(reactor)
    client = daemon.client(reactor)
    for _ in range(3):
        with pytest.raises(NotAuthorized, match="source.test.*not listed"):
            await client.listMigrations()
    assert client.tls.sessions.resumed == 2
    await settled(reactor)
