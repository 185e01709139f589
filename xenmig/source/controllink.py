"""The control connection of a resumable migration: re-established when it is lost."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import error as neterror
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from xenmig import amp_commands as commands
from xenmig.errors import PhaseTimeout
from xenmig.limits import withDeadline
from xenmig.source.backoff import Backoff
from xenmig.source.pacing import Slots
from xenmig.source.resumable import ResumePolicy, retryable

if TYPE_CHECKING:
    from xenmig.source.connection import TargetConnection

log = Logger()


def connectionGone(error: BaseException) -> bool:
    """Whether a call failed because its connection went (not the target's word)."""
    return isinstance(error, neterror.ConnectionClosed | PhaseTimeout | OSError)


class ControlLink:
    """
    The control connection a migration speaks on.  In a resumable session
    (the target granted it at Prepare), a lost connection is replaced: a new
    one presents the migration id (Reattach; the target takes only the same
    peer identity), tried again with a jittered back-off within ``retries``.
    A loss is noticed at once (the connection's ``onLost``) and the
    connection re-established in the background, so that the target's
    grace period is spent on the network, not on waiting for the next call.

    Only calls that may be asked twice go again after a loss (L{call} with
    C{again=True}: OpenStream, StreamPosition, DeviceReady, QueryMigration,
    Abort); Commit never does (its answer lost is a commit in doubt).
    """

    def __init__(
        self,
        client: TargetConnection,
        migrationId: str,
        protocol: amp.AMP | None,
        resumable: bool = False,
        retries: ResumePolicy | None = None,
        notice: Callable[[str], Any] | None = None,
    ) -> None:
        self.client = client
        self.migrationId = migrationId
        self.resumable = resumable
        self.retries = retries or ResumePolicy()
        self.reconnections = 0
        #: The largest device whose stream the target takes on this connection.
        self.inline = 0
        self.protocol: amp.AMP | None = None
        #: No more re-establishing (the commit began, or the migration ended).
        self.closing = False
        self.notice = notice
        self._reconnecting: list[Deferred[None]] | None = None
        if protocol is not None:
            self.hold(protocol)

    def granted(self, answer: dict[str, Any]) -> None:
        """
        What the target's answer to Prepare grants: resumption (an older
        target, or one with --reconnect-grace 0, does not resume), and small
        devices' streams on this connection (L{inline}: up to what size).
        """
        self.resumable = bool(answer.get("resume"))
        self.inline = int(answer.get("inline") or 0)

    def hold(self, protocol: amp.AMP) -> None:
        """Speak on ``protocol`` from now on."""
        self.protocol = protocol
        if self.resumable and hasattr(protocol, "onLost"):
            protocol.onLost = lambda: self._lost(protocol)

    def close(self, committed: bool = False) -> None:
        """
        Hang up for good; or, once the migration ``committed``, give the
        connection back to the client, which may keep it for its next one.
        """
        self.closing = True
        if committed:
            self.client.idle.keep(self.protocol)
            self.protocol = None
        else:
            self.client.hangUp(self.protocol)

    def _lost(self, protocol: amp.AMP) -> None:
        if protocol is not self.protocol or self.closing:
            return
        d = Deferred.fromCoroutine(self.reconnect())
        d.addErrback(lambda _: None)  # the next call says

    async def current(self) -> amp.AMP:
        """The live connection (re-established first if it was lost)."""
        if self.resumable and (
            self.protocol is None or getattr(self.protocol, "lost", False)
        ):
            await self.reconnect()
        if self.protocol is None:
            raise neterror.ConnectionLost("no control connection")
        return self.protocol

    async def call(
        self,
        seconds: float,
        what: str,
        command: type,
        slots: Slots | None = None,
        again: bool = False,
        within: float | None = None,
        **kw: Any,
    ) -> dict[str, Any]:
        """
        One call on the live connection; if ``again`` and the connection went
        during it, once more on a new one (as often as it comes back).  With
        ``within``, all of it (re-establishing the connection included) is
        bounded to that many seconds.
        """
        if within is not None:
            calling = Deferred.fromCoroutine(
                self.call(seconds, what, command, slots, again, **kw)
            )
            message = f"{what} did not finish within {within:g} s"
            return await withDeadline(calling, within, self.client.reactor, message)
        while True:
            protocol = await self.current()
            try:
                if slots is None:
                    return await self.client.callWithin(
                        seconds, what, protocol, command, **kw
                    )
                return await self.client.pacedCall(
                    slots, seconds, what, protocol, command, **kw
                )
            except Exception as e:
                if not (again and self.resumable and connectionGone(e)):
                    raise
                if not getattr(protocol, "lost", False):
                    self.client.hangUp(protocol, abort=True)  # silent: give up on it
                log.info(
                    "migration {migration_id}: {what} lost its connection ({error}); "
                    "asking again on a new one",
                    migration_id=self.migrationId,
                    what=what,
                    error=str(e) or repr(e),
                )

    async def reconnect(self) -> None:
        """Re-establish the connection (once at a time); raise if it cannot be."""
        if self._reconnecting is not None:
            d: Deferred[None] = Deferred()
            self._reconnecting.append(d)
            await d
            return
        self._reconnecting = []
        failure: Failure | None = None
        try:
            await self._reconnect()
        except BaseException:
            failure = Failure()
        waiters, self._reconnecting = self._reconnecting, None
        for waiter in waiters:
            if failure is None:
                waiter.callback(None)
            else:
                waiter.errback(failure)
        if failure is not None:
            failure.raiseException()

    async def _reconnect(self) -> None:
        backoff = Backoff(self.retries.initial, self.retries.maximum)
        clock = self.client.reactor
        started = clock.seconds()
        attempts = 0
        self._tell("the control connection was lost: re-establishing it")
        while True:
            attempts += 1
            try:
                protocol = await self.client.connect()
                try:
                    answer = await self.client.call(
                        protocol, commands.Reattach, migration_id=self.migrationId
                    )
                except BaseException:
                    self.client.hangUp(protocol)
                    raise
                if self.closing:
                    self.client.hangUp(protocol)
                    return
                self.hold(protocol)
                self.reconnections += 1
                log.info(
                    "migration {migration_id}: control connection re-established "
                    "({phase} on the target)",
                    migration_id=self.migrationId,
                    phase=answer["phase"],
                )
                return
            except BaseException as e:
                if not retryable(e):
                    raise
                delay = backoff.next()
                spent = clock.seconds() - started
                if attempts >= self.retries.attempts or (
                    spent + delay > self.retries.seconds
                ):
                    raise neterror.ConnectionLost(
                        f"the control connection could not be re-established "
                        f"({attempts} attempt(s) in {spent:.0f} s): {e}"
                    ) from e
                self._tell(
                    f"the control connection could not be re-established ({e}): "
                    f"trying again in {delay:.1f} s"
                )
                await deferLater(clock, delay, lambda: None)

    def _tell(self, line: str) -> None:
        log.info(
            "migration {migration_id}: {line}", migration_id=self.migrationId, line=line
        )
        if self.notice is not None:
            self.notice(line)
