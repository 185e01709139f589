"""Opening a resumable migration's streams (again, when they break); verifying them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from xenmig import amp_commands as commands
from xenmig.errors import StreamInterrupted, StreamStalled
from xenmig.pump import TokenBucket
from xenmig.source.controllink import ControlLink
from xenmig.source.device import DeviceRun
from xenmig.source.inlinestream import InlineStream, Send
from xenmig.source.pacing import Slots
from xenmig.source.resumable import RawStream, ResumableStream, ResumePolicy
from xenmig.source.stall import watchControl

if TYPE_CHECKING:
    from xenmig.source.connection import TargetConnection


class Resuming(Protocol):
    """What reopening uses of a L{xenmig.source.migration.SourceMigration}."""

    client: TargetConnection
    link: ControlLink
    migrationId: str
    commands: Slots
    #: The migration's bandwidth limit, shared by its streams (None: no limit).
    _bucket: TokenBucket | None


async def openDeviceStream(migration: Resuming, run: DeviceRun) -> None:
    """
    Open the stream of ``run``'s device (kept in ``run.sender`` at once, so
    that an abort stops it however far its opening got): resumable if the
    target granted it, else one connection as before.
    """
    # A device whose source paces itself by how fast its writes go (QEMU's
    # estimate of its bandwidth) keeps little waiting unsent: what waits is
    # sent in the paused window, unknown to that estimate.
    queue = getattr(run.device, "streamQueue", None)
    if inlined(migration, run):
        run.sender = InlineStream(run.name, inlineSender(migration, run.name))
        return
    if migration.link.resumable:
        resumable = run.sender = resumableStream(migration, run.name, queue)
        await resumable.open()
        return
    control = migration.link.protocol
    assert control is not None
    plain = run.sender = migration.client.streamSender(
        run.name, migration._bucket, queue
    )
    await migration.client.openStream(
        control, migration.migrationId, plain, migration.commands
    )


def inlined(migration: Resuming, run: DeviceRun) -> bool:
    """
    Whether ``run``'s stream goes on the control connection: a small device
    without pre-copy, if the client allows it and the target offered it.
    """
    size = run.description.size if run.description is not None else -1
    allowed = getattr(migration.client, "inline", False)
    return allowed and not run.device.precopy and 0 <= size <= migration.link.inline


def inlineSender(migration: Resuming, device: str) -> Send:
    """
    How an L{InlineStream} of ``device`` sends: StreamRecords on the live
    control connection (one of the migration's command slots), asked again
    on a new one in a resumable session; paced by the bandwidth limit.
    """
    client, link, bucket = migration.client, migration.link, migration._bucket

    async def send(offset: int, data: bytes) -> dict[str, Any]:
        delay = bucket.take(len(data)) if bucket is not None else 0.0
        if delay > 0:
            await deferLater(client.reactor, delay, lambda: None)
        answer = await link.call(
            client.timeouts.call,
            f"sending the state of {device}",
            commands.StreamRecords,
            migration.commands,
            again=True,
            migration_id=migration.migrationId,
            device=device,
            offset=offset,
            data=data,
        )
        return answer

    return lambda offset, data: Deferred.fromCoroutine(send(offset, data))


def resumableStream(
    migration: Resuming, device: str, queue: int | None = None
) -> ResumableStream:
    """
    A L{ResumableStream} for ``device``: each opening asks the target for a
    token and how many records it has (OpenStream on the live control
    connection), then presents the token on a new connection.  Broken, it
    is tried again within the client's C{resumePolicy}.  Each connection is
    paced by the migration's bandwidth limit, if any.
    """
    client, link, slots = migration.client, migration.link, migration.commands
    migrationId = migration.migrationId

    async def opener() -> tuple[RawStream | None, int]:
        sender = client.streamSender(device, migration._bucket, queue)
        stream.step("waiting for the control connection")
        protocol = await link.current()
        stream.step("asking for a token (OpenStream), then connecting")
        try:
            answer = await client.openStream(protocol, migrationId, sender, slots)
        except BaseException:
            sender.abort()
            raise
        position = int(answer.get("position") or 0)
        return (None if answer.get("ended") else sender), position

    async def asker() -> int:
        answer = await link.call(
            client.timeouts.call,
            f"the position of the stream of {device}",
            commands.StreamPosition,
            slots,
            again=True,
            migration_id=migrationId,
            device=device,
        )
        return int(answer["position"])

    retries = getattr(client, "resumePolicy", None) or ResumePolicy()
    stream = ResumableStream(
        device,
        client.reactor,
        opener,
        asker,
        window=retries.window,
        retries=retries,
        notice=client.onRetry,
        stall=getattr(client.timeouts, "stall", 0.0),
    )
    return stream


async def deviceReady(migration: Resuming, run: DeviceRun) -> dict[str, Any]:
    """
    DeviceReady for ``run``, while the control connection is checked
    (L{watchControl}).  In a resumable session it is asked again when the
    control connection went, or fell silent (then given up and re-established);
    and if the target says the stream broke before its END arrived, the
    stream is opened again (what the target has not taken, sent again) first.
    """
    client, link, slots = migration.client, migration.link, migration.commands
    migrationId = migration.migrationId
    verification = f"verification of device {run.name}"
    while True:
        control = await link.current()
        asking = link.call(
            client.timeouts.ready,
            verification,
            commands.DeviceReady,
            slots,
            again=link.resumable,
            migration_id=migrationId,
            device=run.name,
        )
        try:
            answer = await watchControl(
                client, control, migrationId, f"the {verification}", asking
            )
        except StreamInterrupted:
            if not isinstance(run.sender, ResumableStream):
                raise
            await run.sender.resume()
            continue
        except StreamStalled:
            if not link.resumable:
                raise
            client.hangUp(control, abort=True)  # silent: re-established
            continue
        if isinstance(run.sender, ResumableStream):
            run.sender.verified()
        return answer
