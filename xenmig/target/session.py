"""TargetSession: one migration on the target, its state machine and its devices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig.errors import (
    CommitFailed,
    DigestMismatch,
    InvalidTransition,
    JournalUnavailable,
    MigrationAborted,
    PhaseTimeout,
    StreamError,
    StreamStalled,
    UnknownDevice,
    XenmigError,
)
from xenmig.interfaces import IReceivingSession, ITargetDevice
from xenmig.model import (
    ContentDigest,
    DeviceDescription,
    DeviceProgress,
    MigrationStatus,
)
from xenmig.records import EndRecord, Record, RoundRecord
from xenmig.target.phases import (
    DEVICE_TRANSITIONS,
    FINAL,
    TRANSITIONS,
    DeviceState,
    Phase,
)

__all__ = [
    "DEVICE_TRANSITIONS",
    "FINAL",
    "TRANSITIONS",
    "DeviceState",
    "Phase",
    "TargetDeviceSlot",
    "TargetSession",
]

log = Logger()


class TargetDeviceSlot:
    """One device of a target session: its handler, state and progress."""

    def __init__(
        self, device: ITargetDevice, description: DeviceDescription, clock: IReactorTime
    ) -> None:
        self.device = device
        self.description = description
        self.state = DeviceState.ACCEPTED
        #: Its logical content received: data, and holes by their length.
        self.bytesDone = 0
        #: The bytes of state data its stream delivered (holes count nothing).
        self.dataBytes = 0
        self.started: float | None = None
        self.finished: float | None = None
        self.digest: ContentDigest | None = None
        self.streaming = False
        #: Its install completed, in a commit that has not ended yet.
        self.installed = False
        #: Records its device took (END included); why its stream broke (resumable).
        self.records = 0
        self.interrupted: str | None = None
        #: Its stream, when it comes on the control connection (L{InlineStream}).
        self.inline: Any = None
        self._clock = clock
        self._ready: list[Deferred[ContentDigest]] = []

    @property
    def name(self) -> str:
        return self.description.name

    def moveTo(self, state: DeviceState) -> None:
        """Change state, or raise InvalidTransition naming the device."""
        if state not in DEVICE_TRANSITIONS[self.state]:
            raise InvalidTransition(
                f"device {self.name} cannot go from {self.state.value} to {state.value}"
            )
        self.state = state

    def progress(self) -> DeviceProgress:
        end = self.finished or self._clock.seconds()
        elapsed = end - self.started if self.started is not None else 0.0
        return DeviceProgress(
            name=self.name,
            kind=self.description.kind,
            state=self.state.value,
            bytesDone=self.bytesDone,
            bytesExpected=self.description.size,
            rate=self.bytesDone / elapsed if elapsed > 0 else 0.0,
            digest=self.digest.hex if self.digest else "",
        )

    def whenReady(self) -> Deferred[ContentDigest]:
        if self.state in (DeviceState.READY, DeviceState.COMMITTED):
            assert self.digest is not None
            return succeed(self.digest)
        d: Deferred[ContentDigest] = Deferred()
        self._ready.append(d)
        return d

    def settle(self, result: ContentDigest | Failure) -> None:
        waiters, self._ready = self._ready, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


@implementer(IReceivingSession)
class TargetSession:
    """
    One migration on the target: PREPARED -> RECEIVING -> READY ->
    COMMITTING -> COMMITTED, or ABORTED from any phase before COMMITTED.

    It does no I/O of its own: handlers do, and ``onChange`` (the journal, the
    resume gate) hears of every phase change before COMMITTING.  The commit
    is driven by L{xenmig.target.commit.SessionCommit}, which journals each
    step before the session takes it.  Each phase before COMMITTING has a
    deadline on the injected clock; expiry aborts the session with a reason
    naming the phase.
    """

    def __init__(
        self,
        migrationId: str,
        domain: str,
        peer: str,
        slots: list[TargetDeviceSlot],
        clock: IReactorTime,
        deadlines: dict[Phase, float],
        onChange: Callable[[TargetSession], Deferred[None] | None] = lambda s: None,
    ) -> None:
        self.migrationId = migrationId
        self.domain = domain
        self.peer = peer
        self.devices = {slot.name: slot for slot in slots}
        self.phase = Phase.PREPARED
        self.reason = ""
        self.installed: list[str] = []
        self.clock = clock
        self.started = self.updated = clock.seconds()
        #: When it entered each phase it went through, in order (clock time).
        self.entered: dict[Phase, float] = {Phase.PREPARED: self.started}
        #: When the first record of a final round arrived: the VM is paused.
        self.finalRoundAt: float | None = None
        self._deadlines = deadlines
        self._timer: IDelayedCall | None = None
        self._onChange = onChange
        self._aborting: Deferred[None] | None = None
        self._errorType: type[XenmigError] = MigrationAborted
        #: Told of each broken stream, if resumable (it then waits to be reopened).
        self.onInterrupted: Callable[[TargetSession, str, str], None] | None = None
        self._armDeadline()

    # -- the machine ---------------------------------------------------------------

    def _moveTo(self, phase: Phase) -> Deferred[None]:
        self._enter(phase)
        return self._persist()

    def _enter(self, phase: Phase) -> None:
        """Change phase in memory (the journal is the caller's), or raise."""
        if phase not in TRANSITIONS[self.phase]:
            raise InvalidTransition(
                f"migration {self.migrationId} cannot go from {self.phase.value} "
                f"to {phase.value}"
            )
        log.debug(  # the summary line times the phases; an abort is a warning
            "migration {migration_id}: {old} -> {new}",
            migration_id=self.migrationId,
            old=self.phase.value,
            new=phase.value,
        )
        self.phase = phase
        self.updated = self.entered[phase] = self.clock.seconds()
        self._armDeadline()

    def _persist(self) -> Deferred[None]:
        changed = self._onChange(self)
        return changed if changed is not None else succeed(None)

    def _armDeadline(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        seconds = self._deadlines.get(self.phase)
        # COMMITTING cannot abort: its bound applies to each device's commit.
        if seconds and self.phase not in FINAL and self.phase is not Phase.COMMITTING:
            self._timer = self.clock.callLater(seconds, self._expired, self.phase)

    def _expired(self, phase: Phase) -> None:
        self._timer = None
        self.abort(
            f"the {phase.value} phase did not finish within "
            f"{self._deadlines[phase]:g} seconds",
            PhaseTimeout,
        )

    def device(self, name: str) -> TargetDeviceSlot:
        """The slot of device ``name``, or UnknownDevice."""
        try:
            return self.devices[name]
        except KeyError:
            raise UnknownDevice(f"migration {self.migrationId} has no device {name!r}")

    def checkActive(self) -> None:
        """Raise MigrationAborted (or InvalidTransition) if the session is over."""
        if self.phase is Phase.ABORTED:
            raise MigrationAborted(
                f"migration {self.migrationId} was aborted: {self.reason}"
            )
        if self.phase in (Phase.COMMITTING, Phase.COMMITTED):
            raise InvalidTransition(
                f"migration {self.migrationId} is {self.phase.value}; no more changes"
            )

    # -- streams -------------------------------------------------------------------

    def streamStarted(self, name: str) -> None:
        """A stream for device ``name`` opened."""
        self.checkActive()
        slot = self.device(name)
        if slot.interrupted and slot.state is DeviceState.RECEIVING:
            slot.interrupted, slot.streaming = None, True  # resumed
            return
        if slot.streaming or slot.state is not DeviceState.ACCEPTED:
            raise StreamError(f"device {name} already had its stream")
        slot.streaming = True
        slot.moveTo(DeviceState.RECEIVING)
        slot.started = self.clock.seconds()
        if self.phase is Phase.PREPARED:
            self._moveTo(Phase.RECEIVING).addErrback(self._notJournalled)

    def recordReceived(self, name: str, record: Record) -> Deferred[None] | None:
        """Hand one record to the device; a Deferred means: pause the stream."""
        self.checkActive()
        slot = self.device(name)
        if slot.state is not DeviceState.RECEIVING:
            raise StreamError(f"device {name} is {slot.state.value}, not receiving")
        slot.records += 1
        data = getattr(record, "data", None)
        if data is not None:
            slot.bytesDone += len(data)
            slot.dataBytes += len(data)
        else:
            slot.bytesDone += getattr(record, "length", 0)
            final = isinstance(record, RoundRecord) and record.final
            if final and self.finalRoundAt is None:
                self.finalRoundAt = self.clock.seconds()
        return slot.device.receive(record)

    def streamEnded(self, name: str, end: EndRecord) -> Deferred[None]:
        """The END record arrived: verify the device and maybe the whole session."""
        self.checkActive()
        slot = self.device(name)
        slot.moveTo(DeviceState.VERIFYING)
        slot.streaming = False
        slot.records += 1
        return Deferred.fromCoroutine(self._verify(slot, end))

    async def _verify(self, slot: TargetDeviceSlot, end: EndRecord) -> None:
        try:
            digest = await slot.device.finish(end)
            expected = ContentDigest(end.size, end.algorithm, end.digest)
            if digest != expected:
                raise DigestMismatch(
                    f"device {slot.name}: the received state does not match the "
                    f"source (source {expected.hex}, {expected.size} bytes; target "
                    f"{digest.hex}, {digest.size} bytes)"
                )
        except Exception as e:
            self.deviceFailed(slot.name, e)
            return
        if self.phase is not Phase.RECEIVING:
            return
        slot.digest = digest
        slot.finished = self.clock.seconds()
        slot.moveTo(DeviceState.READY)
        slot.settle(digest)
        if all(s.state is DeviceState.READY for s in self.devices.values()):
            self._moveTo(Phase.READY).addErrback(self._notJournalled)

    def _notJournalled(self, failure: Failure) -> None:
        """A phase before the commit could not be journalled: it stays due (the
        commit writes its own record first, and a restart aborts it anyway)."""
        log.failure(
            "migration {migration_id}: {phase} is not journalled yet",
            failure,
            migration_id=self.migrationId,
            phase=self.phase.value,
        )

    def streamLost(self, name: str, why: str) -> None:
        """A device's stream ended before its END record: abort."""
        slot = self.devices.get(name)
        if slot is None or not slot.streaming or self.phase in FINAL:
            return
        slot.streaming = False
        if self.onInterrupted is not None and self.phase is not Phase.COMMITTING:
            slot.interrupted = f"the stream of device {name} {why}"
            self.onInterrupted(self, name, slot.interrupted)
            return
        self.abort(f"the stream of device {name} {why}")

    def deviceFailed(self, name: str, error: BaseException) -> None:
        """A device failed: abort the whole session with its reason."""
        if self.phase in FINAL or self.phase is Phase.COMMITTING:
            return
        if isinstance(error, StreamStalled) and self.onInterrupted is not None:
            return self.streamLost(name, f"made no progress ({error})")  # reopened
        reason = str(error) if isinstance(error, XenmigError) else repr(error)
        if name not in reason:
            reason = f"device {name}: {reason}"
        self.abort(reason, type(error) if isinstance(error, XenmigError) else None)

    def awaitReady(self, name: str) -> Deferred[ContentDigest]:
        """A Deferred firing with the device's verified digest, once READY."""
        if self.phase is Phase.ABORTED:
            return fail(self._errorType(self._abortMessage()))
        return self.device(name).whenReady()

    # -- the commit (driven by xenmig.target.commit) -------------------------------

    def beginCommit(self) -> None:
        """
        READY -> COMMITTING, in memory: from now on nothing but the commit's
        own outcome ends the session (no abort, deadline or lost connection).

        @raise MigrationAborted: if it was aborted (CommitFailed: by its commit).
        @raise InvalidTransition: unless READY (all devices verified).
        """
        if self.phase is Phase.ABORTED:
            errorType = self._errorType
            if errorType is not CommitFailed:
                errorType = MigrationAborted
            raise errorType(self._abortMessage())
        if self.phase is not Phase.READY:
            self.checkActive()
            raise InvalidTransition(
                f"migration {self.migrationId} is {self.phase.value}: commit needs "
                f"every device READY ("
                + ", ".join(f"{s.name} {s.state.value}" for s in self.devices.values())
                + ")"
            )
        self._enter(Phase.COMMITTING)

    def installedDevice(self, name: str, installed: list[str]) -> None:
        """Device ``name`` has installed its state (the session is COMMITTING)."""
        self.device(name).installed = True
        self.installed.extend(installed)

    def endCommitted(self) -> None:
        """COMMITTING -> COMMITTED, in memory: the journal says so already."""
        for slot in self.devices.values():
            slot.moveTo(DeviceState.COMMITTED)
        self._enter(Phase.COMMITTED)

    async def endCommitFailed(self, reason: str, installed: list[str]) -> None:
        """
        COMMITTING -> ABORTED, in memory: the commit did not happen.  Each device
        whose install did not complete is aborted by its handler; what an
        install left is the commit's to reverse; ``installed`` is what remains
        (loaded into a component, never released).
        """
        self.reason = reason
        self._errorType = CommitFailed
        self.installed[:] = installed
        for slot in self.devices.values():
            if slot.installed and slot.state is DeviceState.READY:
                slot.moveTo(DeviceState.ABORTED)
        await self._abortDevices()
        self._enter(Phase.ABORTED)

    def abort(
        self, reason: str, errorType: type[XenmigError] | None = None
    ) -> Deferred[None]:
        """
        Abort before commit: every device discards its staging.  Idempotent.

        @raise InvalidTransition: once committing or committed.
        """
        if self.phase is Phase.COMMITTING:
            raise InvalidTransition(
                f"migration {self.migrationId} is COMMITTING; it cannot be aborted: "
                f"the commit itself ends it COMMITTED or ABORTED (ask with "
                f"QueryMigration)"
            )
        if self.phase is Phase.COMMITTED:
            raise InvalidTransition(
                f"migration {self.migrationId} is COMMITTED; it cannot be aborted"
            )
        if self._aborting is not None:
            return self._aborting
        if self.phase is Phase.ABORTED:  # by its commit: that reason stays
            return succeed(None)
        self.reason = reason
        self._errorType = errorType or MigrationAborted
        log.warn(
            "migration {migration_id} aborted: {reason}",
            migration_id=self.migrationId,
            reason=reason,
        )
        self._aborting = Deferred.fromCoroutine(self._abort())
        return self._aborting

    async def _abort(self) -> None:
        failure = Failure(self._errorType(self._abortMessage()))
        for slot in self.devices.values():
            slot.settle(failure)
        changed = self._moveTo(Phase.ABORTED)
        await self._abortDevices()
        try:
            await changed
        except JournalUnavailable as e:
            # ABORTED stands: the journal writes it before any later record,
            # and a restart aborts an unfinished record anyway.
            log.error(
                "migration {migration_id}: ABORTED is not journalled yet: {error}",
                migration_id=self.migrationId,
                error=str(e),
            )

    async def _abortDevices(self) -> None:
        for slot in self.devices.values():
            if slot.state in (DeviceState.ABORTED, DeviceState.COMMITTED):
                continue
            slot.moveTo(DeviceState.ABORTED)
            try:
                await slot.device.abort()
            except Exception:
                log.failure(
                    "migration {migration_id}: abort of {device} failed",
                    migration_id=self.migrationId,
                    device=slot.name,
                )

    def _abortMessage(self) -> str:
        return f"migration {self.migrationId} was aborted: {self.reason}"

    # -- status --------------------------------------------------------------------

    def status(self) -> MigrationStatus:
        """A snapshot for status queries."""
        return MigrationStatus(
            migrationId=self.migrationId,
            domain=self.domain,
            phase=self.phase.value,
            peer=self.peer,
            reason=self.reason,
            started=self.started,
            updated=self.updated,
            devices=tuple(slot.progress() for slot in self.devices.values()),
            installed=tuple(self.installed),
        )
