"""
The source's API for a toolstack: prepare, pre-copy, transfer, commit or abort.

A toolstack drives a migration in phases around the moment it pauses the VM::

    identity, cas = tls.loadIdentity(CERT, KEY), tls.loadAuthority(CA)  # xenmig.tls
    client = MigrationClient(
        reactor, "target.example", 8002,
        **tlsArguments("target.example", identity, cas),  # control and streams
        resume=True,        # a broken link is reconnected, not the end (optional)
    )
    migration = await client.prepare("vm1", [DeviceSpec.parse("file:blob:...")])
    await migration.precopy()        # VM still running (devices that can)
    ...                              # the toolstack pauses the VM
    await migration.transfer()       # final state, verified by the target
    await migration.commit()         # the VM now belongs to the target
    # or, at any point before commit: await migration.abort("why"); resume the VM

L{MigrationClient} holds the connections and calls to the target; the steps
are L{xenmig.source.migration.SourceMigration}'s.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from xenmig.model import DeviceSpec
from xenmig.source.connection import TargetConnection
from xenmig.source.migration import SourceMigration

if TYPE_CHECKING:
    from twisted.internet.ssl import Certificate, PrivateCertificate


def tlsArguments(
    serverName: str,
    identity: PrivateCertificate,
    authorities: Sequence[Certificate],
    pins: Sequence[str] = (),
) -> dict[str, Any]:
    """
    The TLS keyword arguments of L{MigrationClient} (and of
    L{xenmig.source.blocking.BlockingMigrationClient}) for mutual TLS with a
    daemon that must present ``serverName``: Twisted's options for the control
    connection and the settings of the threaded state streams, which send from
    their own threads (given only ``tls=``, streams go through the reactor's
    much slower TLS write path).  ``pins``: SHA-256 fingerprints, one of which
    the daemon's certificate must have (L{xenmig.tls.parsePin}).
    """
    from xenmig import tls
    from xenmig.source.threadedstream import sslContext

    return {
        "tls": tls.clientOptions(serverName, identity, authorities, pins),
        "sslContext": sslContext(identity, authorities, pins),
        "serverName": serverName,
    }


class MigrationClient(TargetConnection):
    """
    Connects to a target daemon and opens migrations (the connection's
    parameters: L{TargetConnection}).
    """

    async def prepare(
        self,
        domain: str,
        specs: Sequence[DeviceSpec],
        migrationId: str | None = None,
        bandwidth: int | None = None,
    ) -> SourceMigration:
        """
        Describe every device and open a session on the target (VM still running).
        ``bandwidth``: the most bytes per second the migration's streams send
        together (L{xenmig.pump.parseBandwidth} reads ``500M``); None: no limit.

        @raise DeviceRefused: naming every refused device and why; nothing changed.
        """
        migration = SourceMigration(
            self, domain, migrationId or uuid.uuid4().hex, bandwidth=bandwidth
        )
        await migration.prepare(specs)
        return migration
