"""The source's progress time-out: a device's stream that stops moving fails."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from xenmig.errors import StreamStalled

T = TypeVar("T")


def streamProgress(sender: Any) -> object:
    """
    What changes while a stream sender makes progress: the bytes of records it
    framed (handed to its connection or queue; KEEPALIVE records do not count)
    and, for a threaded sender, also the bytes its thread handed to the kernel
    and those the target has not acknowledged yet (L{ThreadedStreamSender.progress}).
    A sender waiting out the migration's bandwidth limit is making progress.
    """
    if getattr(sender, "pacing", False):
        return object()  # waiting out the migration's own bandwidth limit
    progress = getattr(sender, "progress", None)
    if progress is not None:
        return progress()
    # any IRecordWriter: at least the bytes of content it was given
    return (getattr(sender, "framedBytes", 0), sender.bytesWritten)


async def watchProgress(
    clock: Any,
    seconds: float,
    progress: Callable[[], object],
    stalled: Callable[[], StreamStalled],
    work: Deferred[T] | Coroutine[Any, Any, T],
) -> T:
    """
    Await ``work`` while watching ``progress()``: if it stays the same for
    ``seconds`` (0: never), ``work`` is cancelled and L{StreamStalled} (made by
    ``stalled``) raised instead.  Checked about four times per ``seconds``.
    """
    inner: Deferred[T] = ensureDeferred(work)
    if seconds <= 0:
        return await inner
    outer: Deferred[T] = Deferred(lambda _: inner.cancel())
    last = [progress(), clock.seconds()]

    def check() -> None:
        now, seen = clock.seconds(), progress()
        if seen != last[0]:
            last[:] = [seen, now]
        elif now - last[1] >= seconds and not outer.called:
            watch.stop()
            outer.errback(Failure(stalled()))
            inner.cancel()

    def done(result: Any) -> None:
        if watch.running:
            watch.stop()
        if outer.called:
            if isinstance(result, Failure):
                result.trap(Exception, CancelledError)  # reported as the stall
            return
        if isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)

    watch = LoopingCall(check)
    watch.clock = clock
    watch.start(min(seconds / 4, 1.0), now=False)
    inner.addBoth(done)
    return await outer


def watchStream(
    connection: Any,
    device: str,
    sender: Any,
    during: str,
    work: Deferred[T] | Coroutine[Any, Any, T],
) -> Deferred[T]:
    """
    L{watchProgress} of ``device``'s stream ``sender`` to the target of
    ``connection`` (a L{xenmig.source.connection.TargetConnection}), within its
    ``timeouts.stall``; the stall names the device, ``during`` (the phase) and
    the target.
    """
    from xenmig.model import hostPort

    seconds = connection.timeouts.stall

    def stalled() -> StreamStalled:
        where = hostPort(connection.host, connection.port)
        reopening = getattr(sender, "reopening", None)
        return StreamStalled(
            f"device {device}: no progress for {seconds:g} s during {during}"
            f" (stream to target {where}"
            + (f"; it was being opened again: {reopening}" if reopening else "")
            + ")"
        )

    return ensureDeferred(
        watchProgress(
            connection.reactor, seconds, lambda: streamProgress(sender), stalled, work
        )
    )


def watchControl(
    connection: Any,
    control: Any,
    migrationId: str,
    waitingFor: str,
    work: Deferred[T] | Coroutine[Any, Any, T],
) -> Deferred[T]:
    """
    Await ``work`` (an answer on the control connection ``control`` that may
    take long: a device's verification) while the connection is checked: every
    half ``timeouts.stall``, a QueryMigration that must be answered within
    ``timeouts.stall``.  One that is not means the control connection makes no
    progress: ``work`` is cancelled and L{StreamStalled} raised naming
    ``waitingFor`` and the target.  Other answers, errors included, are
    progress (``work`` reports the migration's own failures).
    """
    from xenmig.amp_commands import QueryMigration
    from xenmig.errors import PhaseTimeout
    from xenmig.model import hostPort

    seconds = connection.timeouts.stall
    inner: Deferred[T] = ensureDeferred(work)
    if seconds <= 0:
        return inner
    outer: Deferred[T] = Deferred(lambda _: inner.cancel())
    pending: list[Deferred[Any]] = []

    def answered(result: Any) -> None:
        pending.clear()
        if isinstance(result, Failure) and result.check(PhaseTimeout):
            stalled()

    def stalled() -> None:
        if outer.called:
            return
        where = hostPort(connection.host, connection.port)
        outer.errback(
            Failure(
                StreamStalled(
                    f"no progress on the control connection for {seconds:g} s"
                    f" while waiting for {waitingFor} (control connection to"
                    f" target {where})"
                )
            )
        )
        inner.cancel()

    def beat() -> None:
        if pending or outer.called:
            return
        call = ensureDeferred(
            connection.callWithin(
                seconds, "a check of the control connection", control,
                QueryMigration, migration_id=migrationId,
            )
        )  # fmt: skip
        pending.append(call)
        call.addBoth(answered)

    def done(result: Any) -> Any:
        if heartbeat.running:
            heartbeat.stop()
        for call in list(pending):
            call.cancel()
        if outer.called:
            if isinstance(result, Failure):
                result.trap(Exception, CancelledError)  # reported as the stall
            return None
        if isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)
        return None

    heartbeat = LoopingCall(beat)
    heartbeat.clock = connection.reactor
    heartbeat.start(seconds / 2, now=False)
    inner.addBoth(done)
    return outer
