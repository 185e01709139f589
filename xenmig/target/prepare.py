"""Preparation: how a target answers Prepare, with a new session or a refusal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from xenmig.interfaces import IDeviceKind, ITargetDevice
from xenmig.model import DeviceDescription, DeviceOffer, checkMigrationId, checkName
from xenmig.target.admission import Admission
from xenmig.target.authz import Grant
from xenmig.target.config import TargetConfig
from xenmig.target.context import TargetContext
from xenmig.target.history import MigrationHistory
from xenmig.target.migrationrecord import MigrationRecord
from xenmig.target.offers import abortAccepted, checkDevices, describe, offerDevices
from xenmig.target.session import TargetDeviceSlot, TargetSession
from xenmig.target.staging import StagingArea

log = Logger()

#: Makes the context of one device: (migration id, domain, peer, device, roots).
ContextMaker = Callable[..., TargetContext]


@dataclass(frozen=True)
class Prepared:
    """What a Prepare came to: the offers, and a session or the refusal's record."""

    offers: list[DeviceOffer]
    session: TargetSession | None = None
    refusal: MigrationRecord | None = None


class Preparation:
    """
    Answers Prepare: the checks (arguments, the history, the host's and the
    peer's limits), each device offered to its kind's handler in its own
    staging directory, then a session in PREPARED if every handler accepted,
    or else every accepted device taken back, the staging removed, and the
    record of the refusal.
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

    async def prepare(
        self,
        grant: Grant,
        migrationId: str,
        domain: str,
        devices: list[dict[str, Any]],
    ) -> Prepared:
        """
        Prepare ``migrationId`` for the peer of ``grant``.

        @raise xenmig.errors.XenmigError: if a check fails (nothing is kept).
        """
        peer = grant.identity
        descriptions = self._check(grant, migrationId, domain, devices)
        contexts = [
            self.makeContext(migrationId, domain, peer, d.name, grant.roots)
            for d in descriptions
        ]
        self.staging.opened(migrationId, contexts)
        accepted: list[ITargetDevice] = []
        try:
            offers = await offerDevices(
                self.kinds,
                list(zip(descriptions, contexts, strict=True)),
                self.staging.makeDeviceDir,
                accepted,
            )
        except BaseException:
            await self._refuse(migrationId, domain, peer, [], accepted)
            raise
        if len(accepted) < len(descriptions):
            await self._refuse(migrationId, domain, peer, offers, accepted)
            now = self.clock.seconds()
            refusal = MigrationRecord.refusal(
                migrationId, domain, peer, descriptions, offers, now
            )
            return Prepared(offers, refusal=refusal)
        return Prepared(
            offers, session=self._open(grant, migrationId, domain, accepted)
        )

    def _check(
        self,
        grant: Grant,
        migrationId: str,
        domain: str,
        devices: list[dict[str, Any]],
    ) -> list[DeviceDescription]:
        checkMigrationId(migrationId)
        checkName("domain", domain)
        self.history.checkNew(migrationId)
        self.admission.checkHost(domain)
        checkDevices(devices, self.config.maxDevices)
        descriptions = [describe(d) for d in devices]
        self.admission.checkGrant(grant, migrationId, descriptions)
        return descriptions

    def _open(
        self,
        grant: Grant,
        migrationId: str,
        domain: str,
        accepted: list[ITargetDevice],
    ) -> TargetSession:
        """Every device was accepted: the session starts, PREPARED."""
        slots = [TargetDeviceSlot(dev, dev.description, self.clock) for dev in accepted]
        session = TargetSession(
            migrationId,
            domain,
            grant.identity,
            slots,
            self.clock,
            self.config.timeouts.deadlines(),
            self.onChange,
        )
        self.history.opened(session)
        self.admission.admitted(migrationId, grant)
        return session

    async def _refuse(
        self,
        migrationId: str,
        domain: str,
        peer: str,
        offers: list[DeviceOffer],
        accepted: list[ITargetDevice],
    ) -> None:
        """Take back every accepted device and remove the staging."""
        await abortAccepted(migrationId, accepted)
        await self.staging.remove(migrationId)
        reasons = "; ".join(o.reason for o in offers if not o.accepted) or "error"
        log.warn(
            "migration {migration_id} of {domain} from {peer} refused: {reasons}",
            migration_id=migrationId,
            domain=domain,
            peer=peer,
            reasons=reasons,
        )
