"""The resume gate: each committed migration releases its VM to the toolstack once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from xenmig.errors import MigrationAborted
from xenmig.limits import withDeadline


@dataclass(frozen=True)
class Release:
    """What the gate hands the toolstack: the committed migration and its installs."""

    migrationId: str
    domain: str
    installed: tuple[str, ...] = ()


@dataclass
class _Waiter:
    domain: str
    migrationId: str | None
    deferred: Deferred[Release] = field(default_factory=Deferred)


class ResumeGate:
    """
    Answers ``AwaitRestored``.  Each committed migration is *claimed* by the first
    waiter that receives it, so a toolstack that asks again waits for the next
    migration of the domain instead of resuming on a stale one; asking for a
    migration id by name always answers for that one.  Claims are reported to
    ``onClaim`` (the journal keeps them across restarts).
    """

    def __init__(self, clock: IReactorTime, onClaim: Callable[[str], Any]) -> None:
        self.clock = clock
        self.onClaim = onClaim
        self._unclaimed: dict[str, list[Release]] = {}
        self._outcomes: dict[str, Release | str] = {}
        self._waiters: list[_Waiter] = []

    def committed(self, release: Release, claimed: bool = False) -> None:
        """A migration committed (now, or before a restart)."""
        self._outcomes[release.migrationId] = release
        for waiter in list(self._waiters):
            if waiter.migrationId in (None, release.migrationId) and (
                waiter.domain == release.domain
            ):
                self._waiters.remove(waiter)
                if waiter.migrationId is None and not claimed:
                    claimed = True
                    self.onClaim(release.migrationId)
                waiter.deferred.callback(release)
        if not claimed:
            self._unclaimed.setdefault(release.domain, []).append(release)

    def aborted(self, migrationId: str, domain: str, reason: str) -> None:
        """A migration aborted: whoever waits for the domain learns why."""
        message = f"migration {migrationId} of {domain} aborted: {reason}"
        self._outcomes[migrationId] = message
        for waiter in list(self._waiters):
            if waiter.domain == domain and waiter.migrationId in (None, migrationId):
                self._waiters.remove(waiter)
                waiter.deferred.errback(MigrationAborted(message))

    def wait(
        self, domain: str, timeout: float, migrationId: str | None = None
    ) -> Deferred[Release]:
        """
        A Deferred firing with the L{Release} of the next unclaimed commit of
        ``domain`` (or of ``migrationId``); failing if it aborts, or with
        PhaseTimeout after ``timeout`` seconds.
        """
        if migrationId is not None and migrationId in self._outcomes:
            outcome = self._outcomes[migrationId]
            if isinstance(outcome, str):
                return fail(MigrationAborted(outcome))
            return succeed(outcome)
        pending = self._unclaimed.get(domain)
        if migrationId is None and pending:
            release = pending.pop(0)
            self.onClaim(release.migrationId)
            return succeed(release)
        waiter = _Waiter(domain, migrationId)
        waiter.deferred = Deferred(lambda d: self._forget(waiter))
        self._waiters.append(waiter)

        what = migrationId or f"a migration of {domain}"
        return withDeadline(
            waiter.deferred,
            timeout,
            self.clock,
            f"{what} did not commit within {timeout:g} seconds",
        )

    def _forget(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
