"""Sessions that outlive a broken connection: streams reopened, control re-attached."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from weakref import WeakValueDictionary

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenmig.errors import InvalidTransition, PhaseTimeout, StreamInterrupted
from xenmig.limits import withDeadline
from xenmig.target.session import FINAL, DeviceState, Phase, TargetSession

log = Logger()

#: How long opening a stream again waits for its old connection to let go.
SETTLE_TIMEOUT = 30.0


class Resumption:
    """
    What keeps a resumable session (its source asked at Prepare) alive when a
    connection breaks, for at most ``grace`` seconds each time:

    - a device's stream that breaks leaves the device RECEIVING, waiting for
      its stream to be opened again (OpenStream, then StartStream); the new
      stream goes on after the records the device has taken
      (L{TargetDeviceSlot.records}).  Not opened again in time, the session
      aborts;
    - the control connection that holds the session, lost, leaves it running;
      the same peer takes it over on a new connection (Reattach).  Not
      re-attached in time, the session aborts, unless its commit has begun.

    The phase deadlines bound the whole migration all the same.
    """

    def __init__(self, clock: IReactorTime, grace: float) -> None:
        self.clock = clock
        self.grace = grace
        self._streams: dict[tuple[str, str], IDelayedCall] = {}
        #: The receiver of each stream while its connection lives (held
        #: weakly: a finished stream's buffers are not kept for the session).
        self._receivers: WeakValueDictionary[tuple[str, str], Any] = (
            WeakValueDictionary()
        )
        self._settling: dict[tuple[str, str], list[Deferred[None]]] = {}
        self._detached: dict[str, IDelayedCall] = {}
        #: The migrations each control connection holds, by migration: the
        #: ``prepared`` set of the connection that holds it now.
        self._holders: dict[str, set[str]] = {}

    @property
    def enabled(self) -> bool:
        return self.grace > 0

    def enable(self, session: TargetSession) -> None:
        """Make ``session`` resumable: its broken streams wait to be reopened."""
        session.onInterrupted = self._interrupted

    # -- streams -------------------------------------------------------------------

    def attached(self, session: TargetSession, name: str, receiver: Any) -> None:
        """``receiver`` now carries the stream of ``name``."""
        if session.onInterrupted is not None:
            self._receivers[(session.migrationId, name)] = receiver

    def _interrupted(self, session: TargetSession, name: str, why: str) -> None:
        key = (session.migrationId, name)
        self._receivers.pop(key, None)
        log.warn(
            "migration {migration_id}: {why}; waiting up to {grace} s for it to be "
            "opened again",
            migration_id=session.migrationId,
            why=why,
            grace=self.grace,
        )
        session.device(name).settle(
            Failure(StreamInterrupted(f"migration {session.migrationId}: {why}"))
        )
        for waiter in self._settling.pop(key, []):
            waiter.callback(None)
        self._cancel(self._streams.pop(key, None))
        self._streams[key] = self.clock.callLater(
            self.grace, self._streamExpired, session, name, why
        )

    def _streamExpired(self, session: TargetSession, name: str, why: str) -> None:
        self._streams.pop((session.migrationId, name), None)
        if session.phase in FINAL or session.phase is Phase.COMMITTING:
            return
        if session.device(name).interrupted:
            session.abort(f"{why}, and was not opened again within {self.grace:g} s")

    async def reopen(self, session: TargetSession, name: str) -> tuple[int, bool]:
        """
        Prepare the stream of ``name`` to be opened (again): an old connection
        still open is cut, and its records handed to the device first.  How
        many records the device has taken, and whether its END was one.
        """
        key = (session.migrationId, name)
        slot = session.device(name)
        if slot.streaming and session.onInterrupted is not None:
            settled: Deferred[None] = Deferred()
            self._settling.setdefault(key, []).append(settled)
            receiver = self._receivers.get(key)
            transport = getattr(receiver, "transport", None)
            if receiver is None:
                # Nothing is left to hand its records over or to say it ended
                # (only its connection held it): it ended, unheard.
                session.streamLost(name, "was lost (nothing holds its connection)")
            elif transport is not None:
                log.info(
                    "migration {migration_id}: the stream of {device} is opened "
                    "again: its old connection is cut",
                    migration_id=session.migrationId,
                    device=name,
                )
                transport.abortConnection()
            try:
                await withDeadline(
                    settled,
                    SETTLE_TIMEOUT,
                    self.clock,
                    f"the old stream of device {name} did not let go within "
                    f"{SETTLE_TIMEOUT:g} s",
                )
            except PhaseTimeout as e:
                holding = getattr(receiver, "holding", lambda: "")()
                raise PhaseTimeout(f"{e}: {holding}" if holding else str(e)) from e
            session.checkActive()
        self._cancel(self._streams.pop(key, None))
        ended = slot.state not in (DeviceState.ACCEPTED, DeviceState.RECEIVING)
        return slot.records, ended

    def interruption(self, session: TargetSession, name: str) -> str | None:
        """Why the stream of ``name`` is broken, if it waits to be reopened."""
        return session.device(name).interrupted

    # -- the control connection -----------------------------------------------------

    def held(self, migrationId: str, holder: set[str]) -> bool:
        """Whether the connection whose ``prepared`` set is ``holder`` holds it."""
        return self._holders.get(migrationId, holder) is holder

    def detached(self, session: TargetSession) -> None:
        """The control connection holding ``session`` is gone: wait for the source."""
        migrationId = session.migrationId
        self._cancel(self._detached.pop(migrationId, None))
        log.warn(
            "migration {migration_id}: the source's control connection was lost; "
            "waiting up to {grace} s for it to come back",
            migration_id=migrationId,
            grace=self.grace,
        )
        self._detached[migrationId] = self.clock.callLater(
            self.grace, self._detachExpired, session
        )

    def _detachExpired(self, session: TargetSession) -> None:
        self._detached.pop(session.migrationId, None)
        if session.phase in FINAL or session.phase is Phase.COMMITTING:
            return
        session.abort(
            f"the source's control connection was lost and not re-established "
            f"within {self.grace:g} s"
        )

    def reattached(self, session: TargetSession, holder: set[str]) -> None:
        """The connection whose ``prepared`` set is ``holder`` now holds it."""
        migrationId = session.migrationId
        old = self._holders.get(migrationId)
        if old is not None and old is not holder:
            old.discard(migrationId)
        self._holders[migrationId] = holder
        holder.add(migrationId)
        self._cancel(self._detached.pop(migrationId, None))
        log.info(
            "migration {migration_id}: the source re-attached its control connection",
            migration_id=migrationId,
        )

    # -- the end ----------------------------------------------------------------------

    def forget(self, migrationId: str) -> None:
        """The session ended: no timer of it remains."""
        self._cancel(self._detached.pop(migrationId, None))
        self._holders.pop(migrationId, None)
        for key in [k for k in self._streams if k[0] == migrationId]:
            self._cancel(self._streams.pop(key))
        for key in [k for k in self._receivers if k[0] == migrationId]:
            del self._receivers[key]
        for key in [k for k in self._settling if k[0] == migrationId]:
            for waiter in self._settling.pop(key):
                waiter.callback(None)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


class ResumingTarget:
    """
    The commands of resumable sessions, and what a lost control connection
    means, as the target core answers them (a
    part of L{xenmig.target.core.MigrationTarget}).
    """

    resumption: Resumption
    admission: Any

    @property
    def sessions(self) -> dict[str, TargetSession]:
        raise NotImplementedError()

    def session(self, migrationId: str, peer: str | None = None) -> TargetSession:
        raise NotImplementedError()

    def authorize(self, peer: str, fingerprint: str = "") -> Any:
        raise NotImplementedError()

    def openStream(
        self, peer: str, migrationId: str, device: str, fingerprint: str = ""
    ) -> bytes:
        raise NotImplementedError()

    def controlConnectionLost(
        self, peer: str | None, migrationIds: Iterable[str]
    ) -> None:
        """
        The control connection that prepared ``migrationIds`` is gone: each
        that has not begun to commit aborts (its source learns the outcome
        with QueryMigration on a new connection), and a Prepare of one still
        being answered opens no session (or aborts the one it opens).
        """
        reason = "the source's control connection was lost"
        holder = migrationIds if isinstance(migrationIds, set) else set(migrationIds)
        for migrationId in list(holder):
            if not self.resumption.held(migrationId, holder):
                continue  # re-attached on another connection since
            session = self.sessions.get(migrationId)
            if session is None:
                # Its Prepare is still being answered: it opens no session.
                if self.admission.abandon(migrationId, reason):
                    log.info(
                        "migration {migration_id}: {reason} during its Prepare",
                        migration_id=migrationId,
                        reason=reason,
                    )
                continue
            if session.phase in FINAL or session.phase is Phase.COMMITTING:
                continue
            if session.onInterrupted is not None:
                self.resumption.detached(session)
            else:
                session.abort(reason)

    def grantResume(self, peer: str, migrationId: str) -> bool:
        """
        The source of a prepared session asks that it survive broken
        connections: whether it will (not with ``--reconnect-grace 0``).
        """
        session = self.session(migrationId, peer)
        if not self.resumption.enabled:
            return False
        self.resumption.enable(session)
        return True

    async def openStreamAt(
        self, peer: str, migrationId: str, device: str, fingerprint: str = ""
    ) -> dict[str, Any]:
        """
        OpenStream: a token (L{openStream}); in a resumable session, also how
        many records the device has taken (an old stream cut first) and
        whether its END was among them.
        """
        self.authorize(peer, fingerprint)
        session = self.session(migrationId, peer)
        session.checkActive()
        session.device(device)
        if session.onInterrupted is None:
            return {"token": self.openStream(peer, migrationId, device, fingerprint)}
        position, ended = await self.resumption.reopen(session, device)
        token = self.openStream(peer, migrationId, device, fingerprint)
        return {"token": token, "position": position, "ended": ended}

    def streamPosition(self, peer: str, migrationId: str, device: str) -> dict:
        """How many records of its stream the device has taken; whether END."""
        slot = self.session(migrationId, peer).device(device)
        ended = slot.state.value not in ("ACCEPTED", "RECEIVING")
        return {"position": slot.records, "ended": ended}

    def streamAttached(
        self, session: TargetSession, device: str, receiver: Any
    ) -> None:
        """``receiver`` carries the stream of ``device`` (see L{Resumption})."""
        self.resumption.attached(session, device, receiver)

    def reattach(self, peer: str, migrationId: str, holder: set[str]) -> str:
        """
        The source takes its session over on a new control connection (whose
        ``prepared`` set is ``holder``): its phase.

        @raise MigrationAborted: it was aborted meanwhile (the reason says why).
        @raise InvalidTransition: it is not resumable.
        """
        session = self.session(migrationId, peer)
        if session.phase is Phase.ABORTED:
            session.checkActive()
        if session.onInterrupted is None and session.phase not in FINAL:
            raise InvalidTransition(
                f"migration {migrationId} was not prepared to survive its control "
                f"connection"
            )
        if session.phase not in FINAL:
            self.resumption.reattached(session, holder)
        return session.phase.value
