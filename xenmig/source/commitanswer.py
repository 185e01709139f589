"""What the source makes of the target's word: a commit's answer, an abort's reason."""

from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger

from xenmig import amp_commands as commands
from xenmig.errors import CommitInDoubt, ProtocolError, StreamLost

log = Logger()


class StatusSource(Protocol):
    """What asking needs: the target's status of a migration, on a new connection."""

    async def query(self, migrationId: str) -> dict[str, Any]: ...


def installedIn(answer: Any) -> list[str]:
    """
    The ``installed`` list of a Commit answer.

    @raise ProtocolError: if the answer has none (it is then not definite).
    """
    installed = answer.get("installed") if isinstance(answer, dict) else None
    if not isinstance(installed, list) or not all(
        isinstance(item, str) for item in installed
    ):
        raise ProtocolError(f"the commit's answer is not understood: {answer!r:.200}")
    return installed


async def askTarget(
    client: StatusSource, migrationId: str, error: BaseException
) -> dict[str, Any]:
    """
    The commit's answer was lost or said nothing definite (``error``): the
    target's status of the migration, asked on a new connection.

    @raise CommitInDoubt: if the target cannot be asked.
    """
    why = str(error) or repr(error)
    log.warn(
        "migration {migration_id}: the commit's answer is not definite ({error}); "
        "asking the target",
        migration_id=migrationId,
        error=why,
    )
    try:
        status = await client.query(migrationId)
        str(status["phase"])
    except Exception as e:
        raise CommitInDoubt(
            f"migration {migrationId}: the commit was sent but no definite answer "
            f"came ({why}) and the target cannot be asked ({e or repr(e)}); the VM "
            f"may run on the target: ask with 'xenmig status {migrationId}' before "
            f"resuming it here"
        )
    return status


def stillInDoubt(migrationId: str, phase: str, error: BaseException) -> CommitInDoubt:
    """The error for a target that, asked, is neither COMMITTED nor ABORTED."""
    return CommitInDoubt(
        f"migration {migrationId} is {phase} on the target after the commit was "
        f"sent ({str(error) or repr(error)}); ask again with 'xenmig status "
        f"{migrationId}'"
    )


async def targetReason(link: Any, seconds: float, error: BaseException) -> str | None:
    """
    When a stream broke (``error``), the target usually aborted first (no
    space, a bad record): its reason, asked on the control connection of
    ``link`` within ``seconds``, so that the error names it and not
    "connection reset".  None if it has none to give.
    """
    if not isinstance(error, StreamLost) or link.protocol is None:
        return None
    try:
        answer = await link.call(
            seconds,
            "query",
            commands.QueryMigration,
            within=seconds,
            migration_id=link.migrationId,
        )
    except Exception:
        return None
    status = answer["status"]
    if status.get("phase") != "ABORTED" or not status.get("reason"):
        return None
    return str(status["reason"])
