"""The handlers' side of Prepare: each device offered to its kind, or taken back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from xenmig.amp_commands import ACCEPTED_PROTOCOL_VERSIONS, PROTOCOL_VERSION
from xenmig.errors import BadSpec, JournalUnavailable, VersionMismatch, XenmigError
from xenmig.interfaces import IDeviceKind, IStagelessDevice, ITargetDevice
from xenmig.model import DeviceDescription, DeviceOffer
from xenmig.target.context import TargetContext

log = Logger()


def checkVersion(version: int) -> None:
    """@raise VersionMismatch: unless this host speaks control protocol ``version``."""
    if version not in ACCEPTED_PROTOCOL_VERSIONS:
        raise VersionMismatch(
            f"control protocol version {version} is not supported; this host "
            f"speaks {PROTOCOL_VERSION}: upgrade the older host"
        )


def checkDevices(devices: Sequence[dict[str, Any]], most: int) -> None:
    """@raise BadSpec: unless there are 1 to ``most`` devices, named distinctly."""
    names = [d.get("name") for d in devices]
    if not devices or len(devices) > most or len(set(names)) != len(names):
        raise BadSpec(f"a migration needs 1 to {most} devices with distinct names")


def describe(device: dict[str, Any]) -> DeviceDescription:
    """The description of a device, as Prepare's ``devices`` argument gives it."""
    return DeviceDescription(
        kind=device["kind"],
        name=device["name"],
        size=device["size"],
        params=device["params"],
        precopy=device["precopy"],
    )


async def offerDevices(
    kinds: dict[str, IDeviceKind],
    contexts: Sequence[tuple[DeviceDescription, TargetContext]],
    makeDir: Callable[[TargetContext], Deferred[None]],
    accepted: list[ITargetDevice],
) -> list[DeviceOffer]:
    """
    Offer each device to its kind's target handler, in its own staging
    directory (``makeDir``, unless it is an L{IStagelessDevice}); each
    handler that accepts is appended to
    ``accepted`` as soon as it does, so that a caller can abort it whatever
    happens next.  The offers, one per device, in order.

    @raise JournalUnavailable: if a staging directory cannot be made.
    """
    offers = []
    for description, context in contexts:
        kind = kinds.get(description.kind)
        if kind is None:
            reason = f"no handler for device kind {description.kind!r} on this host"
            offers.append(DeviceOffer(description.name, False, reason))
            continue
        offer = await _offer(kind, description, context, makeDir, accepted)
        offers.append(offer)
    return offers


async def _offer(
    kind: IDeviceKind,
    description: DeviceDescription,
    context: TargetContext,
    makeDir: Callable[[TargetContext], Deferred[None]],
    accepted: list[ITargetDevice],
) -> DeviceOffer:
    name = description.name
    try:
        device = kind.target(description, context)
        if not IStagelessDevice.providedBy(device):
            await _makeStagingDir(makeDir, context, name)
        params = await device.accept()
    except (CancelledError, JournalUnavailable):
        raise  # the Prepare was cancelled, or the state directory failed
    except XenmigError as e:
        reason = str(e) if f"device {name}" in str(e) else f"device {name}: {e}"
        return DeviceOffer(name, False, reason)
    except Exception as e:
        log.failure(
            "migration {migration_id}: device {device} failed at prepare",
            migration_id=context.migrationId,
            device=name,
        )
        reason = f"device {name}: the {description.kind} handler failed: {e!r}"
        return DeviceOffer(name, False, reason)
    accepted.append(device)
    return DeviceOffer(name, True, "", params or {})


async def _makeStagingDir(
    makeDir: Callable[[TargetContext], Deferred[None]],
    context: TargetContext,
    name: str,
) -> None:
    """@raise JournalUnavailable: if the device's staging directory cannot be made."""
    try:
        await makeDir(context)
    except OSError as e:
        raise JournalUnavailable(
            f"migration {context.migrationId}: the target could not make the "
            f"staging directory of device {name} ({e}); nothing was kept: check "
            f"its state directory (space, permissions) and prepare again"
        ) from e


async def abortAccepted(migrationId: str, accepted: Sequence[ITargetDevice]) -> None:
    """Let every handler that accepted discard what it holds (failures logged)."""
    for device in accepted:
        try:
            await device.abort()
        except Exception:
            log.failure(
                "migration {migration_id}: abort after a refusal failed",
                migration_id=migrationId,
            )
