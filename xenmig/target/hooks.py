"""Running the operator's hook commands (``--on-commit``), logged per migration."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from xenmig.clients.processes import runShell

log = Logger()


class _LogEcho:
    """A writable for L{runShell}'s ``echo``: each piece of output becomes an event."""

    def __init__(self, command: str, migrationId: str) -> None:
        self.command = command
        self.migrationId = migrationId

    def write(self, text: str) -> None:
        log.info(
            "migration {migration_id}: hook {command}: {output}",
            migration_id=self.migrationId,
            command=self.command,
            output=text.rstrip(),
        )

    def flush(self) -> None:
        pass


def runHook(
    reactor: Any,
    command: str,
    env: dict[str, str],
    migrationId: str = "",
    timeout: float = 300.0,
) -> Deferred[int]:
    """
    Run ``command`` with ``/bin/sh -c``, with ``env`` added to the daemon's
    environment; a Deferred firing with its exit status (negative for a signal).
    After ``timeout`` seconds it is terminated, then killed, and the Deferred
    fails with L{xenmig.clients.processes.ProcessFailed}.
    """

    async def run() -> int:
        echo = _LogEcho(command, migrationId)
        child = await runShell(reactor, command, timeout, env, echo=echo)
        assert child.status is not None
        return child.status

    return Deferred.fromCoroutine(run())
