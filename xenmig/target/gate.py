"""The resume gate: each committed migration releases its VM to the toolstack once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from xenmig.errors import JournalUnavailable, MigrationAborted
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


#: Journals a claim: ``(migration id, claimed)`` -> a Deferred firing once
#: durable, failing (JournalUnavailable) if it could not be recorded.
ClaimRecorder = Callable[[str, bool], Deferred[None]]


class ResumeGate:
    """
    Answers ``AwaitRestored``.  Each committed migration is *claimed* by the first
    waiter that receives it, so a toolstack that asks again waits for the next
    migration of the domain instead of resuming on a stale one; asking for a
    migration id by name always answers for that one.  A claim is answered
    only once ``recordClaim`` has made it durable: if it cannot, the waiter
    fails with L{JournalUnavailable} and the commit stays unclaimed, so a VM
    is never released twice, nor a release lost.
    """

    def __init__(self, clock: IReactorTime, recordClaim: ClaimRecorder) -> None:
        self.clock = clock
        self.recordClaim = recordClaim
        self._unclaimed: dict[str, list[Release]] = {}
        self._outcomes: dict[str, Release | str] = {}
        self._waiters: list[_Waiter] = []

    def committed(self, release: Release, claimed: bool = False) -> None:
        """A migration committed (now, or before a restart)."""
        self._outcomes[release.migrationId] = release
        for waiter in self._matching(release.domain, release.migrationId, named=True):
            self._waiters.remove(waiter)
            waiter.deferred.callback(release)
        if not claimed:
            self._offer(release)

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
        ``domain`` (or of ``migrationId``); failing if it aborts, with
        JournalUnavailable if its claim cannot be recorded, or with
        PhaseTimeout after ``timeout`` seconds.
        """
        if migrationId is not None and migrationId in self._outcomes:
            outcome = self._outcomes[migrationId]
            if isinstance(outcome, str):
                return fail(MigrationAborted(outcome))
            return succeed(outcome)
        waiter = _Waiter(domain, migrationId)
        waiter.deferred = Deferred(lambda d: self._forget(waiter))
        self._waiters.append(waiter)
        pending = self._unclaimed.get(domain)
        if migrationId is None and pending:
            self._offer(pending.pop(0))
        what = migrationId or f"a migration of {domain}"
        return withDeadline(
            waiter.deferred,
            timeout,
            self.clock,
            f"{what} did not commit within {timeout:g} seconds",
        )

    def _matching(self, domain: str, migrationId: str, named: bool) -> list[_Waiter]:
        wanted = migrationId if named else None
        return [
            w for w in self._waiters if w.domain == domain and w.migrationId == wanted
        ]

    def _offer(self, release: Release) -> None:
        """Hand an unclaimed commit to the first waiter without a name, if any."""
        unnamed = self._matching(release.domain, release.migrationId, named=False)
        if not unnamed:
            self._unclaimed.setdefault(release.domain, []).append(release)
            return
        waiter = unnamed[0]
        self._waiters.remove(waiter)
        self.recordClaim(release.migrationId, True).addCallbacks(
            lambda _: self._claimed(release, waiter),
            lambda failure: self._notClaimed(release, waiter, failure),
        )

    def _claimed(self, release: Release, waiter: _Waiter) -> None:
        if not waiter.deferred.called:
            waiter.deferred.callback(release)
            return
        # The waiter gave up (time-out, cancelled) while the claim was written:
        # nobody took this commit, so it is unclaimed again.
        self.recordClaim(release.migrationId, False).addErrback(lambda _: None)
        self._offer(release)

    def _notClaimed(self, release: Release, waiter: _Waiter, failure: Failure) -> None:
        self.recordClaim(release.migrationId, False).addErrback(lambda _: None)
        if not waiter.deferred.called:
            waiter.deferred.errback(
                JournalUnavailable(
                    f"migration {release.migrationId} of {release.domain} committed, "
                    f"but its claim could not be recorded ({failure.getErrorMessage()})"
                    f": not released; ask again"
                )
            )
        self._offer(release)

    def _forget(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
