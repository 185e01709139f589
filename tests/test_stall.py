"""
The progress time-out (stall detection) of each side on a task.Clock: the
target's StreamReceiver and the source's watchProgress.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_protocol import clock, connect, kind, prepare, target  # noqa: F401
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import StringTransport

from xenmig.errors import StreamStalled
from xenmig.records import encodeData, encodeKeepalive, encodeRound, encodeStreamHeader
from xenmig.source.stall import watchControl, watchProgress
from xenmig.streamreceiver import StreamReceiver
from xenmig.target.session import Phase


def receiver(
    target: Any,  # noqa: F811
    stall: float = 3.0,
    idle: float = 30.0,
) -> tuple[Any, Any, Any]:
    server, client, pump = connect(target)
    prepare(pump, client)
    session = target.sessions["m1"]
    session.streamStarted("dev")
    protocol = StreamReceiver(session, "dev", idleTimeout=idle, stallTimeout=stall)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, session


def test_target_stall_names_device_and_final_transfer(target, clock) -> None:  # noqa: F811
    """No byte for the stall time-out during the final transfer aborts, naming both."""
    protocol, transport, session = receiver(target)
    protocol.dataReceived(encodeStreamHeader() + b"".join(encodeRound(0, True)))
    clock.advance(2)
    protocol.dataReceived(b"".join(encodeData(0, b"abc")))
    clock.advance(2.9)
    assert session.phase is Phase.RECEIVING  # reset by the data
    clock.advance(0.2)
    assert session.phase is Phase.ABORTED
    assert "device dev: no progress for 3 s during the final transfer" in session.reason
    assert "(stream from source " in session.reason
    assert transport.disconnecting or transport.disconnected
    assert not clock.getDelayedCalls() or all(
        "stall" not in repr(c) for c in clock.getDelayedCalls()
    )


def test_target_stall_names_the_precopy_round(target, clock) -> None:  # noqa: F811
    """A stall in a pre-copy round names the round."""
    protocol, _, session = receiver(target)
    protocol.dataReceived(encodeStreamHeader() + b"".join(encodeRound(2, False)))
    clock.advance(3.1)
    assert "no progress for 3 s during pre-copy round 2" in session.reason


def test_target_keepalive_suspends_the_stall(target, clock) -> None:  # noqa: F811
    """After a KEEPALIVE (nothing to send) no progress is expected until a record."""
    protocol, _, session = receiver(target)
    protocol.dataReceived(encodeStreamHeader() + b"".join(encodeRound(0, False)))
    clock.advance(2)
    protocol.dataReceived(b"".join(encodeKeepalive()))
    clock.advance(20)  # the VM being paused: keepalives only
    protocol.dataReceived(b"".join(encodeKeepalive()))
    clock.advance(20)
    assert session.phase is Phase.RECEIVING
    protocol.dataReceived(b"".join(encodeRound(1, True)))
    clock.advance(3.1)
    assert session.phase is Phase.ABORTED
    assert "during the final transfer" in session.reason


def test_target_paused_device_suspends_the_stall(target, clock, kind) -> None:  # noqa: F811
    """While the device holds the stream, its slowness is not a stall (and
    what holds the stream is said, for a reopening that waits on it)."""
    protocol, transport, session = receiver(target)
    assert protocol.holding() == "its connection has not closed"
    kind.targets[0].hold = Deferred()
    protocol.dataReceived(encodeStreamHeader() + b"".join(encodeData(0, b"a" * 10)))
    assert transport.producerState == "paused"
    clock.advance(10)
    assert session.phase is Phase.RECEIVING
    assert protocol.holding() == "its device has not finished taking a record"
    hold, kind.targets[0].hold = kind.targets[0].hold, None
    hold.callback(None)
    clock.advance(3.1)
    assert session.phase is Phase.ABORTED
    assert "no progress for 3 s" in session.reason


def test_target_stall_off(target, clock) -> None:  # noqa: F811
    """A stall time-out of 0 never fires (the idle time-out still does)."""
    protocol, _, session = receiver(target, stall=0, idle=10)
    protocol.dataReceived(encodeStreamHeader())
    clock.advance(9)
    assert session.phase is Phase.RECEIVING
    clock.advance(2)
    assert "idle for more than 10 seconds" in session.reason


# -- the source's watch ----------------------------------------------------------------


def watch(fake: task.Clock, seconds: float, progress: list[int], work: Deferred):
    def stalled() -> StreamStalled:
        return StreamStalled(f"device d: no progress for {seconds:g} s during x")

    return Deferred.fromCoroutine(
        watchProgress(fake, seconds, lambda: progress[0], stalled, work)
    )


def test_source_watch_fails_and_cancels_work_without_progress() -> None:
    """Work whose progress stays put for the time-out is cancelled: StreamStalled."""
    fake, progress = task.Clock(), [0]
    work: Deferred[str] = Deferred()
    result = watch(fake, 2.0, progress, work)
    for _ in range(6):
        fake.advance(0.5)
        progress[0] += 1
    assert not result.called  # moving for 3 s
    for _ in range(4):
        fake.advance(0.5)
    assert not result.called  # the last change was seen at 3.5 s
    fake.advance(0.5)  # 2 s since
    failure = result.result
    assert isinstance(failure.value, StreamStalled), failure
    result.addErrback(lambda _: None)
    assert work.called  # cancelled
    work.addErrback(lambda f: f.trap(CancelledError))
    assert not fake.getDelayedCalls()


def test_source_watch_passes_the_result_on() -> None:
    """Work that ends before a stall gives its result, and the watch stops."""
    fake = task.Clock()
    work: Deferred[str] = Deferred()
    result = watch(fake, 2.0, [0], work)
    fake.advance(1.5)
    work.callback("done")
    assert result.result == "done"
    assert not fake.getDelayedCalls()


@pytest.mark.parametrize("seconds", [0.0])
def test_source_watch_off(seconds: float) -> None:
    """A time-out of 0 watches nothing."""
    fake = task.Clock()
    work: Deferred[str] = Deferred()
    result = watch(fake, seconds, [0], work)
    assert not fake.getDelayedCalls()
    fake.advance(1000)
    work.callback("late")
    assert result.result == "late"


class SilentControl:
    """A target connection whose checks are answered only when told."""

    def __init__(self, stall: float) -> None:
        from xenmig.source.connection import ClientTimeouts, bounded

        self.reactor = task.Clock()
        self.timeouts = ClientTimeouts(stall=stall)
        self.host, self.port = "2001:db8::20", 8002
        self.checks: list[Deferred[Any]] = []
        self._bounded = bounded

    async def callWithin(self, seconds: float, what: str, *a: Any, **kw: Any) -> Any:
        check: Deferred[Any] = Deferred()
        self.checks.append(check)
        return await self._bounded(check, seconds, self.reactor, what)


def test_control_watch_fails_when_checks_go_unanswered() -> None:
    """A long wait whose control connection stops answering fails: StreamStalled."""
    control = SilentControl(stall=4.0)
    work: Deferred[str] = Deferred()
    result = watchControl(control, object(), "m1", "the verification of device d", work)
    control.reactor.advance(2)  # the first check
    control.checks[-1].callback({"status": {}})
    control.reactor.advance(2)  # the second, never answered
    assert len(control.checks) == 2
    control.reactor.advance(3.9)
    assert not result.called
    control.reactor.advance(0.2)
    failure = result.result
    result.addErrback(lambda _: None)
    assert isinstance(failure.value, StreamStalled)
    assert str(failure.value) == (
        "no progress on the control connection for 4 s while waiting for the"
        " verification of device d (control connection to target [2001:db8::20]:8002)"
    )
    work.addErrback(lambda f: f.trap(CancelledError))
    assert work.called
    assert not control.reactor.getDelayedCalls()


def test_control_watch_passes_the_answer_on() -> None:
    """Answered checks let a long wait run on; its answer comes through."""
    control = SilentControl(stall=4.0)
    work: Deferred[str] = Deferred()
    result = watchControl(control, object(), "m1", "x", work)
    for _ in range(10):
        control.reactor.advance(2)
        control.checks[-1].errback(RuntimeError("an answer all the same"))
    work.callback("verified")
    assert result.result == "verified"
    assert not control.reactor.getDelayedCalls()


def test_source_waiting_out_its_bandwidth_is_progress() -> None:
    """A sender that waits out the migration's --bandwidth is not stalled."""
    from types import SimpleNamespace

    from xenmig.source.stall import streamProgress

    sender = SimpleNamespace(pacing=True, framedBytes=5, bytesWritten=5)
    assert streamProgress(sender) != streamProgress(sender)
    sender.pacing = False
    assert streamProgress(sender) == streamProgress(sender)


def test_target_bandwidth_limit_holds_the_stall(target, clock) -> None:  # noqa: F811
    """While the daemon's --max-bandwidth holds a stream, it is not stalled."""
    from xenmig.pump import MIN_BANDWIDTH, TokenBucket

    server, client, pump = connect(target)
    prepare(pump, client)
    session = target.sessions["m1"]
    session.streamStarted("dev")
    bucket = TokenBucket(MIN_BANDWIDTH, burst=1, clock=clock.seconds)
    protocol = StreamReceiver(
        session, "dev", idleTimeout=60, bandwidth=bucket, stallTimeout=3
    )
    transport = StringTransport()
    protocol.makeConnection(transport)
    bucket.take(4 * MIN_BANDWIDTH)  # others' debt: this stream waits about 4 s
    data = b"x" * 1000
    protocol.dataReceived(encodeStreamHeader() + b"".join(encodeData(0, data)))
    assert transport.producerState == "paused"
    clock.advance(3.5)  # held past the stall time-out: not a stall
    assert session.phase is Phase.RECEIVING, session.reason
    clock.advance(1)  # paid for: parsed, and progress expected from about 4 s
    assert transport.producerState == "producing"
    clock.advance(2.4)
    assert session.phase is Phase.RECEIVING, session.reason
    clock.advance(0.7)
    assert session.phase is Phase.ABORTED
    assert "no progress for 3 s" in session.reason
