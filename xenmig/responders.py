"""The responders both AMP protocols share, and how their errors reach the wire."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from xenmig import amp_commands as commands
from xenmig.errors import (
    WIRE_ERRORS,
    Busy,
    InternalError,
    ProtocolError,
    XenmigError,
)
from xenmig.interfaces import IMigrationTarget
from xenmig.limits import MAX_COMMANDS_IN_FLIGHT, RETRY_COMMANDS, bounded

log = Logger()


def guarded(responder: Callable[..., Any]) -> Callable[..., Any]:
    """
    Let declared errors through; turn anything else into InternalError, logged,
    so the peer sees what failed (not AMP's UNKNOWN) and the connection stays.
    """

    @functools.wraps(responder)
    def guardedResponder(self: Any, **kw: Any) -> Deferred[Any]:
        def unexpected(failure: Failure) -> Failure:
            if failure.check(*WIRE_ERRORS):
                return _boundedFailure(failure)
            log.failure(
                "{command} failed unexpectedly",
                failure,
                command=responder.__name__,
                migration_id=kw.get("migration_id", ""),
            )
            return Failure(
                InternalError(
                    f"{responder.__name__} failed on the target: {failure.value!r}"
                )
            )

        return maybeDeferred(responder, self, **kw).addErrback(unexpected)

    return guardedResponder


def _boundedFailure(failure: Failure) -> Failure:
    """
    The same error with its message cut to a length AMP can always carry (a
    message may quote what the peer sent).
    """
    error = failure.value
    message = str(error)
    if error is None or len(message) == len(bounded(message)):
        return failure
    copy = type(error).__new__(type(error))
    copy.__dict__.update(error.__dict__)
    Exception.__init__(copy, bounded(message))
    return Failure(copy)


def _describeParseError(error: Exception) -> str:
    if isinstance(error, KeyError):
        key = error.args[0] if error.args else ""
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        return f"the argument {key!r} is missing"
    return f"{type(error).__name__}: {error}"


class StatusResponders(amp.CommandLocator):
    """
    Responders shared by the TLS control protocol and the local socket.  (A
    CommandLocator itself: AMP's metaclass registers a plain mixin's responders
    on whichever locator class happens to be defined next, not on its users.)
    """

    target: IMigrationTarget
    _inFlight = 0

    def _viewer(self) -> str | None:
        """Who asks for status: None for the local toolstack (sees all)."""
        return None

    @commands.QueryMigration.responder
    @guarded
    def queryMigration(self, migration_id: str) -> dict[str, Any]:
        return {"status": self.target.query(migration_id, self._viewer())}

    @commands.ListMigrations.responder
    @guarded
    def listMigrations(self, limit: int | None = None) -> dict[str, Any]:
        return {"migrations": self.target.list(limit or 50, self._viewer())}

    def locateResponder(self, name: bytes) -> Callable[..., Any] | None:
        """
        Only this class's commands (no ``amp_*`` fallback); arguments that do
        not parse are answered with a declared PROTOCOL error naming them (not
        AMP's UNKNOWN, which drops the connection); at most
        L{MAX_COMMANDS_IN_FLIGHT} commands are answered at once (one more is
        answered BUSY).
        """
        responder = amp.CommandLocator.locateResponder(self, name)
        if responder is None:
            return None
        command = name.decode("ascii", "replace")

        def parsed(box: amp.AmpBox) -> Any:
            busy = self._busyFor(command)
            if busy is not None:
                return _wireError(busy)
            try:
                d = responder(box)
            except Exception as e:
                return _wireError(
                    ProtocolError(
                        f"{command}: malformed arguments: {_describeParseError(e)}"
                    )
                )
            self._inFlight += 1
            return d.addBoth(self._answered)

        return parsed

    def _answered(self, result: Any) -> Any:
        self._inFlight -= 1
        return result

    def _busyFor(self, command: str) -> Busy | None:
        """Why ``command`` cannot be taken now, if it cannot (BUSY)."""
        if self._inFlight < MAX_COMMANDS_IN_FLIGHT:
            return None
        return Busy.at(
            "commands in flight",
            f"{command}: {self._inFlight} commands are already in progress on this "
            f"connection (at most {MAX_COMMANDS_IN_FLIGHT})",
            RETRY_COMMANDS,
        )


def _wireError(error: XenmigError) -> Deferred[Any]:
    """``error`` as AMP sends a declared error (its code, its bounded message)."""
    message = bounded(str(error))
    code = WIRE_ERRORS[type(error)]
    return fail(amp.RemoteAmpError(code, message, local=Failure(error)))
