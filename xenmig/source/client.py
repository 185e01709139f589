"""
The source's API for a toolstack: prepare, pre-copy, transfer, commit or abort.

A toolstack drives a migration in phases around the moment it pauses the VM::

    identity, cas = tls.loadIdentity(CERT, KEY), tls.loadAuthority(CA)
    client = MigrationClient(
        reactor, "target.example", 8002,
        tls=tls.clientOptions("target.example", identity, cas),   # control
        sslContext=bulk.sslContext(identity, cas),                 # state streams
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

from xenmig.model import DeviceSpec
from xenmig.source.connection import TargetConnection
from xenmig.source.migration import SourceMigration


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
