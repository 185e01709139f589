"""One migration from the source's side: its devices, driven phase by phase."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols import amp

from xenmig import amp_commands as commands
from xenmig.errors import (
    CommitFailed,
    CommitInDoubt,
    DeviceRefused,
    DigestMismatch,
    InvalidTransition,
    MigrationAborted,
)
from xenmig.interfaces import IConvergencePolicy
from xenmig.model import ContentDigest, DeviceSpec, RoundResult
from xenmig.pump import TokenBucket
from xenmig.source.collector import CollectorHold
from xenmig.source.commitanswer import (
    askTarget,
    installedIn,
    stillInDoubt,
    targetReason,
)
from xenmig.source.controllink import ControlLink
from xenmig.source.convergence import ConvergencePolicy, perDevice, proceed, timed
from xenmig.source.device import DeviceRun, Sender, SourceContext
from xenmig.source.inlinestream import InlineStream
from xenmig.source.pacing import Slots, commandSlots, gatherOrCancel
from xenmig.source.phase import FINAL, TRANSITIONS, Phase, leadingTo
from xenmig.source.reopening import deviceReady, openDeviceStream
from xenmig.source.report import migrationReport
from xenmig.source.stall import watchStream

if TYPE_CHECKING:
    from xenmig.source.connection import TargetConnection

log = Logger()


class SourceMigration:
    """
    One migration from the source's side, driven phase by phase (L{Phase}; the
    moves are L{TRANSITIONS}, drawn in doc/protocol.md).  It speaks to the
    target only through its connection (a L{TargetConnection}).

    @param bandwidth: the most bytes per second its streams send together
        (a L{TokenBucket} they share; None: no limit).
    @param monotonic: the clock of the report's durations.
    """

    def __init__(
        self,
        client: TargetConnection,
        domain: str,
        migrationId: str,
        monotonic: Callable[[], float] = time.monotonic,
        bandwidth: int | None = None,
    ) -> None:
        self.client = client
        self.bandwidth = bandwidth
        self._bucket = TokenBucket(bandwidth) if bandwidth else None
        #: The convergence policy pre-copy was given (for the report).
        self.policy: IConvergencePolicy | None = None
        self.reactor = client.reactor
        self.domain = domain
        self.migrationId = migrationId
        self.devices: dict[str, DeviceRun] = {}
        self.phase = Phase.NEW
        self.reason = ""
        self.installed: list[str] = []
        self.times: dict[str, float] = {}
        self.pausedAt: float | None = None
        #: The control connection, re-established if the target allows it.
        notice = getattr(client, "onRetry", None)
        self.link = ControlLink(client, migrationId, None, notice=notice)
        #: The share of the target's commands in flight this migration uses.
        self.commands = Slots(commandSlots(client.limits))
        self._preparing: Deferred[None] | None = None
        self._steps: list[Deferred[Any]] = []
        self._aborting: Deferred[None] | None = None
        self._monotonic = monotonic
        #: Keeps the garbage collector from stopping the process in the paused window.
        self.collector = CollectorHold(client.reactor)

    @property
    def control(self) -> amp.AMP | None:
        """The control connection the migration speaks on now."""
        return self.link.protocol

    @property
    def retries(self) -> int:
        """How often a step waited and tried again while the target was busy."""
        return self.client.retries[self.migrationId]

    def _mark(self, event: str) -> None:
        self.times[event] = self._monotonic()

    # -- the phase machine -------------------------------------------------------------

    def _moveTo(self, phase: Phase) -> None:
        """Change phase, or raise InvalidTransition if the table has no such move."""
        if phase not in TRANSITIONS[self.phase]:
            raise InvalidTransition(
                f"migration {self.migrationId} cannot go from {self.phase.value} "
                f"to {phase.value}"
            )
        log.debug(
            "migration {migration_id}: {old} -> {new}",
            migration_id=self.migrationId,
            old=self.phase.value,
            new=phase.value,
        )
        self.phase = phase
        if phase in (Phase.ABORTED, Phase.IN_DOUBT):
            self._mark("ended")  # a committed migration's end is its "committed"
        if phase in FINAL:
            self.collector.release()  # the paused window is over

    def _require(self, step: Phase) -> None:
        """
        Refuse a step that moves to ``step`` unless the phase leads there.

        @raise MigrationAborted: naming the phase, its reason and what is needed.
        """
        if step not in TRANSITIONS[self.phase]:
            needed = " or ".join(p.value for p in leadingTo(step))
            raise MigrationAborted(
                f"migration {self.migrationId} is {self.phase.value}"
                + (f" ({self.reason})" if self.reason else "")
                + f"; this step needs {needed}"
            )

    # -- prepare -------------------------------------------------------------------

    async def prepare(self, specs: Sequence[DeviceSpec]) -> None:
        self._mark("prepare")
        for spec in specs:
            kind = self.client.kinds.get(spec.kind)
            if kind is None:
                known = ", ".join(sorted(self.client.kinds)) or "none"
                raise DeviceRefused(
                    f"device {spec.name}: no handler for kind {spec.kind!r} on this "
                    f"host (known: {known})"
                )
            if spec.name in self.devices:
                raise DeviceRefused(f"device {spec.name} is given twice")
            context = SourceContext(self, self.reactor, spec.name)
            self.devices[spec.name] = DeviceRun(spec, kind.source(spec, context))
        for run in self.devices.values():
            described = await run.device.describe()
            run.description = described.withTargetParams(run.spec)
        self._preparing = Deferred.fromCoroutine(self._prepareRemote())
        try:
            await self._preparing  # an abort meanwhile cancels it
        except BaseException:
            self.link.close()
            if self.phase is not Phase.ABORTED:
                self._moveTo(Phase.ABORTED)
            raise
        self._moveTo(Phase.PREPARED)
        self._mark("prepared")

    async def _prepareRemote(self) -> None:
        devices = [
            {
                "kind": r.description.kind,
                "name": r.description.name,
                "size": r.description.size,
                "precopy": r.description.precopy,
                "params": r.description.params,
            }
            for r in self.devices.values()
            if r.description is not None
        ]
        resume = getattr(self.client, "resume", False)
        control, answer = await self.client.prepareRemote(
            migration_id=self.migrationId,
            domain=self.domain,
            protocol_version=commands.PROTOCOL_VERSION,
            devices=devices,
            **({"resume": True} if resume else {}),
        )
        self.link.granted(answer)
        self.link.hold(control)
        self.commands.resize(commandSlots(self.client.limits))
        refused = [o for o in answer["offers"] if not o["accepted"]]
        if refused:
            self.reason = "; ".join(o["reason"] for o in refused)
            raise DeviceRefused(f"the target refused: {self.reason}")
        for offer in answer["offers"]:
            self.devices[offer["name"]].device.accepted(offer["params"])

    def callPeer(self, device: str, method: str, payload: dict) -> Deferred[dict]:
        """A handler-scoped request to the target device of the same name."""
        if self.control is None:
            raise MigrationAborted("not connected")
        d = Deferred.fromCoroutine(
            self.client.pacedCall(
                self.commands,
                self.client.timeouts.call,
                f"the request {method} of {device}",
                self.control,
                commands.DeviceRequest,
                migration_id=self.migrationId,
                device=device,
                method=method,
                payload=payload,
            )
        )
        return d.addCallback(lambda answer: answer["payload"])

    async def _openStream(self, run: DeviceRun) -> Sender:
        if run.sender is None:
            await openDeviceStream(self, run)  # kept at once: an abort stops it
            run.started = self._monotonic()
        assert run.sender is not None
        return run.sender

    # -- pre-copy ------------------------------------------------------------------

    async def precopy(
        self, policy: IConvergencePolicy | None = None
    ) -> dict[str, list[int]]:
        """
        Send pre-copy rounds for every device that can, while the VM runs, until
        ``policy`` says stop.  Returns the bytes sent per round, per device.
        """
        self._require(Phase.PRECOPY)
        self._mark("precopy")
        self._moveTo(Phase.PRECOPY)
        policy = self.policy = policy or ConvergencePolicy()
        runs = [r for r in self.devices.values() if r.device.precopy]
        # A device whose convergence pauses the VM (QEMU's RAM) goes last.
        last = [r for r in runs if getattr(r.device, "precopyLast", False)]
        for group in ([r for r in runs if r not in last], last):
            await self._allOrAbort([self._precopy(r, perDevice(policy)) for r in group])
        self._moveTo(Phase.PRECOPIED)
        self._mark("precopied")
        return {r.name: list(r.rounds or []) for r in runs}

    async def _precopy(self, run: DeviceRun, policy: IConvergencePolicy) -> None:
        sender = await self._openStream(run)
        run.rounds, run.policy, run.roundFigures = [], policy, []
        round = 0
        while True:
            started = self._monotonic()
            await sender.writeRound(round, False)
            before = sender.bytesWritten
            result: RoundResult = await watchStream(
                self.client, run.name, sender, f"pre-copy round {round}",
                run.device.sendRound(sender, round),
            )  # fmt: skip
            result = timed(result, self._monotonic() - started, sender.unsent)
            sent = result.bytesSent or (sender.dataBytes if round == 0 else 0)
            run.rounds.append(sent)
            run.roundFigures.append(dict(result.figures))
            if result.figures.get("vm_stopped"):
                self.paused()  # QEMU stopped the VM: the paused window began
            log.info(
                "migration {migration_id}: {device} round {round} sent {sent} bytes",
                migration_id=self.migrationId,
                device=run.name,
                round=round,
                sent=sender.bytesWritten - before,
            )
            where = f"migration {self.migrationId}, device {run.name}"
            if not proceed(policy, round, result, where):
                return
            round += 1

    # -- the paused part -------------------------------------------------------------

    def paused(self) -> None:
        """Note the VM's pause (for the report), unless a round saw QEMU stop it."""
        if self.pausedAt is None:
            self.pausedAt = self._monotonic()
        self.collector.hold()

    async def transfer(self) -> dict[str, ContentDigest]:
        """
        With the VM paused: send every device's final state in parallel and wait
        until the target has verified each; the digests, by device.

        @raise DigestMismatch, MigrationAborted, ...: the session is then aborted
            and the source devices rolled back; the VM may be resumed.
        """
        self._require(Phase.TRANSFER)
        if self.pausedAt is None:
            self.paused()
        self._mark("transfer")
        self._moveTo(Phase.TRANSFER)
        await self._allOrAbort([self._transfer(run) for run in self.devices.values()])
        self._moveTo(Phase.READY)
        self._mark("ready")
        return {name: run.digest for name, run in self.devices.items() if run.digest}

    async def _transfer(self, run: DeviceRun) -> None:
        sender = await self._openStream(run)
        digest = await watchStream(
            self.client, run.name, sender, "the final transfer", run.sendFinal()
        )
        log.debug(
            "migration {migration_id}: {device}: final state sent ({size} bytes)",
            migration_id=self.migrationId,
            device=run.name,
            size=digest.size,
        )
        # A small state's last StreamRecords answer may bring the verification.
        verified = sender.verified if isinstance(sender, InlineStream) else None
        answer = verified or await deviceReady(self, run)
        theirs = ContentDigest(answer["size"], answer["algorithm"], answer["digest"])
        if theirs != digest:
            raise DigestMismatch(
                f"device {run.name}: the target verified {theirs.hex} "
                f"({theirs.size} bytes), the source sent {digest.hex} ({digest.size})"
            )
        run.digest = digest
        run.finished = self._monotonic()
        log.debug(
            "migration {migration_id}: {device}: verified by the target",
            migration_id=self.migrationId,
            device=run.name,
        )

    # -- the point of no return --------------------------------------------------------

    async def commit(self) -> list[str]:
        """
        The point of no return: the target installs and releases the VM; then the
        source devices are released.  What the target installed.

        Only the target's definite word that it did not commit (L{CommitFailed},
        L{MigrationAborted}, or ABORTED when asked) rolls the source back; any
        other outcome (another error, a time-out, a lost connection) is resolved
        by asking the target (L{_resolveDoubt}), never by a guess.

        @raise CommitFailed, MigrationAborted: the target did not commit; the
            source devices are rolled back and the VM may resume here.
        @raise CommitInDoubt: the target could not say: do NOT resume the VM on
            the source before knowing.
        """
        self._require(Phase.COMMITTING)
        self._moveTo(Phase.COMMITTING)
        self._mark("commit")
        try:
            control = await self.link.current()
            self.link.closing = True  # a lost answer is asked for, never re-sent
            answer = await self.client.callWithin(
                self.client.timeouts.commit,
                "commit",
                control,
                commands.Commit,
                migration_id=self.migrationId,
            )
            installed, answered = installedIn(answer), True
        except (CommitFailed, MigrationAborted) as e:
            await self._failed(e)
            raise
        except Exception as e:
            installed, answered = await self._resolveDoubt(e), False
        self._moveTo(Phase.COMMITTED)
        self._mark("committed")
        self.installed = installed
        await self._release(answered)
        return installed

    async def _resolveDoubt(self, error: BaseException) -> list[str]:
        """
        Ask the target (on a new connection): COMMITTED, the installed list;
        ABORTED, roll back and raise MigrationAborted; else IN-DOUBT.
        """
        try:
            status = await askTarget(self.client, self.migrationId, error)
        except CommitInDoubt:
            self._moveTo(Phase.IN_DOUBT)
            raise
        if status["phase"] == "COMMITTED":
            return list(status.get("installed", []))
        if status["phase"] == "ABORTED":
            reason = status.get("reason", "")
            await self._failed(MigrationAborted(reason))
            raise MigrationAborted(
                f"migration {self.migrationId} was aborted on the target: {reason}"
            )
        self._moveTo(Phase.IN_DOUBT)
        raise stillInDoubt(self.migrationId, str(status["phase"]), error)

    async def _release(self, answered: bool) -> None:
        self.link.close(committed=answered)  # kept for the next, if answered
        await self._everyDevice("release")

    async def _everyDevice(self, step: str) -> None:
        """Run ``release`` or ``rollback`` on every device; log, never raise."""
        for run in self.devices.values():
            try:
                await getattr(run.device, step)()
            except Exception:
                log.failure(
                    "migration {migration_id}: {step} of {device} failed",
                    migration_id=self.migrationId,
                    step=step,
                    device=run.name,
                )

    # -- abort -----------------------------------------------------------------------

    async def abort(self, reason: str) -> None:
        """
        Abort before commit: tell the target (best effort) and roll back every
        source device.  Afterwards the toolstack may resume the VM here.
        """
        if self.phase in (Phase.COMMITTING, Phase.COMMITTED, Phase.IN_DOUBT):
            raise CommitInDoubt(
                f"migration {self.migrationId} is {self.phase.value}; it cannot be "
                f"aborted"
                + (": its commit decides" if self.phase is Phase.COMMITTING else "")
            )
        await self._failed(MigrationAborted(reason))

    async def _allOrAbort(self, steps: list[Any]) -> None:
        """
        Run every device's step in parallel; on the first failure abort the
        migration and raise (the target's own reason, if a stream broke).
        """
        self._steps = [Deferred.fromCoroutine(step) for step in steps]
        try:
            await gatherOrCancel(self._steps)
        except BaseException as e:
            why = await targetReason(self.link, self.client.timeouts.abort, e)
            reason = None
            if why is not None:
                self.reason = f"the target aborted: {why}"
                message = f"migration {self.migrationId}: {self.reason}"
                reason = MigrationAborted(message)
            await self._failed(reason or e)
            if reason is not None:
                raise reason from e
            raise

    async def _failed(self, error: BaseException) -> None:
        """Abort (once: a later caller waits for that abort to have ended)."""
        if self._aborting is None:
            if self.phase is Phase.ABORTED:
                return  # it ended without one (its Prepare was refused)
            self._aborting = Deferred.fromCoroutine(self._abortNow(error))
        await self._aborting

    async def _abortNow(self, error: BaseException) -> None:
        """Tell the target, drop the streams, roll back every device."""
        self._moveTo(Phase.ABORTED)
        # A Prepare, or steps, still waiting (for a busy target, say) stop now.
        for step in [self._preparing, *self._steps]:
            if step is not None and not step.called:
                step.cancel()
        self.reason = self.reason or str(error) or repr(error)
        # Abort first, so the target records this reason, not "stream cut off".
        if self.control is not None:
            try:
                await self.link.call(
                    self.client.timeouts.abort,
                    "abort",
                    commands.Abort,
                    again=True,
                    within=self.client.timeouts.abort,
                    migration_id=self.migrationId,
                    reason=self.reason[:2000],
                )
            except Exception as e:
                log.info(
                    "migration {migration_id}: the target did not take the abort "
                    "({error}); it aborts on its own when the connection drops",
                    migration_id=self.migrationId,
                    error=str(e),
                )
        for run in self.devices.values():
            if run.sender is not None:
                run.sender.abort()
        self.link.close()
        await self._everyDevice("rollback")

    # -- figures -----------------------------------------------------------------------

    def progress(self) -> list[tuple[str, int, int]]:
        """``(device, bytes sent, bytes expected)`` for every device."""
        return [
            (r.name, r.bytesSent, r.description.size if r.description else 0)
            for r in self.devices.values()
        ]

    def report(self) -> dict[str, Any]:
        """The JSON report: ids, per-device bytes and digests, phase durations."""
        return migrationReport(self)
