"""Admission: the reservations that decide which migrations this host takes on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType

from twisted.logger import Logger

from xenmig.errors import (
    Busy,
    DeviceRefused,
    DuplicateMigration,
    NotAuthorized,
    StreamError,
)
from xenmig.limits import RETRY_SESSIONS
from xenmig.model import DeviceDescription
from xenmig.target.authz import Grant
from xenmig.target.config import TargetConfig

log = Logger()


class Reservation:
    """
    What one migration holds of this host, from the moment its Prepare is
    admitted until its session ends: its id, its domain, one of the host's
    ``--max-sessions`` and one of its peer's ``max-sessions``, and its byte
    budget (the peer's ``max-bytes`` as it was at Prepare).

    Used as a context manager around a Prepare: leaving the block releases it
    unless L{open} handed it to a session (whose end releases it, through
    L{Admission.release}).  Releasing twice is harmless.
    """

    def __init__(
        self,
        admission: Admission,
        migrationId: str,
        domain: str,
        peer: str,
        budget: int | None,
    ) -> None:
        self._admission = admission
        self.migrationId = migrationId
        self.domain = domain
        self.peer = peer
        #: The most its streams may deliver (None: no limit).
        self.budget = budget
        #: What its streams delivered so far.
        self.received = 0
        #: Why its Prepare must not open a session after all (None: it may).
        self.abandoned: str | None = None
        self.released = False
        self._opened = False

    def open(self) -> None:
        """A session now holds this reservation, until it ends."""
        self._opened = True

    def abandon(self, reason: str) -> None:
        """The Prepare's requester is gone: it must not leave a session running."""
        if self.abandoned is None:
            self.abandoned = reason

    def release(self) -> None:
        """Give everything back (idempotent)."""
        if not self.released:
            self.released = True
            self._admission._forget(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._opened:
            self.release()


class Admission:
    """
    The limits a Prepare must fit in, held as L{Reservation}s: one migration
    per id and per domain, the host's ``--max-sessions``, and the peer's
    L{Grant} (kinds, its own ``max-sessions``, its ``max-bytes``).

    L{reserve} checks and takes a reservation in one synchronous step, before
    a Prepare awaits anything, so two Prepares in flight together can never
    both pass a check that only one of them may pass.  The reservations are
    the only count: a migration holds one from its admission (before any
    handler is asked) to the end of its session, and every other path
    (refusal, failure, cancellation) releases it.
    """

    def __init__(self, config: TargetConfig) -> None:
        self.config = config
        self._byId: dict[str, Reservation] = {}
        self._byDomain: dict[str, Reservation] = {}

    # -- taking a migration on ---------------------------------------------------------

    def reserve(
        self,
        grant: Grant,
        migrationId: str,
        domain: str,
        descriptions: Sequence[DeviceDescription],
    ) -> Reservation:
        """
        Admit a migration of ``domain`` for the peer of ``grant``.

        @raise NotAuthorized: for a kind the peer may not migrate here.
        @raise DuplicateMigration: if ``migrationId`` is being prepared or run
            here already, or ``domain`` is being migrated here.
        @raise Busy: beyond the host's or the peer's sessions (for now).
        @raise DeviceRefused: beyond the peer's bytes.
        """
        checkKinds(grant, migrationId, descriptions)
        self._checkUnique(migrationId, domain)
        self._checkCounts(grant)
        checkBytes(grant, migrationId, descriptions)
        reservation = Reservation(
            self, migrationId, domain, grant.identity, grant.maxBytes
        )
        self._byId[migrationId] = reservation
        self._byDomain[domain] = reservation
        return reservation

    def _checkUnique(self, migrationId: str, domain: str) -> None:
        if migrationId in self._byId:
            raise DuplicateMigration(
                f"migration {migrationId} is already being prepared or run here"
            )
        holder = self._byDomain.get(domain)
        if holder is not None:
            raise DuplicateMigration(
                f"domain {domain} is already being migrated here (migration "
                f"{holder.migrationId}); wait for it to end, or abort it"
            )

    def _checkCounts(self, grant: Grant) -> None:
        held = len(self._byId)
        if held >= self.config.maxSessions:
            raise Busy.at(
                "--max-sessions",
                f"the target host already runs {held} migration(s), its limit "
                f"(--max-sessions {self.config.maxSessions})",
                RETRY_SESSIONS,
            )
        peer = grant.identity
        mine = sum(1 for r in self._byId.values() if r.peer == peer)
        if grant.maxSessions is not None and mine >= grant.maxSessions:
            raise Busy.at(
                "max-sessions",
                f"{peer} already runs {mine} migration(s) here, its limit "
                f"(max-sessions of {grant.entry})",
                RETRY_SESSIONS,
            )

    # -- while it runs -----------------------------------------------------------------

    def held(self, migrationId: str) -> Reservation | None:
        """The reservation of ``migrationId``, if it holds one."""
        return self._byId.get(migrationId)

    def abandon(self, migrationId: str, reason: str) -> bool:
        """
        The requester of ``migrationId``'s Prepare is gone (see
        L{Reservation.abandon}); whether a Prepare of it was in flight.
        """
        reservation = self._byId.get(migrationId)
        if reservation is None:
            return False
        reservation.abandon(reason)
        return True

    def charge(self, migrationId: str) -> Callable[[int], None]:
        """
        A function each stream of ``migrationId`` calls with the bytes it
        received: it raises StreamError once they pass the peer's max-bytes.
        """

        def charge(count: int) -> None:
            reservation = self._byId.get(migrationId)
            if reservation is None:
                return  # the migration is over: its streams fail on their own
            reservation.received += count
            budget = reservation.budget
            if budget is not None and reservation.received > budget:
                raise StreamError(
                    f"migration {migrationId}: the source sent more than the "
                    f"{budget} bytes it may send here (max-bytes of the peers file)"
                )

        return charge

    def release(self, migrationId: str) -> None:
        """The session of ``migrationId`` ended: its reservation is released."""
        reservation = self._byId.get(migrationId)
        if reservation is not None:
            reservation.release()

    def _forget(self, reservation: Reservation) -> None:
        if self._byId.get(reservation.migrationId) is reservation:
            del self._byId[reservation.migrationId]
        if self._byDomain.get(reservation.domain) is reservation:
            del self._byDomain[reservation.domain]
        log.debug(
            "migration {migration_id}: admission released ({held} held)",
            migration_id=reservation.migrationId,
            held=len(self._byId),
        )


def checkKinds(
    grant: Grant, migrationId: str, descriptions: Sequence[DeviceDescription]
) -> None:
    """@raise NotAuthorized: for a kind the peer of ``grant`` may not migrate."""
    for description in descriptions:
        if not grant.allowsKind(description.kind):
            allowed = ", ".join(sorted(grant.kinds or ())) or "none"
            raise NotAuthorized(
                f"migration {migrationId}: {grant.identity} may not migrate devices "
                f"of kind {description.kind!r} (device {description.name}) to this "
                f"host; its kinds are: {allowed} ({grant.entry})"
            )


def checkBytes(
    grant: Grant, migrationId: str, descriptions: Sequence[DeviceDescription]
) -> None:
    """@raise DeviceRefused: if the devices declare more than the peer's max-bytes."""
    declared = sum(declaredBytes(d) for d in descriptions)
    if grant.maxBytes is not None and declared > grant.maxBytes:
        raise DeviceRefused(
            f"migration {migrationId}: the devices declare {declared} bytes, "
            f"more than the {grant.maxBytes} bytes {grant.identity} may send here "
            f"(max-bytes of {grant.entry})"
        )


def declaredBytes(description: DeviceDescription) -> int:
    """The most a device says it may send: its size, or a larger ``max_size``."""
    most = description.params.get("max_size")
    if isinstance(most, int) and not isinstance(most, bool):
        return max(description.size, most)
    return description.size
