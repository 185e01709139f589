"""Preparation: how a target answers Prepare, with a new session or a refusal."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenmig.errors import (
    Busy,
    DeviceRefused,
    DuplicateMigration,
    JournalUnavailable,
    MigrationAborted,
    NotAuthorized,
)
from xenmig.interfaces import IDeviceKind, ITargetDevice
from xenmig.model import (
    DeviceDescription,
    DeviceOffer,
    DeviceProgress,
    checkMigrationId,
    checkName,
)
from xenmig.target.admission import Admission, Reservation
from xenmig.target.authz import Grant
from xenmig.target.config import TargetConfig
from xenmig.target.context import TargetContext
from xenmig.target.history import MigrationHistory
from xenmig.target.migrationrecord import MigrationRecord
from xenmig.target.offers import abortAccepted, checkDevices, describe, offerDevices
from xenmig.target.session import DeviceState, Phase, TargetDeviceSlot, TargetSession
from xenmig.target.staging import StagingArea

log = Logger()

#: Makes the context of one device: (migration id, domain, peer, device, roots).
ContextMaker = Callable[..., TargetContext]


@dataclass(frozen=True)
class Admitted:
    """A Prepare that passed every check and holds its reservation."""

    grant: Grant
    descriptions: tuple[DeviceDescription, ...]
    reservation: Reservation

    @property
    def migrationId(self) -> str:
        return self.reservation.migrationId

    @property
    def domain(self) -> str:
        return self.reservation.domain


@dataclass(frozen=True)
class Prepared:
    """What a Prepare came to: the offers, and a session or the refusal's record."""

    offers: list[DeviceOffer]
    session: TargetSession | None = None
    refusal: MigrationRecord | None = None


class Preparation:
    """
    Answers Prepare in two steps.  L{admit}, synchronous: the checks
    (arguments, the history) and the reservation of the id, the domain and
    the limits (L{Admission.reserve}).  Then L{prepare}: each device offered
    to its kind's handler in its own staging directory; if every handler
    accepted, the session is journalled PREPARED and opened; otherwise every
    accepted device is taken back, the staging removed, and the refusal
    recorded.  Whatever ends a Prepare without a session (a refusal, an
    error, a journal that cannot record it, a cancellation) leaves nothing
    and releases the reservation.
    """

    def __init__(
        self,
        config: TargetConfig,
        clock: IReactorTime,
        kinds: dict[str, IDeviceKind],
        history: MigrationHistory,
        admission: Admission,
        staging: StagingArea,
        makeContext: ContextMaker,
        onChange: Callable[[TargetSession], Deferred[None]],
    ) -> None:
        self.config = config
        self.clock = clock
        self.kinds = kinds
        self.history = history
        self.admission = admission
        self.staging = staging
        self.makeContext = makeContext
        self.onChange = onChange

    def admit(
        self,
        grant: Grant,
        migrationId: str,
        domain: str,
        devices: list[dict[str, Any]],
    ) -> Admitted:
        """
        Check a Prepare and reserve what it needs, at once (no I/O).

        @raise xenmig.errors.XenmigError: if a check fails (nothing is held).
        """
        checkMigrationId(migrationId)
        checkName("domain", domain)
        self.history.checkNew(migrationId)
        checkDevices(devices, self.config.maxDevices)
        descriptions = tuple(describe(d) for d in devices)
        try:
            reservation = self.admission.reserve(
                grant, migrationId, domain, descriptions
            )
        except Busy as e:  # for now: the source retries
            log.info(
                "migration {migration_id} of {domain} from {peer} not admitted "
                "yet: BUSY {reason}",
                migration_id=migrationId,
                domain=domain,
                peer=grant.identity,
                reason=str(e),
            )
            raise
        except (DuplicateMigration, DeviceRefused, NotAuthorized) as e:
            log.warn(
                "migration {migration_id} of {domain} from {peer} not admitted: "
                "{reason}",
                migration_id=migrationId,
                domain=domain,
                peer=grant.identity,
                reason=str(e),
            )
            raise
        return Admitted(grant, descriptions, reservation)

    async def prepare(self, admitted: Admitted) -> Prepared:
        """
        Offer the devices of an admitted Prepare to their handlers.

        @raise JournalUnavailable: if the state directory cannot take the
            session (nothing is kept).
        @raise MigrationAborted: if the requester went away meanwhile.
        """
        migrationId, domain = admitted.migrationId, admitted.domain
        peer, roots = admitted.grant.identity, admitted.grant.roots
        with admitted.reservation as reservation:
            contexts = [
                self.makeContext(migrationId, domain, peer, d.name, roots)
                for d in admitted.descriptions
            ]
            self.staging.opened(migrationId, contexts)
            accepted: list[ITargetDevice] = []
            try:
                offers = await offerDevices(
                    self.kinds,
                    list(zip(admitted.descriptions, contexts, strict=True)),
                    self.staging.makeDeviceDir,
                    accepted,
                )
                if len(accepted) < len(admitted.descriptions):
                    await self._takeBack(admitted, accepted, _reasons(offers))
                    now = self.clock.seconds()
                    refusal = MigrationRecord.refusal(
                        migrationId, domain, peer, admitted.descriptions, offers, now
                    )
                    return Prepared(offers, refusal=refusal)
                session = await self._open(admitted, accepted)
            except BaseException as e:
                await self._takeBack(admitted, accepted, str(e) or repr(e))
                raise
            reservation.open()
        if reservation.abandoned is not None:
            # Lost while its PREPARED record was being written: it ends now.
            await session.abort(reservation.abandoned)
            raise MigrationAborted(
                f"migration {migrationId} was aborted: {reservation.abandoned}"
            )
        return Prepared(offers, session=session)

    async def _open(
        self, admitted: Admitted, accepted: list[ITargetDevice]
    ) -> TargetSession:
        """Every device was accepted: journal the session PREPARED, then open it."""
        reservation = admitted.reservation
        if reservation.abandoned is not None:
            raise MigrationAborted(
                f"migration {reservation.migrationId} was not prepared: "
                f"{reservation.abandoned}"
            )
        await self._journal(admitted)
        slots = [TargetDeviceSlot(dev, dev.description, self.clock) for dev in accepted]
        session = TargetSession(
            reservation.migrationId,
            reservation.domain,
            reservation.peer,
            slots,
            self.clock,
            self.config.timeouts.deadlines(),
            self.onChange,
        )
        self.history.opened(session)
        return session

    async def _journal(self, admitted: Admitted) -> None:
        """
        Make the PREPARED record durable.  A cancellation does not stop a
        write under way (its record may land): it abandons the Prepare, whose
        session then opens only to abort.

        @raise JournalUnavailable: if the state directory cannot take it.
        """
        reservation = admitted.reservation
        written = self.history.journalled(self._preparedRecord(admitted))
        failed: list[Failure] = []
        written.addErrback(failed.append)
        try:
            await _shielded(written)
        except CancelledError:
            reservation.abandon("its Prepare was cancelled")
            await written
        if failed and failed[0].check(OSError, JournalUnavailable):
            # Never to be written later: this Prepare keeps nothing.
            await self.history.withdrawn(reservation.migrationId)
            raise JournalUnavailable(
                f"migration {reservation.migrationId}: the target could not record "
                f"it in its state directory ({failed[0].value}); nothing was kept: "
                f"free space there (or make it writable) and prepare again"
            )
        if failed:
            failed[0].raiseException()

    def _preparedRecord(self, admitted: Admitted) -> MigrationRecord:
        """The journal's record of the session about to open, PREPARED."""
        now = self.clock.seconds()
        devices = tuple(
            DeviceProgress(d.name, d.kind, DeviceState.ACCEPTED.value, 0, d.size)
            for d in admitted.descriptions
        )
        return MigrationRecord(
            migrationId=admitted.migrationId,
            domain=admitted.domain,
            phase=Phase.PREPARED,
            peer=admitted.grant.identity,
            started=now,
            updated=now,
            devices=devices,
            staging=tuple(self.staging.paths(admitted.migrationId)),
        )

    async def _takeBack(
        self, admitted: Admitted, accepted: Sequence[ITargetDevice], reason: str
    ) -> None:
        """
        Take back every accepted device and remove the staging.  Only the
        holder of the id's reservation gets here, so the staging is its own.
        """
        migrationId = admitted.migrationId
        await abortAccepted(migrationId, accepted)
        try:
            await self.staging.remove(migrationId)
        except Exception:
            log.failure(
                "migration {migration_id}: removing its staging failed",
                migration_id=migrationId,
            )
        log.warn(
            "migration {migration_id} of {domain} from {peer} not prepared: {reason}",
            migration_id=migrationId,
            domain=admitted.domain,
            peer=admitted.grant.identity,
            reason=reason,
        )


def _shielded(d: Deferred[None]) -> Deferred[None]:
    """
    A Deferred firing as ``d`` (which must not fail) fires; cancelling it
    leaves ``d`` alone.
    """
    copy: Deferred[None] = Deferred()

    def passOn(result: None) -> None:
        if not copy.called:
            copy.callback(result)
        return result

    d.addCallback(passOn)
    return copy


def _reasons(offers: Sequence[DeviceOffer]) -> str:
    return "refused: " + "; ".join(o.reason for o in offers if not o.accepted)
