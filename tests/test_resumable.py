"""
The resumable stream and the target's side of resuming, without a network: what
is kept, what is sent again after a break, how often it tries, and how the
target session waits for a broken stream or control connection.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from xenmig.errors import (
    MigrationAborted,
    NotAuthorized,
    StreamError,
    StreamInterrupted,
    StreamLost,
)
from xenmig.interfaces import IRecordWriter
from xenmig.model import ContentDigest, DeviceDescription
from xenmig.records import DataRecord, EndRecord, RecordParser, encodeStreamHeader
from xenmig.source.resumable import ResumableStream, ResumePolicy
from xenmig.target.resumption import Resumption
from xenmig.target.session import DeviceState, Phase, TargetDeviceSlot, TargetSession
from xenmig.testing import MemoryTarget

DIGEST = ContentDigest(4, "blake3", bytes(32))


class FakeTarget:
    """The target's end: the records it took, in order; connections it accepted."""

    def __init__(self) -> None:
        self.taken: list[Any] = []
        self.opened = 0
        self.refuse: list[BaseException] = []

    def take(self, parts: list[bytes]) -> None:
        parser = RecordParser()
        parser.feed(encodeStreamHeader())
        self.taken.extend(parser.feed(b"".join(parts)))


class FakeSender:
    """One connection: records reach the target until it is cut."""

    def __init__(self, target: FakeTarget, device: str = "d") -> None:
        self.target = target
        self.device = device
        self.onLost: Any = None
        self.cut = False
        self.aborted = False
        self.held: list[list[bytes]] = []  # written, not yet on the wire
        self.bytesWritten = 0

    def writeRecord(self, parts: list[bytes]) -> Deferred[None]:
        if self.cut:
            return fail(StreamLost("cut"))
        self.held.append(parts)
        return succeed(None)

    def finish(self, digest: ContentDigest) -> Deferred[None]:
        from xenmig.records import encodeEnd

        return self.writeRecord(encodeEnd(digest.size, digest.algorithm, digest.digest))

    def flush(self) -> None:
        for parts in self.held:
            self.target.take(parts)
        self.held = []

    def breaks(self) -> None:
        """The connection breaks: what was held never arrives."""
        self.cut = True
        self.held = []
        if self.onLost is not None:
            self.onLost(Failure(StreamLost("cut")))

    def abort(self) -> None:
        self.aborted = True
        self.cut = True


def stream(
    target: FakeTarget, clock: Clock, window: int = 1 << 30, **policy: Any
) -> tuple[ResumableStream, list[FakeSender]]:
    senders: list[FakeSender] = []

    async def opener() -> tuple[Any, int]:
        if target.refuse:
            raise target.refuse.pop(0)
        target.opened += 1
        ended = any(isinstance(r, EndRecord) for r in target.taken)
        if ended:
            return None, len(target.taken)
        senders.append(FakeSender(target))
        return senders[-1], len(target.taken)

    async def asker() -> int:
        for sender in senders:
            sender.flush()
        return len(target.taken)

    retries = ResumePolicy(**policy)
    return ResumableStream("d", clock, opener, asker, window, retries), senders


def run(d: Any) -> Any:
    outcome: list[Any] = []
    Deferred.fromCoroutine(d).addBoth(outcome.append) if not isinstance(
        d, Deferred
    ) else d.addBoth(outcome.append)
    assert outcome, "it waited"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def data(target: FakeTarget) -> list[int]:
    return [r.offset for r in target.taken if isinstance(r, DataRecord)]


def test_a_break_sends_again_exactly_what_the_target_lacks_in_order() -> None:
    """After a break the records the target did not take are sent again, in
    order, once each, before new ones; their bytes are counted as sent again."""
    target, clock = FakeTarget(), Clock()
    writer, senders = stream(target, clock)
    assert verifyObject(IRecordWriter, writer)
    run(writer.open())
    for offset in range(3):
        run(writer.writeData(offset, b"x" * 100))
    senders[0].flush()  # the target has records 0..2
    run(writer.writeData(3, b"y" * 100))
    run(writer.writeData(4, b"z" * 100))
    senders[0].breaks()  # 3 and 4 were lost on the way
    assert len(senders) == 2 and writer.reconnections == 1
    run(writer.writeData(5, b"w" * 100))
    run(writer.finish(DIGEST))
    senders[1].flush()
    assert data(target) == [0, 1, 2, 3, 4, 5]
    assert isinstance(target.taken[-1], EndRecord)
    assert writer.resent == 2 * (16 + 8 + 100 + 4)  # two DATA frames, padded
    assert writer.bytesWritten == 600  # the content, counted once


def test_kept_records_are_forgotten_once_the_target_has_them() -> None:
    """Past half the window the stream asks the target and forgets what it took,
    so memory stays within the window."""
    target, clock = FakeTarget(), Clock()
    writer, senders = stream(target, clock, window=4096)
    run(writer.open())
    for offset in range(100):
        run(writer.writeData(offset, b"x" * 512))
        assert writer._keptBytes <= 4096 + 600
    assert len(data(target)) > 90


def test_the_target_lacking_what_was_forgotten_fails_clearly() -> None:
    """A target that says it has fewer records than the source still keeps
    fails the stream naming both counts (never a silent gap)."""
    target, clock = FakeTarget(), Clock()
    writer, senders = stream(target, clock, window=4096)
    run(writer.open())
    for offset in range(20):
        run(writer.writeData(offset, b"x" * 512))
    target.taken = target.taken[:2]  # as if it lost what it had said it took
    senders[-1].breaks()
    with pytest.raises(StreamError, match="cannot go on: the target has 2 records"):
        run(writer.writeData(99, b"x"))


def test_retries_back_off_and_are_bounded() -> None:
    """A target unreachable: the stream tries again with growing, jittered waits,
    then gives up with the count and the time, and every write fails after."""
    target, clock = FakeTarget(), Clock()
    writer, senders = stream(target, clock, attempts=4, seconds=100, maximum=2.0)
    run(writer.open())
    target.refuse = [ConnectionRefusedError("refused")] * 10
    senders[0].breaks()
    waits = []
    while clock.getDelayedCalls():
        call = clock.getDelayedCalls()[0]
        waits.append(call.getTime() - clock.seconds())
        clock.advance(waits[-1])
    assert len(waits) == 3
    assert all(0.1 <= w <= 3.0 for w in waits)
    with pytest.raises(StreamLost, match="4 attempt"):
        run(writer.writeData(0, b"x"))


def test_the_target_refusing_is_not_retried() -> None:
    """The target's own word (the session aborted) ends the stream at once."""
    target, clock = FakeTarget(), Clock()
    writer, senders = stream(target, clock)
    run(writer.open())
    target.refuse = [MigrationAborted("migration m was aborted: by the operator")]
    senders[0].breaks()
    assert not clock.getDelayedCalls()
    with pytest.raises(MigrationAborted, match="by the operator"):
        run(writer.writeData(0, b"x"))


def test_end_already_taken_sends_nothing_again() -> None:
    """Opened again after the target took END: nothing is sent, nothing opened."""
    target, clock = FakeTarget(), Clock()
    writer, senders = stream(target, clock)
    run(writer.open())
    run(writer.writeData(0, b"abcd"))
    run(writer.finish(DIGEST))
    senders[0].flush()
    run(writer.resume())
    assert len(senders) == 1 and writer.resent == 0
    assert target.opened == 2


# -- the target ---------------------------------------------------------------------


def session(clock: Clock, resumption: Resumption) -> TargetSession:
    description = DeviceDescription("memory", "d", 8)
    slot = TargetDeviceSlot(MemoryTarget(description), description, clock)
    made = TargetSession(
        "m", "vm", "source.test", [slot], clock, {Phase.RECEIVING: 1000.0}
    )
    resumption.enable(made)
    return made


class Receiver:
    """A stream receiver's connection, as the resumption cuts it."""

    def __init__(self, session: TargetSession) -> None:
        self.session = session
        self.transport = self
        self.cut = False

    def abortConnection(self) -> None:
        self.cut = True
        self.session.streamLost("d", "was cut")


def test_a_broken_stream_waits_for_the_grace_then_aborts() -> None:
    """A resumable session's broken stream leaves the device RECEIVING, fails
    DeviceReady with StreamInterrupted, and aborts only after the grace."""
    clock, resumption = Clock(), Resumption(Clock(), 5.0)
    resumption.clock = clock
    s = session(clock, resumption)
    s.streamStarted("d")
    s.recordReceived("d", DataRecord(0, b"abcd"))
    ready = s.awaitReady("d")
    errors: list[Failure] = []
    ready.addErrback(errors.append)
    s.streamLost("d", "was cut off after 40 bytes")
    assert s.phase is Phase.RECEIVING
    assert s.devices["d"].state is DeviceState.RECEIVING
    assert errors and errors[0].check(StreamInterrupted)
    clock.advance(4.9)
    assert s.phase is Phase.RECEIVING
    clock.advance(0.2)
    assert s.phase is Phase.ABORTED
    assert "was not opened again within 5 s" in s.reason


def streaming() -> tuple[Clock, Resumption, TargetSession]:
    """A resumable session whose device ``d`` has its stream open."""
    clock = Clock()
    resumption = Resumption(clock, 5.0)
    s = session(clock, resumption)
    s.streamStarted("d")
    return clock, resumption, s


def test_reopening_cuts_the_old_stream_and_answers_the_position() -> None:
    """Opening a stream that is still connected cuts it first, and answers how
    many records the device took; the new stream then goes on."""
    clock, resumption, s = streaming()
    receiver = Receiver(s)
    resumption.attached(s, "d", receiver)
    s.recordReceived("d", DataRecord(0, b"ab"))
    position, ended = run(resumption.reopen(s, "d"))
    assert receiver.cut and (position, ended) == (1, False)
    s.streamStarted("d")  # the new stream
    assert s.devices["d"].streaming and not s.devices["d"].interrupted
    assert not clock.getDelayedCalls() or all(
        c.getTime() >= 1000 for c in clock.getDelayedCalls()
    )


def test_a_stream_whose_receiver_is_gone_is_reopened_at_once() -> None:
    """
    A stream still marked streaming whose receiver nobody holds any more (its
    connection went without a word) is taken as lost when it is opened
    again, instead of waiting the settle time-out for a word that cannot
    come (each OpenStream then waited 30 s: 60 s for two, a source's stall).
    """
    clock, resumption, s = streaming()
    resumption.attached(s, "d", Receiver(s))  # held by nothing: collected
    gc.collect()
    s.recordReceived("d", DataRecord(0, b"ab"))
    position, ended = run(resumption.reopen(s, "d"))
    assert (position, ended) == (1, False)
    s.streamStarted("d")  # the new stream
    assert s.devices["d"].streaming and s.phase is Phase.RECEIVING


def test_a_stream_that_will_not_let_go_says_why() -> None:
    """The old stream's receiver still busy after the settle time-out: the
    OpenStream fails naming what it waits for."""
    from xenmig.errors import PhaseTimeout
    from xenmig.target.resumption import SETTLE_TIMEOUT

    class Busy(Receiver):
        def abortConnection(self) -> None:
            self.cut = True  # its device still takes a record: no word yet

        def holding(self) -> str:
            return "its device has not finished taking a record"

    clock, resumption, s = streaming()
    receiver = Busy(s)
    resumption.attached(s, "d", receiver)
    reopening = Deferred.fromCoroutine(resumption.reopen(s, "d"))
    clock.advance(SETTLE_TIMEOUT)
    with pytest.raises(PhaseTimeout) as caught:
        run(reopening)
    assert str(caught.value) == (
        f"the old stream of device d did not let go within {SETTLE_TIMEOUT:g} s: "
        "its device has not finished taking a record"
    )
    assert receiver.cut


def test_a_finished_streams_receiver_is_not_kept() -> None:
    """The resumption holds a stream's receiver only while something else does
    (its connection): a finished stream's buffers are not kept until the
    session ends (64 streams kept 80 MB more in the daemon before)."""
    clock, resumption, s = streaming()
    receiver = Receiver(s)
    gone = weakref.ref(receiver)
    resumption.attached(s, "d", receiver)
    del receiver
    gc.collect()
    assert gone() is None


def test_control_lost_waits_then_aborts_and_reattach_cancels() -> None:
    """The control connection lost: the session waits the grace; re-attached in
    time it goes on, otherwise it aborts naming the grace."""
    clock = Clock()
    resumption = Resumption(clock, 3.0)
    s = session(clock, resumption)
    resumption.detached(s)
    clock.advance(2.0)
    resumption.reattached(s, {"m"})
    clock.advance(5.0)
    assert s.phase is Phase.PREPARED
    resumption.detached(s)
    clock.advance(3.1)
    assert s.phase is Phase.ABORTED
    assert "not re-established within 3 s" in s.reason


def test_reattach_by_another_identity_is_refused(tmp_path: Any) -> None:
    """Only the peer that prepared a session may take it over."""
    from xenmig.target.core import MigrationTarget

    target = MigrationTarget.__new__(MigrationTarget)
    s = session(Clock(), Resumption(Clock(), 3.0))

    def lookup(migrationId: str, peer: str | None = None) -> TargetSession:
        if peer != s.peer:
            raise NotAuthorized(f"migration {migrationId} is not {peer}'s")
        return s

    target.session = lookup  # type: ignore[method-assign]
    target.resumption = Resumption(Clock(), 3.0)
    with pytest.raises(NotAuthorized):
        target.reattach("rogue.test", "m", set())
    assert target.reattach("source.test", "m", set()) == "PREPARED"


def test_the_old_connection_lost_after_reattach_means_nothing() -> None:
    """Once re-attached, the session is the new connection's: the old one (a
    half-open connection noticed late) no longer holds it, the new one does."""
    clock = Clock()
    resumption = Resumption(clock, 3.0)
    s = session(clock, resumption)
    old: set[str] = {"m"}  # the connection that prepared it
    new: set[str] = set()
    assert resumption.held("m", old)
    resumption.reattached(s, new)
    assert new == {"m"}
    assert not resumption.held("m", old)
    assert resumption.held("m", new)
    resumption.forget("m")
    assert not clock.getDelayedCalls()


def test_a_stall_while_reopening_says_which_step_waits() -> None:
    """
    A reopening that never finishes (here the target never answers with a
    new connection) leaves the stream without progress: the stall the
    migration's watch reports names the attempt and the step it waits in.
    """
    from types import SimpleNamespace

    from xenmig.errors import StreamStalled
    from xenmig.source.stall import watchStream

    target, clock = FakeTarget(), Clock()
    hanging: Deferred[tuple[Any, int]] = Deferred()
    writer, senders = stream(target, clock, initial=0.5, maximum=0.5)
    run(writer.open())
    target.refuse = [ConnectionRefusedError("refused")]
    opener = writer._open

    async def slowOpener() -> tuple[Any, int]:
        if not target.refuse:
            writer.step("asking for a token (OpenStream), then connecting")
            return await hanging
        return await opener()

    writer._open = slowOpener
    connection = SimpleNamespace(
        timeouts=SimpleNamespace(stall=10.0), host="target.test", port=8002,
        reactor=clock,
    )  # fmt: skip
    senders[0].breaks()  # the first attempt is refused, the second hangs
    assert writer.reopening is not None
    assert writer.reopening.endswith("s after attempt 1 (refused)")  # jittered
    watched = watchStream(
        connection, "d", writer, "pre-copy round 0", writer.writeData(0, b"x")
    )
    clock.pump([0.5] * 30)
    failure = watched.result
    watched.addErrback(lambda _: None)
    assert isinstance(failure.value, StreamStalled), failure
    assert str(failure.value) == (
        "device d: no progress for 10 s during pre-copy round 0 (stream to target "
        "target.test:8002; it was being opened again: attempt 2: asking for a "
        "token (OpenStream), then connecting)"
    )
