"""SessionCommit: a session's commit, journalled ahead of each step, or reversed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from twisted.internet.defer import Deferred, TimeoutError, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from xenmig.errors import CommitFailed
from xenmig.interfaces import IInstallingDevice, ITargetDevice
from xenmig.target.installs import (
    Install,
    InstallState,
    Reversal,
    identityOf,
    plan,
    reverse,
)
from xenmig.target.migrationrecord import HOOK_PENDING, MigrationRecord
from xenmig.target.session import DeviceState, Phase, TargetDeviceSlot, TargetSession

log = Logger()


@dataclass(frozen=True)
class CommitHost:
    """What a commit uses of its target: the journal, threads, the session's end."""

    #: The session's record as it is now, with the journal's facts.
    recordOf: Callable[[TargetSession], MigrationRecord]
    #: Journal a record: durable, or failing with JournalUnavailable.
    write: Callable[[MigrationRecord], Deferred[None]]
    #: Run a blocking function in the I/O thread pool.
    runInThread: Callable[..., Deferred[Any]]
    #: The session has ended (committed or aborted): clean, release, tell.
    finished: Callable[[TargetSession], Deferred[None]]
    #: The allowed roots: a reversal removes nothing outside them.
    roots: tuple[FilePath, ...]
    #: Seconds each handler's C{commit} may take (0: no bound).
    bound: float = 0.0
    #: Whether an ``--on-commit`` hook is to run after each commit.
    hook: bool = False


class SessionCommit:
    """
    The commit of one READY session, write-ahead.  In the journal, in order:
    COMMITTING with every device's install INSTALLING (its destination and
    what is there now), before anything is installed; then, once every
    handler's C{commit} has returned, COMMITTED with every install INSTALLED
    (what it put there).  Two records, however many devices: the paused
    window waits for each.  Only once COMMITTED is durable does the session
    become COMMITTED and the commit answer (the VM is released after it).

    If a journal write or an install fails, what the begun installs put at
    their destinations is removed (L{xenmig.target.installs.reverse}), the
    session ends ABORTED with the reason, that is journalled, and the commit
    fails with L{CommitFailed}: it definitely did not happen.  Asked again,
    it answers the same.
    """

    def __init__(self, session: TargetSession, host: CommitHost) -> None:
        self.session = session
        self.host = host
        self.bound = host.bound
        self.installs: list[Install] = []
        self._outcome: list[str] | Failure | None = None
        self._waiters: list[Deferred[list[str]]] = []

    @property
    def ended(self) -> bool:
        return self._outcome is not None

    def start(self) -> None:
        """
        Begin (READY -> COMMITTING at once: no abort can come between).

        @raise MigrationAborted, InvalidTransition: unless the session is READY.
        """
        self.session.beginCommit()
        Deferred.fromCoroutine(self._run()).addBoth(self._settle)

    def result(self) -> Deferred[list[str]]:
        """A Deferred firing with what was installed, or failing with CommitFailed."""
        if isinstance(self._outcome, Failure):
            return fail(self._outcome)
        if self._outcome is not None:
            return succeed(list(self._outcome))
        d: Deferred[list[str]] = Deferred()
        self._waiters.append(d)
        return d

    def _settle(self, outcome: list[str] | Failure) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(list(outcome))

    # -- the steps -------------------------------------------------------------------

    async def _run(self) -> list[str]:
        try:
            return await self._commit()
        except Exception as e:
            if self.session.phase is Phase.COMMITTING:  # not ended by _fail
                log.failure(
                    "migration {migration_id}: the commit failed",
                    migration_id=self.session.migrationId,
                )
                await self._fail(f"the commit failed: {e!r}")
            raise

    async def _commit(self) -> list[str]:
        session = self.session
        slots = list(session.devices.values())
        destinations = [(slot.name, _destinationOf(slot.device)) for slot in slots]
        if any(path for _, path in destinations):
            self.installs = await self.host.runInThread(plan, destinations)
        else:  # installs into components only: no path to look at
            self.installs = plan(destinations)
        # One record ahead of every install: each may be under way from now on
        # (a reversal removes from a destination only what differs from what
        # was there before).  Their ends are recorded with COMMITTED.
        for index in range(len(self.installs)):
            self._move(index, InstallState.INSTALLING)
        try:
            await self._journal(Phase.COMMITTING)
        except Exception as e:
            await self._fail(f"the journal could not record the commit: {e}")
        for index, slot in enumerate(slots):
            await self._install(index, slot)
        try:
            await self._journal(Phase.COMMITTED)
        except Exception as e:
            await self._fail(f"the journal could not record COMMITTED: {e}")
        session.endCommitted()
        log.info(
            "migration {migration_id} committed: {installed}",
            migration_id=session.migrationId,
            installed=", ".join(session.installed),
        )
        await self._finish()
        return list(session.installed)

    async def _install(self, index: int, slot: TargetDeviceSlot) -> None:
        name = slot.name
        log.debug(
            "migration {migration_id}: installing {device}",
            migration_id=self.session.migrationId,
            device=name,
        )
        try:
            installing = maybeDeferred(slot.device.commit)
            if self.bound:
                installing.addTimeout(self.bound, self.session.clock)
            installed = await installing
        except Exception as e:
            if isinstance(e, TimeoutError):
                e = CommitFailed(f"did not finish within {self.bound:g} seconds")
            log.failure(
                "migration {migration_id}: commit of {device} failed",
                migration_id=self.session.migrationId,
                device=name,
            )
            await self._fail(f"commit of device {name} failed: {e}")
        destination = self.installs[index].destination
        after = None
        if destination is not None:
            try:
                after = await self.host.runInThread(identityOf, destination)
            except OSError:
                pass  # reversal then goes by what was there before
        self._move(index, InstallState.INSTALLED, after)
        self.session.installedDevice(name, list(installed))

    def _move(self, index: int, state: InstallState, after: Any = None) -> None:
        self.installs[index] = self.installs[index].moved(state, after)

    def _journal(self, phase: Phase) -> Deferred[None]:
        """Journal the session as in ``phase``, with its installs."""
        log.debug(
            "migration {migration_id}: journalling {phase}",
            migration_id=self.session.migrationId,
            phase=phase.value,
        )
        record = replace(
            self.host.recordOf(self.session),
            phase=phase,
            installs=tuple(self.installs),
            updated=self.session.clock.seconds(),
        )
        if phase is Phase.COMMITTED:
            committed = DeviceState.COMMITTED.value
            record = replace(
                record,
                devices=tuple(replace(d, state=committed) for d in record.devices),
                hook=HOOK_PENDING if self.host.hook else None,
            )
        return self.host.write(record)

    async def _fail(self, reason: str) -> NoReturn:
        """
        The commit did not happen: reverse the begun installs, end ABORTED,
        journal that (a failure here is logged: it stays due), and raise.

        @raise CommitFailed: always.
        """
        session = self.session
        begun = any(install.begun for install in self.installs)
        reversal = await self._reverse()
        self.installs = list(reversal.installs)
        remaining = [i for i in session.installed if i not in reversal.removed]
        if begun:
            reason += f"; the commit was reversed: {reversal.summary()}"
        if remaining:
            reason += f"; left in place, never released: {', '.join(remaining)}"
        await session.endCommitFailed(reason, remaining)
        try:
            await self.host.write(
                replace(self.host.recordOf(session), installs=tuple(self.installs))
            )
        except Exception as e:
            log.error(
                "migration {migration_id}: ABORTED is not journalled yet: {error}",
                migration_id=session.migrationId,
                error=str(e),
            )
        await self._finish()
        raise CommitFailed(
            f"migration {session.migrationId} did not commit: {reason}; the VM was "
            f"not released on the target and never will be: it may resume on the "
            f"source"
        )

    async def _reverse(self) -> Reversal:
        try:
            reversal: Reversal = await self.host.runInThread(
                reverse, self.installs, self.host.roots
            )
        except Exception as e:
            log.failure(
                "migration {migration_id}: reversing its commit failed",
                migration_id=self.session.migrationId,
            )
            return Reversal(tuple(self.installs), problems=(f"the reversal: {e}",))
        return reversal

    async def _finish(self) -> None:
        try:
            await self.host.finished(self.session)
        except Exception:
            log.failure(
                "migration {migration_id}: cleaning up after the commit failed",
                migration_id=self.session.migrationId,
            )


def _destinationOf(device: ITargetDevice) -> str | None:
    """Where ``device``'s commit puts its state on disk, if it says (and does)."""
    if not IInstallingDevice.providedBy(device):
        return None
    destination = IInstallingDevice(device).destination
    return None if destination is None else str(destination.path)
