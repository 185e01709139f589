"""Running the operator's hook commands (``--on-commit``) under spawnProcess."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class _HookProtocol(ProcessProtocol):
    def __init__(self, command: str, migrationId: str) -> None:
        self.command = command
        self.migrationId = migrationId
        self.done: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        log.info(
            "migration {migration_id}: hook {command}: {output}",
            migration_id=self.migrationId,
            command=self.command,
            output=data.decode(errors="replace").rstrip(),
        )

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.done.callback(code if code is not None else -1)


def runHook(
    reactor: Any,
    command: str,
    env: dict[str, str],
    migrationId: str = "",
    timeout: float = 300.0,
) -> Deferred[int]:
    """
    Run ``command`` with ``/bin/sh -c``, with ``env`` added to the daemon's
    environment; a Deferred firing with its exit code (-1 if killed by a signal).
    After ``timeout`` seconds it is terminated, then killed.
    """
    protocol = _HookProtocol(command, migrationId)
    process = reactor.spawnProcess(
        protocol, "/bin/sh", ["/bin/sh", "-c", command], env={**os.environ, **env}
    )

    def stop(signal: str) -> None:
        if protocol.done.called:
            return
        try:
            process.signalProcess(signal)
        except OSError:
            return
        if signal == "TERM":
            reactor.callLater(5, stop, "KILL")

    timer = reactor.callLater(timeout, stop, "TERM")
    protocol.done.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
    return protocol.done
