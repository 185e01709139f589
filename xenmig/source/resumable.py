"""A device's stream that outlives its connection: records kept until taken."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import error as neterror
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig.errors import (
    PhaseTimeout,
    StreamError,
    StreamInterrupted,
    StreamLost,
    XenmigError,
)
from xenmig.interfaces import IRecordWriter
from xenmig.model import ContentDigest
from xenmig.records import (
    encodeEnd,
)
from xenmig.source.backoff import Backoff, NotConnected
from xenmig.source.framing import RecordWriting
from xenmig.source.stall import streamProgress

log = Logger()

#: How many bytes of records a stream keeps that the target has not said it
#: has: past half of it the source asks (StreamPosition), past all of it the
#: device waits for the answer.
WINDOW = 32 * 1024 * 1024
#: Seconds between asks while the target has taken nothing more.
ASK_AGAIN = 0.05


class RawStream(Protocol):
    """What a resumable stream uses of a stream sender (one connection)."""

    device: str
    onLost: Callable[[Failure], Any] | None

    def writeRecord(self, parts: list[bytes]) -> Deferred[None]: ...

    def finish(self, digest: ContentDigest) -> Deferred[None]: ...

    def abort(self) -> None: ...


#: Opens the stream (again): a new connection's sender, or None if the target
#: already has the END record; and how many records the target has taken.
Opener = Callable[[], Awaitable[tuple[RawStream | None, int]]]
#: Asks the target how many records it has taken.
Asker = Callable[[], Awaitable[int]]


@dataclass(frozen=True)
class ResumePolicy:
    """
    How often, and for how long in a row, a broken connection is tried again
    (waits from ``initial`` doubling up to ``maximum`` seconds, jittered), and
    how many bytes of records a stream keeps for the target (``window``).
    """

    attempts: int = 20
    seconds: float = 60.0
    initial: float = 0.25
    maximum: float = 5.0
    window: int = WINDOW


def retryable(error: BaseException) -> bool:
    """Whether ``error`` is the network's (try again), not the target's word."""
    if isinstance(error, StreamLost | StreamInterrupted | PhaseTimeout | NotConnected):
        return True
    if isinstance(error, XenmigError):
        return False  # the target refused: aborted, not authorized, ...
    return isinstance(
        error, OSError | neterror.ConnectError | neterror.ConnectionClosed
    )


@dataclass
class _Entry:
    number: int
    parts: list[bytes]
    size: int
    digest: ContentDigest | None = None  # the END record's


@implementer(IRecordWriter)
class ResumableStream(RecordWriting):
    """
    A device's records, written to one stream connection after another: each
    record is kept until the target says it has taken it (L{Asker}, asked
    once half the L{WINDOW} is kept), so that when the connection breaks the
    stream is opened again (L{Opener}: a new token) and the records the target
    has not taken are sent again, in order, before any new one.  The device
    writing never sees the break, only a wait.

    Records are numbered from 0 in the order written (framework records
    included, END last); the target counts those it handed to its device.
    Memory stays bounded: at most ``window`` bytes of records are kept (the
    data is referenced, not copied).  Each break is tried again within
    ``retries``, waiting a jittered back-off between attempts
    (L{xenmig.source.backoff.Backoff}); then every write fails.
    """

    def __init__(
        self,
        device: str,
        clock: IReactorTime,
        opener: Opener,
        asker: Asker,
        window: int = WINDOW,
        retries: ResumePolicy | None = None,
        notice: Callable[[str], Any] | None = None,
        stall: float = 0.0,
    ) -> None:
        self.device = device
        self.clock = clock
        self.window = window
        self.retries = retries or ResumePolicy()
        self.bytesWritten = 0
        self.dataBytes = 0
        #: Stream bytes sent again after a break, and breaks survived.
        self.resent = 0
        self.reconnections = 0
        self._open = opener
        self._ask = asker
        self._notice = notice
        self._stall = stall
        self._sender: RawStream | None = None
        self._kept: deque[_Entry] = deque()
        self._keptBytes = 0
        self._next = 0
        self._handed = 0  # records handed to a connection so far
        self._taken = 0
        self._ended = False
        self._failure: Failure | None = None
        self._recovering: list[Deferred[None]] | None = None
        self._asking: list[Deferred[None]] | None = None
        self._watch: LoopingCall | None = None
        if stall > 0:
            self._watch = LoopingCall(self._checkStall)
            self._watch.clock = clock
        self._stallSeen: tuple[int, Any] = (-1, None)
        #: What opening the stream again is doing now, if it is under way
        #: (a stall's message says it).
        self.reopening: str | None = None
        self._attempt = 0

    # -- opening ---------------------------------------------------------------------

    async def open(self) -> None:
        """Open the stream for the first time (tried again like a break)."""
        await self._recover(None)
        if self._watch is not None and not self._watch.running:
            interval = self._stallInterval
            self._watch.start(interval, now=False)

    @property
    def _stallInterval(self) -> float:
        return self._stall / 2

    def progress(self) -> tuple[Any, ...]:
        """
        What moves while the stream makes progress (a stall watch's view): its
        records written and taken, the breaks it survived, and what moves on
        its connection (L{streamProgress}).
        """
        sender = self._sender
        on = streamProgress(sender) if sender is not None else None
        return (self._next, self._taken, self.reconnections, self.resent, on)

    @property
    def unsent(self) -> int:
        """Bytes written but not yet handed to the kernel (on its connection)."""
        return int(getattr(self._sender, "unsent", 0))

    def _checkStall(self) -> None:
        """
        Every half stall time-out: if the target has not taken every record
        written, took none since the last check, and nothing moved on the
        connection either, it is stalled (a path gone silent, no reset): open
        it again.
        """
        if self._recovering is not None or self._failure is not None or self._ended:
            return
        d = Deferred.fromCoroutine(self._stallCheck())
        d.addErrback(lambda _: None)  # the next write, or DeviceReady, says

    async def _stallCheck(self) -> None:
        try:
            taken = await self._ask()
        except Exception:
            return  # the control connection's own recovery is under way
        self._forget(taken)
        sender = self._sender
        seen = (taken, streamProgress(sender) if sender is not None else None)
        moved, self._stallSeen = seen != self._stallSeen, seen
        if moved or taken >= self._next or self._recovering is not None:
            return
        self._dropSender()
        await self._recover(
            StreamLost(f"the target took no record for {self._stallInterval:g} s")
        )

    def verified(self) -> None:
        """The target verified the whole stream: keep nothing, watch no more."""
        self._ended = True
        self._forget(self._next)
        self._stopWatch()

    def _dropSender(self) -> None:
        """Give the connection up (its loss, heard later, is then not news)."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.abort()

    def _stopWatch(self) -> None:
        if self._watch is not None and self._watch.running:
            self._watch.stop()

    def abort(self) -> None:
        """Drop the stream for good (the migration aborts)."""
        self._stopWatch()
        self._failure = self._failure or Failure(
            StreamError(f"the stream of device {self.device} was aborted")
        )
        if self._sender is not None:
            self._sender.abort()

    # -- IRecordWriter ---------------------------------------------------------------

    def finish(self, digest: ContentDigest) -> Deferred[None]:
        """
        The END record; a Deferred firing once it was sent (the target's
        DeviceReady answer says whether it arrived: L{resume} if it says the
        stream broke).
        """
        parts = encodeEnd(digest.size, digest.algorithm, digest.digest)
        return self._write(parts, digest)

    async def resume(self) -> None:
        """Open the stream again now (the target says it broke)."""
        self._dropSender()
        await self._recover(StreamInterrupted("the target says the stream broke"))

    # -- keeping and sending ---------------------------------------------------------

    def _write(
        self, parts: list[bytes], digest: ContentDigest | None = None
    ) -> Deferred[None]:
        if self._failure is not None:
            return fail(self._failure)
        size = sum(len(part) for part in parts)
        entry = _Entry(self._next, parts, size, digest)
        self._next += 1
        self._kept.append(entry)
        self._keptBytes += size
        return Deferred.fromCoroutine(self._deliver(entry))

    async def _deliver(self, entry: _Entry) -> None:
        if self._recovering is None and self._sender is not None:
            try:
                await self._send(self._sender, entry)
            except StreamLost as e:
                await self._recover(e)  # kept: sent again by the recovery
        elif self._recovering is not None:
            await self._wait(self._recovering)  # the recovery sends it too
        else:
            raise StreamError(f"the stream of device {self.device} is not open")
        if self._keptBytes > self.window // 2:
            asking = self._confirm()
            while self._keptBytes > self.window:  # wait for the target to take some
                kept = self._keptBytes
                await asking
                if self._keptBytes >= kept:
                    await deferLater(self.clock, ASK_AGAIN, lambda: None)
                asking = self._confirm()
            asking.addErrback(lambda _: None)  # a later ask says

    def _send(self, sender: RawStream, entry: _Entry) -> Deferred[None]:
        self._handed = max(self._handed, entry.number + 1)
        if entry.digest is not None:
            return sender.finish(entry.digest)
        return sender.writeRecord(entry.parts)

    def _confirm(self) -> Deferred[None]:
        """Ask the target what it has taken (once at a time); forget that."""
        if self._asking is not None:
            return self._wait(self._asking)
        self._asking = []
        waiter = self._wait(self._asking)
        Deferred.fromCoroutine(self._askTarget())
        return waiter

    async def _askTarget(self) -> None:
        failure: Failure | None = None
        try:
            self._forget(await self._ask())
        except Exception:
            failure = Failure()
            log.info(
                "migration stream {device}: the target could not say what it has "
                "taken: {error}",
                device=self.device,
                error=failure.getErrorMessage(),
            )
        waiters, self._asking = self._asking or [], None
        for waiter in waiters:
            if failure is not None and self._keptBytes > self.window:
                waiter.errback(failure)
            else:
                waiter.callback(None)

    def _forget(self, taken: int) -> None:
        """The target has taken the first ``taken`` records: forget them."""
        self._taken = max(self._taken, taken)
        while self._kept and self._kept[0].number < self._taken:
            self._keptBytes -= self._kept.popleft().size

    @staticmethod
    def _wait(waiters: list[Deferred[None]]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        waiters.append(d)
        return d

    # -- breaks ---------------------------------------------------------------------

    def _lost(self, sender: RawStream, failure: Failure) -> None:
        """The connection broke while nobody wrote: open it again at once."""
        current = sender is self._sender
        if current and self._recovering is None and self._failure is None:
            d = Deferred.fromCoroutine(self._recover(failure.value))
            d.addErrback(lambda _: None)  # the next write, or DeviceReady, says

    async def _recover(self, error: BaseException | None) -> None:
        """Open the stream again and send what the target has not taken."""
        if self._recovering is not None:
            await self._wait(self._recovering)
            return
        if self._failure is not None:
            self._failure.raiseException()
        self._recovering = []
        failure: Failure | None = None
        try:
            await self._reopen(error)
        except BaseException:
            failure = self._failure = Failure()
        waiters, self._recovering = self._recovering, None
        for waiter in waiters:
            if failure is None:
                waiter.callback(None)
            else:
                waiter.errback(failure)
        if failure is not None:
            failure.raiseException()

    async def _reopen(self, error: BaseException | None) -> None:
        backoff = Backoff(self.retries.initial, self.retries.maximum)
        started = self.clock.seconds()
        attempts = 0
        self._dropSender()
        if error is not None:
            self._tell(f"the stream of {self.device} broke ({error}): opening it again")
        while True:
            attempts += 1
            try:
                await self._openAndReplay(attempts)
                if error is not None:
                    self.reconnections += 1
                return
            except BaseException as e:
                if not retryable(e):
                    raise
                delay = backoff.next()
                spent = self.clock.seconds() - started
                if attempts >= self.retries.attempts or (
                    spent + delay > self.retries.seconds
                ):
                    raise StreamLost(
                        f"the stream of device {self.device} could not be opened "
                        f"again ({attempts} attempt(s) in {spent:.0f} s): {e}"
                    ) from e
                self._tell(
                    f"the stream of {self.device} could not be opened again ({e}): "
                    f"trying again in {delay:.1f} s"
                )
                self.reopening = f"waiting {delay:.1f} s after attempt {attempts} ({e})"
                await deferLater(self.clock, delay, lambda: None)
            finally:
                self.reopening = None

    def _tell(self, line: str) -> None:
        log.info("{line}", line=line)
        if self._notice is not None:
            self._notice(line)

    def step(self, what: str) -> None:
        """Say what opening the stream (again) is doing now (L{reopening})."""
        self.reopening = f"attempt {self._attempt}: {what}"

    async def _openAndReplay(self, attempt: int = 1) -> None:
        self._attempt = attempt
        self.step("opening")
        sender, taken = await self._open()
        if taken < self._taken or (self._kept and self._kept[0].number > taken):
            since = max(self._taken, self._kept[0].number if self._kept else 0)
            raise StreamError(
                f"the stream of device {self.device} cannot go on: the target "
                f"has {taken} records, the source kept them only from record "
                f"{since} (the target had said it took them)"
            )
        self._forget(taken)
        if sender is None:  # the target has every record, END included
            self.verified()
            return
        sender.onLost = lambda failure: self._lost(sender, failure)
        handed = self._handed
        index = 0
        while index < len(self._kept):  # written meanwhile: sent too, in order
            self.step(f"sending record {index + 1} of the {len(self._kept)} kept")
            entry = self._kept[index]
            if entry.number < handed:
                self.resent += entry.size
            await self._send(sender, entry)
            index += 1
        self._sender = sender
