"""A toolstack's command-line tools (``xl``, ``virsh``), run bounded; their error."""

from __future__ import annotations

import os
import shlex
import shutil
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from xenmig.clients.processes import ChildProcess
from xenmig.errors import XenmigError


class DomainControlError(XenmigError):
    """Pausing, resuming or releasing the VM failed; the tool's words are kept."""


def runTool(
    reactor: Any,
    argv: list[str],
    timeout: float,
    what: str,
    env: dict[str, str] | None = None,
) -> Deferred[ChildProcess]:
    """
    Run a program (found on ``PATH``) and wait for it; the ended child, whatever
    its exit status.  Cancelling, or ``timeout`` seconds, kills it.  ``env``
    defaults to this process's environment.

    @raise DomainControlError: if it is not installed or does not end in time.
    """
    executable = shutil.which(argv[0])
    if executable is None:
        return fail(
            DomainControlError(f"{what}: {argv[0]!r} is not installed (not on PATH)")
        )
    child = ChildProcess(shlex.join(argv))
    environment = dict(os.environ) if env is None else env
    reactor.spawnProcess(child, executable, argv, env=environment)
    result: Deferred[ChildProcess] = Deferred(lambda _: child.signal("KILL"))

    def ended(status: int) -> None:
        if not result.called:
            result.callback(child)

    child.ended.addCallback(ended)

    def timedOut(_: object, seconds: float) -> Failure:
        return Failure(
            DomainControlError(
                f"{what}: {shlex.join(argv)!r} did not finish within {seconds:g} s "
                f"(killed)"
            )
        )

    return result.addTimeout(timeout, reactor, onTimeoutCancel=timedOut)
