"""The target toolstack's client of the daemon's owner-only local socket."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import error as net
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.protocols import amp

from xenmig import amp_commands as commands
from xenmig.errors import ConfigurationError
from xenmig.limits import withDeadline
from xenmig.model import LOCAL_SOCKET


class LocalControl:
    """
    The daemon's owner-only local socket (``STATE_DIR/control.sock``): status,
    abort and AwaitRestored for the toolstack of the target host.
    """

    def __init__(self, reactor: Any, stateDir: str, timeout: float = 30.0) -> None:
        self.reactor = reactor
        self.path = os.path.join(os.path.abspath(stateDir), LOCAL_SOCKET)
        self.timeout = timeout

    async def connect(self) -> amp.AMP:
        """
        @raise ConfigurationError: if there is no socket, or it refuses us.
        """
        if not os.path.exists(self.path):
            raise ConfigurationError(
                f"no daemon socket at {self.path}: is 'twistd xenmig' running with "
                f"--state-dir {os.path.dirname(self.path)}?"
            )
        endpoint = UNIXClientEndpoint(self.reactor, self.path, timeout=self.timeout)
        try:
            return await connectProtocol(endpoint, amp.AMP())
        except net.ConnectionRefusedError:
            raise ConfigurationError(
                f"nothing listens on {self.path} (connection refused): the daemon "
                f"that made it has stopped; start 'twistd xenmig' with --state-dir "
                f"{os.path.dirname(self.path)} again"
            )
        except net.ConnectError as e:
            raise ConfigurationError(f"cannot connect to {self.path}: {e}")

    async def call(
        self, command: type[amp.Command], seconds: float | None = None, **kw: Any
    ) -> dict[str, Any]:
        """One command on a fresh connection, bounded by ``seconds``."""
        protocol = await self.connect()
        seconds = seconds or self.timeout
        try:
            return await withDeadline(
                protocol.callRemote(command, **kw),
                seconds,
                self.reactor,
                f"the daemon did not answer within {seconds:g} s ({self.path})",
            )
        finally:
            if protocol.transport is not None:
                protocol.transport.loseConnection()

    async def query(self, migrationId: str) -> dict[str, Any]:
        answer = await self.call(commands.QueryMigration, migration_id=migrationId)
        return answer["status"]

    async def listMigrations(self, limit: int = 50) -> list[dict[str, Any]]:
        answer = await self.call(commands.ListMigrations, limit=limit)
        return answer["migrations"]

    async def abortMigration(self, migrationId: str, reason: str) -> str:
        answer = await self.call(
            commands.Abort, migration_id=migrationId, reason=reason
        )
        return answer["phase"]

    async def awaitRestored(
        self, domain: str, timeout: float, migrationId: str | None = None
    ) -> dict[str, Any]:
        which = {"migration_id": migrationId} if migrationId else {}
        return await self.call(
            commands.AwaitRestored,
            seconds=timeout + 30.0,
            domain=domain,
            timeout=timeout,
            **which,
        )
