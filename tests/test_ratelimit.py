"""
The token bucket that paces streams to a bandwidth, alone and in the stream
senders and receiver that use it (fake clocks, in-memory transports).
"""

from __future__ import annotations

import heapq
import threading
import time
from typing import Any

import pytest
from test_protocol import connect, device, prepare, syncRunner
from twisted.internet import task
from twisted.internet.defer import CancelledError
from twisted.internet.testing import StringTransport
from twisted.python.filepath import FilePath

from xenmig.digest import hashBytes
from xenmig.errors import StreamLost
from xenmig.model import parseBandwidth
from xenmig.pump import MIN_BANDWIDTH, TokenBucket, paced
from xenmig.records import encodeData, encodeEnd, encodeKeepalive, encodeStreamHeader
from xenmig.source.streamsender import StreamSender
from xenmig.source.threadedstream import ThreadedStreamSender
from xenmig.streamreceiver import StreamReceiver
from xenmig.target.config import TargetConfig, Timeouts
from xenmig.target.core import MigrationTarget
from xenmig.target.session import Phase
from xenmig.testing import MemoryKind

MiB = 1024 * 1024


class FakeTime:
    """A clock for the bucket that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- the bucket ----------------------------------------------------------------------


def test_bucketPacesToItsRate() -> None:
    """A stream that waits out every take sends at the rate, after its burst."""
    now = FakeTime()
    bucket = TokenBucket(MiB, burst=MiB // 4, clock=now)
    for _ in range(20):
        now.now += bucket.take(MiB // 2)
    # 10 MiB at 1 MiB/s, the burst (1/4 MiB) sent at once.
    assert now.now == pytest.approx(10 - 0.25)


def test_bucketBurstAfterIdle() -> None:
    """After an idle spell, at most the burst goes at once, never more."""
    now = FakeTime()
    bucket = TokenBucket(MiB, burst=MiB // 2, clock=now)
    now.now = 100.0  # idle: tokens capped at the burst
    assert bucket.take(MiB // 2) == 0.0
    assert bucket.take(MiB // 2) == pytest.approx(0.5)


def share(sizes: dict[str, int], busyUntil: dict[str, float], until: float) -> dict:
    """
    Streams taking ``sizes[name]`` bytes in turn from a 1 MiB/s bucket, each
    waiting out its take before the next, stream ``name`` only while the time
    is before ``busyUntil[name]``: the bytes each sent in [0, until) and in
    [until / 2, until).
    """
    now = FakeTime()
    bucket = TokenBucket(MiB, burst=64 * 1024, clock=now)
    ready = [(0.0, name) for name in sizes]
    heapq.heapify(ready)
    sent = {name: 0 for name in sizes}
    late = {name: 0 for name in sizes}
    while ready:
        when, name = heapq.heappop(ready)
        if when >= until or when >= busyUntil[name]:
            continue
        now.now = when
        delay = bucket.take(sizes[name])
        sent[name] += sizes[name]
        if when >= until / 2:
            late[name] += sizes[name]
        heapq.heappush(ready, (when + delay, name))
    return {"sent": sent, "late": late}


def test_bucketSharesFairly() -> None:
    """Busy streams of the same record size get equal shares of the rate."""
    result = share(
        {"a": MiB // 4, "b": MiB // 4, "c": MiB // 4}, {}.fromkeys("abc", 99), 30
    )
    sent = result["sent"]
    # 30 s at the rate, the burst, and each stream's last take (not yet paid).
    assert 30 * MiB <= sum(sent.values()) <= 30 * MiB + 64 * 1024 + 3 * MiB // 4
    for count in sent.values():
        assert count == pytest.approx(10 * MiB, rel=0.03)


def test_idleStreamsShareGoesToTheOthers() -> None:
    """Once a stream has nothing to send, the others take its share."""
    result = share({"a": MiB // 4, "b": MiB // 4}, {"a": 99, "b": 10}, 40)
    # b stops at 10 s: in the last 20 s, a alone sends at the whole rate.
    assert result["late"]["a"] == pytest.approx(20 * MiB, rel=0.02)
    assert result["late"]["b"] == 0
    assert result["sent"]["b"] == pytest.approx(5 * MiB, rel=0.06)


def test_bucketIsThreadSafe() -> None:
    """Takes from many threads at once are all counted (no lost update)."""
    now = FakeTime()
    bucket = TokenBucket(MiB, burst=MiB, clock=now)
    start = threading.Barrier(8)

    def taker() -> None:
        start.wait()
        for _ in range(1000):
            bucket.take(1024)

    threads = [threading.Thread(target=taker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # 8000 KiB taken with no time passing: a debt of 8000 KiB less the burst.
    assert bucket.take(0) == pytest.approx((8000 * 1024 - MiB) / MiB)


def test_pacedWaitsOnTheReactorClock() -> None:
    """In the reactor, a take in debt is a timer; cancelling it cancels the timer."""
    clock = task.Clock()
    bucket = TokenBucket(MiB, burst=0, clock=clock.seconds)
    assert paced(bucket, 0, clock) is None
    waiter = paced(bucket, MiB // 2, clock)
    assert waiter is not None
    fired: list[object] = []
    waiter.addCallback(fired.append)
    clock.advance(0.49)
    assert fired == []
    clock.advance(0.02)
    assert fired == [None]
    other = paced(bucket, MiB, clock)
    assert other is not None
    other.addErrback(lambda f: fired.append(f.type))
    other.cancel()
    assert fired[-1] is CancelledError
    assert not clock.getDelayedCalls()


# -- parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, rate",
    [
        ("500M", 500 * MiB),
        ("1G", 1024 * MiB),
        ("64K", 64 * 1024),
        ("1.5g", 1536 * MiB),
        ("100MiB/s", 100 * MiB),
        ("20MB", 20 * MiB),
        ("1048576", MiB),
    ],
)
def test_parseBandwidth(text: str, rate: int) -> None:
    """K, M and G are powers of 1024; B, iB and /s may follow; bare is bytes/s."""
    assert parseBandwidth(text) == rate


@pytest.mark.parametrize(
    "text, message",
    [
        ("fast", "is not a number of bytes per second"),
        ("5T", "is not a number of bytes per second"),
        ("-1M", "is not a number of bytes per second"),
        ("", "is not a number of bytes per second"),
        ("0", "below the lowest accepted, 64K"),
        ("1K", "below the lowest accepted, 64K"),
    ],
)
def test_badBandwidthIsRefused(text: str, message: str) -> None:
    """A bad bandwidth is refused, quoting it and saying what is wrong."""
    with pytest.raises(ValueError) as caught:
        parseBandwidth(text)
    assert message in str(caught.value)
    assert repr(text) in str(caught.value)
    with pytest.raises(ValueError):
        TokenBucket(MIN_BANDWIDTH - 1)


# -- the senders ---------------------------------------------------------------------


def test_twistedSenderWaitsOutTheBandwidth() -> None:
    """Each write's Deferred fires only once the bucket has paid for it."""
    clock = task.Clock()
    bucket = TokenBucket(MiB, burst=0, clock=clock.seconds)
    sender = StreamSender("d", clock, keepalive=0, bandwidth=bucket)
    transport = StringTransport()
    sender.makeConnection(transport)
    written = sender.writeData(0, b"x" * (MiB // 4))
    assert not written.called
    clock.advance(0.26)
    assert written.called
    # A connection lost while a write waits fails it, and leaves no timer.
    waiting = sender.writeData(0, b"y" * MiB)
    failures: list[Any] = []
    waiting.addErrback(failures.append)
    sender.connectionLost()
    assert failures and failures[0].check(StreamLost)
    assert not clock.getDelayedCalls()


class RecordingChannel:
    """A _Channel stand-in for the sender thread: what was sent, and when."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, bytes]] = []

    def send(self, parts: list[bytes], flush: bool = True) -> None:
        if data := b"".join(parts):  # an empty send only flushes
            self.sent.append((time.monotonic(), data))


def test_threadedSenderWaitsInItsThreadWithKeepalives() -> None:
    """The sender thread waits out its debt on an event, sending KEEPALIVEs."""
    bucket = TokenBucket(MIN_BANDWIDTH, burst=0)
    sender = ThreadedStreamSender(None, "d", keepalive=0.05, bandwidth=bucket)
    channel = RecordingChannel()
    started = time.monotonic()
    sender._pace(channel, MIN_BANDWIDTH // 4)  # type: ignore[arg-type]
    waited = time.monotonic() - started
    assert 0.24 <= waited < 2.0
    keepalive = b"".join(encodeKeepalive())
    assert len(channel.sent) >= 3
    assert all(data == keepalive for _, data in channel.sent)


def test_threadedSenderAbortEndsTheWait() -> None:
    """An abort wakes a sender thread waiting for the bandwidth at once."""
    bucket = TokenBucket(MIN_BANDWIDTH, burst=0)
    sender = ThreadedStreamSender(None, "d", keepalive=30, bandwidth=bucket)
    sender._finished.addErrback(lambda _: None)
    errors: list[BaseException] = []

    def pace() -> None:
        try:
            sender._pace(RecordingChannel(), MIN_BANDWIDTH * 60)  # type: ignore[arg-type]
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=pace)
    started = time.monotonic()
    thread.start()
    time.sleep(0.05)
    sender.abort()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 5
    assert "aborted" in str(errors[0])


# -- the receiver --------------------------------------------------------------------


def limitedReceiver(tmp_path: Any, size: int = 8 * MiB) -> tuple[Any, ...]:
    """A receiver of a daemon limited to 1 MiB/s, for a memory device."""
    clock = task.Clock()
    config = TargetConfig(
        FilePath(str(tmp_path)),
        timeouts=Timeouts(idle=5, prepared=30, receiving=600, ready=60, token=10),
        maxBandwidth=MiB,
    )
    kind = MemoryKind()
    target = MigrationTarget(clock, config, {"memory": kind}, syncRunner)
    assert target.bandwidth is not None and target.bandwidth.rate == MiB
    server, client, pump = connect(target)
    prepare(pump, client, devices=[device(size=size)])
    session = target.sessions["m1"]
    session.streamStarted("dev")
    receiver = StreamReceiver(session, "dev", 5, bandwidth=target.bandwidth)
    transport = StringTransport()
    receiver.makeConnection(transport)
    return clock, kind, target, session, receiver, transport


def test_receiverPausesItsTransportWhileInDebt(tmp_path: Any) -> None:
    """A receiver of a daemon with a bandwidth holds what it read and pauses
    reading until the bucket is paid, then parses it and reads again; the idle
    time-out does not count the pause."""
    clock, kind, target, session, receiver, transport = limitedReceiver(tmp_path)
    chunk = encodeStreamHeader() + b"".join(encodeData(0, b"a" * (8 * MiB)))
    receiver.dataReceived(chunk)
    assert transport.producerState == "paused"
    [device] = kind.targets
    debt = (len(chunk) - target.bandwidth.burst) / MiB
    clock.advance(debt - 0.01)  # longer than the idle time-out: no abort
    assert transport.producerState == "paused"
    assert session.reason == ""
    assert bytes(device.data[:1]) == b"\0"  # held, not yet parsed
    clock.advance(0.02)
    assert transport.producerState == "producing"
    assert bytes(device.data) == b"a" * (8 * MiB)
    receiver.connectionLost()
    assert not [c for c in clock.getDelayedCalls() if c.func == receiver._unthrottle]


def test_receiverParsesWhatItHeldAfterTheClose(tmp_path: Any) -> None:
    """A stream closed right after its END, read in debt, still ends cleanly once
    paid for (not as cut off): the device is verified."""
    clock, kind, target, session, receiver, transport = limitedReceiver(
        tmp_path, 2 * MiB
    )
    data = b"b" * (2 * MiB)
    digest = hashBytes(data)
    receiver.dataReceived(encodeStreamHeader() + b"".join(encodeData(0, data)))
    receiver.dataReceived(
        b"".join(encodeEnd(digest.size, digest.algorithm, digest.digest))
    )
    receiver.connectionLost()
    assert session.devices["dev"].digest is None  # held: not parsed yet
    clock.advance(3)
    assert session.reason == ""
    assert session.devices["dev"].digest == digest
    assert session.phase is Phase.READY
