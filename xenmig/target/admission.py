"""Admission: which migrations this host takes on, and the bytes each may send."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from xenmig.errors import DeviceRefused, DuplicateMigration, NotAuthorized, StreamError
from xenmig.model import DeviceDescription
from xenmig.target.authz import Grant
from xenmig.target.config import TargetConfig
from xenmig.target.session import TargetSession


class Admission:
    """
    The limits a Prepare must fit in: the host's ``--max-sessions``, one
    migration per domain, and the peer's L{Grant} (kinds, its own sessions,
    declared bytes); then, while the migration runs, its byte budget, charged
    by each of its streams.

    The running migrations are counted from ``running`` (the unfinished
    sessions).  The checks and L{admitted} are separate steps because a
    Prepare awaits its handlers in between; making admission atomic means
    reserving in the checks and releasing on every path (L{release}).
    """

    def __init__(
        self, config: TargetConfig, running: Callable[[], Iterable[TargetSession]]
    ) -> None:
        self.config = config
        self.running = running
        self._budgets: dict[str, int] = {}
        self._received: dict[str, int] = {}

    # -- before a migration is taken on ----------------------------------------------

    def checkHost(self, domain: str) -> None:
        """
        @raise DeviceRefused: if the host runs as many migrations as it may.
        @raise DuplicateMigration: if ``domain`` is already being migrated here.
        """
        active = list(self.running())
        if len(active) >= self.config.maxSessions:
            raise DeviceRefused(
                f"this host already runs {len(active)} migrations (the limit); "
                f"retry later"
            )
        if any(s.domain == domain for s in active):
            raise DuplicateMigration(f"domain {domain} is already being migrated here")

    def checkGrant(
        self,
        grant: Grant,
        migrationId: str,
        descriptions: Sequence[DeviceDescription],
    ) -> None:
        """
        Refuse kinds, counts and sizes beyond what the peer may send here.

        @raise NotAuthorized: for a kind the peer may not migrate here.
        @raise DeviceRefused: beyond its sessions or its bytes.
        """
        peer = grant.identity
        for description in descriptions:
            if not grant.allowsKind(description.kind):
                allowed = ", ".join(sorted(grant.kinds or ())) or "none"
                raise NotAuthorized(
                    f"migration {migrationId}: {peer} may not migrate devices of "
                    f"kind {description.kind!r} (device {description.name}) to this "
                    f"host; its kinds are: {allowed} ({grant.entry})"
                )
        mine = [s for s in self.running() if s.peer == peer]
        if grant.maxSessions is not None and len(mine) >= grant.maxSessions:
            raise DeviceRefused(
                f"{peer} already runs {len(mine)} migration(s) here, its limit "
                f"(max-sessions of {grant.entry}); retry later"
            )
        declared = sum(declaredBytes(d) for d in descriptions)
        if grant.maxBytes is not None and declared > grant.maxBytes:
            raise DeviceRefused(
                f"migration {migrationId}: the devices declare {declared} bytes, "
                f"more than the {grant.maxBytes} bytes {peer} may send here "
                f"(max-bytes of {grant.entry})"
            )

    # -- while it runs -----------------------------------------------------------------

    def admitted(self, migrationId: str, grant: Grant) -> None:
        """The migration was taken on: its byte budget (if any) starts."""
        if grant.maxBytes is not None:
            self._budgets[migrationId] = grant.maxBytes

    def charge(self, migrationId: str) -> Callable[[int], None]:
        """
        A function each stream of ``migrationId`` calls with the bytes it
        received: it raises StreamError once they pass the peer's max-bytes.
        """

        def charge(count: int) -> None:
            total = self._received.get(migrationId, 0) + count
            self._received[migrationId] = total
            budget = self._budgets.get(migrationId)
            if budget is not None and total > budget:
                raise StreamError(
                    f"migration {migrationId}: the source sent more than the "
                    f"{budget} bytes it may send here (max-bytes of the peers file)"
                )

        return charge

    def release(self, migrationId: str) -> None:
        """The migration finished: forget its budget and what it received."""
        self._received.pop(migrationId, None)
        self._budgets.pop(migrationId, None)


def declaredBytes(description: DeviceDescription) -> int:
    """The most a device says it may send: its size, or a larger ``max_size``."""
    most = description.params.get("max_size")
    if isinstance(most, int) and not isinstance(most, bool):
        return max(description.size, most)
    return description.size
