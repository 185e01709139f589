"""Running the operator's hook commands (``--on-commit``), logged per migration."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

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


#: How a hook command is run: (command, environment, migration id) -> exit status.
HookRunner = Callable[[str, dict[str, str], str], Deferred[int]]


class CommitHook:
    """
    The ``--on-commit`` command: run after each commit, with the migration in
    its environment.  Its output and exit status are logged; neither changes
    the outcome (the commit is done).  Delivered at least once: the journal
    says whether it ran (see L{xenmig.target.core.MigrationTarget.recover}).
    """

    def __init__(self, command: str | None, run: HookRunner | None) -> None:
        self.command = command
        self.run = run

    @property
    def configured(self) -> bool:
        """Whether there is a command to run."""
        return bool(self.command) and self.run is not None

    def committed(
        self, migrationId: str, domain: str, peer: str, installed: Sequence[str]
    ) -> Deferred[None]:
        """
        ``migrationId`` committed: run the command, if there is one.  A
        Deferred firing (never failing) once it has run to its end, whatever
        its exit status, or was ended by its time-out.
        """
        if not self.configured:
            return succeed(None)
        assert self.command is not None and self.run is not None
        env = {
            "XENMIG_MIGRATION_ID": migrationId,
            "XENMIG_DOMAIN": domain,
            "XENMIG_PEER": peer,
            "XENMIG_INSTALLED": "\n".join(installed),
        }

        def done(code: int) -> None:
            log.info(
                "migration {migration_id}: on-commit hook exited {code}",
                migration_id=migrationId,
                code=code,
            )

        def failed(failure: Failure) -> None:
            log.failure(
                "migration {migration_id}: on-commit hook failed",
                failure,
                migration_id=migrationId,
            )

        return maybeDeferred(self.run, self.command, env, migrationId).addCallbacks(
            done, failed
        )
