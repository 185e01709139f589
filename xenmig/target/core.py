"""MigrationTarget: the one object the target's protocols call, routing to its parts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from xenmig.amp_commands import PROTOCOL_VERSION
from xenmig.errors import (
    Busy,
    NotAuthorized,
    StreamInterrupted,
    UnknownDevice,
    XenmigError,
)
from xenmig.interfaces import IDeviceKind, IMigrationTarget
from xenmig.limits import ADMISSION_WAIT, bounded
from xenmig.model import DeviceOffer
from xenmig.pump import TokenBucket
from xenmig.target.admission import Admission
from xenmig.target.authz import Grant, PeerPolicy, PolicySource
from xenmig.target.commit import CommitHost, SessionCommit
from xenmig.target.config import TargetConfig, Timeouts
from xenmig.target.context import TargetContext
from xenmig.target.gate import Release, ResumeGate
from xenmig.target.history import MigrationHistory
from xenmig.target.hooks import CommitHook, HookRunner
from xenmig.target.inline import InlineTarget
from xenmig.target.journal import Journal
from xenmig.target.metrics import MigrationMetrics
from xenmig.target.migrationrecord import MigrationRecord
from xenmig.target.offers import checkVersion
from xenmig.target.prepare import Admitted, Preparation
from xenmig.target.resumption import ResumingTarget, Resumption
from xenmig.target.session import FINAL, Phase, TargetSession
from xenmig.target.staging import StagingArea
from xenmig.target.summary import MigrationSummary
from xenmig.target.tokens import StreamTokens

log = Logger()


@implementer(IMigrationTarget)
class MigrationTarget(ResumingTarget, InlineTarget):
    """
    Everything a target host knows about its migrations, behind one face: the
    AMP protocols call it with the peer's identity; it authorizes, admits,
    routes to the session, and keeps the journal, the history, the resume
    gate and the on-commit hook told.  It does no I/O itself except through
    ``runInThread``, and none at all until L{recover} (start-up) or a Prepare.
    Each migration's end (and each refused Prepare) is logged in one summary
    line and reported to ``metrics``.
    """

    def __init__(
        self,
        reactor: Any,
        config: TargetConfig,
        kinds: dict[str, IDeviceKind],
        runInThread: Callable[..., Deferred[Any]],
        runHook: HookRunner | None = None,
        policy: PolicySource | None = None,
        metrics: MigrationMetrics | None = None,
    ) -> None:
        self.reactor = reactor
        self.metrics = metrics or MigrationMetrics()
        self.clock: IReactorTime = reactor
        self.config = config
        self.kinds = kinds
        self.runInThread = runInThread
        self.policies = policy or PolicySource(None, config.roots)
        self.staging = StagingArea(config.stateDir.child("staging"), runInThread)
        self.journal = Journal(config.stateDir.child("sessions"), runInThread, reactor)
        self.history = MigrationHistory(self.journal)
        self.admission = Admission(config)
        #: What every incoming stream takes its bytes from, if limited.
        self.bandwidth = (
            TokenBucket(config.maxBandwidth, clock=reactor.seconds)
            if config.maxBandwidth
            else None
        )
        self.tokens = StreamTokens(self.clock, config.timeouts.token)
        self.resumption = Resumption(self.clock, config.timeouts.reconnect)
        self.gate = ResumeGate(self.clock, self.history.claim)
        self.commitHook = CommitHook(config.onCommit, runHook)
        self.commits: dict[str, SessionCommit] = {}
        self.commitHost = CommitHost(
            recordOf=self._recordOf,
            write=self.history.write,
            runInThread=runInThread,
            finished=self._finished,
            roots=config.roots,
            bound=config.timeouts.commit,
            hook=self.commitHook.configured,
        )
        self.preparation = Preparation(
            config,
            self.clock,
            kinds,
            self.history,
            self.admission,
            self.staging,
            lambda *args: TargetContext(self, *args),
            self._changed,
        )

    @property
    def sessions(self) -> dict[str, TargetSession]:
        """The sessions by migration id (see L{MigrationHistory})."""
        return self.history.sessions

    @property
    def stagingRoot(self) -> FilePath:
        return self.staging.root

    @property
    def timeouts(self) -> Timeouts:
        return self.config.timeouts

    def recover(self) -> None:
        """
        Blocking, at start-up: make the journal and staging directories, abort
        and clean what a previous run left (reversing an interrupted commit),
        and know what it had finished.  A commit whose ``--on-commit`` hook had
        not run to its end has it run again, once the reactor runs.
        """
        self.staging.create()
        now = self.clock.seconds()
        for record in self.journal.recoverRecords(now, self.config.roots):
            self.history.recovered(record)
            if record.committed:
                self.gate.committed(record.release(), record.claimed)
            elif record.phase is Phase.ABORTED:
                # A toolstack that names it learns at once, not after its time-out.
                self.gate.aborted(record.migrationId, record.domain, record.reason)
            if record.hookPending and self.commitHook.configured:
                self.clock.callLater(0, self._runHook, record)
        self.staging.empty()

    # -- authorization -------------------------------------------------------------

    @property
    def policy(self) -> PeerPolicy:
        """The host-pair policy in force (see L{xenmig.target.authz})."""
        return self.policies.policy

    def authorize(self, peer: str, fingerprint: str = "") -> Grant:
        """
        What ``peer`` (with that certificate fingerprint) may do; asked afresh
        for every command, so a reloaded peers file applies at once.

        @raise NotAuthorized: logged, if the peers file does not list it.
        """
        try:
            return self.policy.authorize(peer, fingerprint)
        except NotAuthorized as e:
            log.warn("refused {peer}: {reason}", peer=peer, reason=str(e))
            self.metrics.peerRefused()
            raise

    # -- prepare -------------------------------------------------------------------

    def prepare(
        self,
        peer: str,
        migrationId: str,
        domain: str,
        version: int,
        devices: list[dict[str, Any]],
        fingerprint: str = "",
    ) -> Deferred[tuple[int, list[DeviceOffer]]]:
        """Admit a Prepare at once; open a session if every device is accepted."""
        started = self.clock.seconds()
        try:
            grant = self.authorize(peer, fingerprint)
            checkVersion(version)
            admitted = self.preparation.admit(grant, migrationId, domain, devices)
        except Exception as e:
            if isinstance(e, Busy) and e.limit == "--max-sessions":
                if self.admission.canWait():
                    # The host is full: wait in line for a place (first come,
                    # first served) rather than have every source retry alone.
                    return Deferred.fromCoroutine(
                        self._prepareInLine(
                            grant, migrationId, domain, devices, started, e
                        )
                    )
            self._refused(migrationId, domain, peer, devices, _reason(e), started)
            raise
        return Deferred.fromCoroutine(self._prepare(admitted, started))

    async def _prepareInLine(
        self,
        grant: Grant,
        migrationId: str,
        domain: str,
        devices: list[dict[str, Any]],
        started: float,
        busy: Busy,
    ) -> tuple[int, list[DeviceOffer]]:
        try:
            await self.admission.waitForPlace(
                migrationId, self.clock, ADMISSION_WAIT, busy
            )
            admitted = self.preparation.admit(grant, migrationId, domain, devices)
        except Exception as e:
            self._refused(
                migrationId, domain, grant.identity, devices, _reason(e), started
            )
            raise
        return await self._prepare(admitted, started)

    async def _prepare(
        self, admitted: Admitted, started: float
    ) -> tuple[int, list[DeviceOffer]]:
        migrationId, domain = admitted.migrationId, admitted.domain
        peer = admitted.grant.identity
        offered = [{"kind": d.kind, "name": d.name} for d in admitted.descriptions]
        try:
            prepared = await self.preparation.prepare(admitted)
        except BaseException as e:
            reason = str(e) or repr(e)
            self._refused(migrationId, domain, peer, offered, reason, started)
            raise
        if prepared.refusal is not None:
            refusal = prepared.refusal
            self.history.refused(refusal)
            self.gate.aborted(migrationId, domain, refusal.reason)
            self._refused(migrationId, domain, peer, offered, refusal.reason, started)
        elif prepared.session is not None:
            self.metrics.opened(prepared.session)
            slots = prepared.session.devices.values()
            log.info(
                "migration {migration_id} of {domain} prepared from {peer}: {devices}",
                migration_id=migrationId,
                domain=domain,
                peer=admitted.grant.identity,
                devices=", ".join(f"{s.description.kind}:{s.name}" for s in slots),
            )
        return PROTOCOL_VERSION, prepared.offers

    # -- streams -------------------------------------------------------------------

    def session(self, migrationId: str, peer: str | None = None) -> TargetSession:
        """See L{MigrationHistory.session}."""
        return self.history.session(migrationId, peer)

    def openStream(
        self, peer: str, migrationId: str, device: str, fingerprint: str = ""
    ) -> bytes:
        """
        A one-time token for the stream of ``device``, bound to ``peer``; it
        replaces any earlier token of that device.
        """
        self.authorize(peer, fingerprint)
        session = self.session(migrationId, peer)
        session.checkActive()
        session.device(device)
        return self.tokens.issue(migrationId, device, peer)

    def claimToken(
        self, peer: str, token: bytes, fingerprint: str = ""
    ) -> tuple[TargetSession, str]:
        """Use a stream token: the session and the device whose stream this is."""
        self.authorize(peer, fingerprint)
        claim = self.tokens.claim(token, peer)
        session = self.session(claim.migrationId, peer)
        session.streamStarted(claim.device)
        return session, claim.device

    def chargeStream(self, migrationId: str) -> Callable[[int], None]:
        """See L{Admission.charge}."""
        return self.admission.charge(migrationId)

    # -- verification, commit, abort ------------------------------------------------

    def deviceReady(self, peer: str, migrationId: str, device: str) -> Deferred[Any]:
        """
        A Deferred firing with the device's verified ContentDigest; failing
        with StreamInterrupted while its stream waits to be opened again.
        """
        session = self.session(migrationId, peer)
        why = self.resumption.interruption(session, device)
        if why is not None and session.phase not in FINAL:
            raise StreamInterrupted(f"migration {migrationId}: {why}")
        return session.awaitReady(device)

    async def commit(self, peer: str, migrationId: str) -> list[str]:
        """
        Install everything and release the VM (see L{SessionCommit}); what was
        installed.  Idempotent: a commit asked again (its answer was lost, or
        it is still under way) answers the same.

        @raise CommitFailed: it definitely did not commit (ABORTED).
        """
        record = self.history.record(migrationId)
        if record is not None and record.committed:
            if record.peer != peer:
                raise NotAuthorized(f"migration {migrationId} is not {peer}'s")
            return list(record.installed)
        session = self.session(migrationId, peer)
        running = self.commits.get(migrationId)
        if running is None or running.session is not session:
            if session.phase is Phase.COMMITTED:
                return list(session.installed)
            running = SessionCommit(session, self.commitHost)
            running.start()
            self.commits[migrationId] = running
        return await running.result()

    async def abort(self, peer: str | None, migrationId: str, reason: str) -> str:
        """Abort a session; its phase afterwards."""
        session = self.session(migrationId, peer)
        if session.phase is not Phase.ABORTED:
            who = f"by {peer}" if peer else "locally"
            await session.abort(f"aborted {who}: {bounded(reason, 1000)}")
        return session.phase.value

    async def deviceRequest(
        self, peer: str, migrationId: str, device: str, method: str, payload: dict
    ) -> dict[str, Any]:
        """Route a handler-scoped request to the target device."""
        session = self.session(migrationId, peer)
        session.checkActive()
        handler = session.device(device).device
        if method not in handler.requestMethods:
            raise UnknownDevice(f"device {device} has no request method {method!r}")
        return await handler.handleRequest(method, payload)

    # -- what the protocols' connections mean --------------------------------------

    def hasActiveWork(self, migrationIds: Iterable[str]) -> bool:
        """Whether any of these migrations is still running (not finished)."""
        return any(
            (s := self.sessions.get(m)) is not None and s.phase not in FINAL
            for m in migrationIds
        )

    # -- status and the resume gate -------------------------------------------------

    def query(self, migrationId: str, viewer: str | None = None) -> dict[str, Any]:
        """
        The status of a migration.  With a peers file in force, a remote
        ``viewer`` sees only its own migrations.
        """
        return self.history.status(migrationId, self._restrictedTo(viewer))

    def list(self, limit: int = 50, viewer: str | None = None) -> list[dict[str, Any]]:
        """
        The most recent migrations, newest first: at most ``limit``, and no more
        than fit in one AMP answer (a remote ``viewer``: see L{query}).
        """
        return self.history.newest(limit, self._restrictedTo(viewer))

    def _restrictedTo(self, viewer: str | None) -> str | None:
        return viewer if self.policy.restricted else None

    def awaitRestored(
        self, domain: str, timeout: float, migrationId: str | None = None
    ) -> Deferred[Release]:
        """See L{ResumeGate.wait}."""
        return self.gate.wait(domain, timeout, migrationId)

    # -- a session's life ------------------------------------------------------------

    def _changed(self, session: TargetSession) -> Deferred[None]:
        """
        A phase change before the commit: journal it.  An abort ends the
        session (clean, tell the gate) even if the journal cannot record it:
        ABORTED stays due there, and a restart aborts an unfinished record.
        RECEIVING and READY recover as PREPARED does: they are only noted.
        """
        paths = self.staging.paths(session.migrationId)
        if session.phase not in FINAL:
            self.history.noted(session, paths)
            return succeed(None)
        # Its admission ends with it, whatever the journal makes of this.
        self.admission.release(session.migrationId)
        self.resumption.forget(session.migrationId)

        def finish(result: object) -> Deferred[Any]:
            return self._finished(session).addCallback(lambda _: result)

        return self.history.changed(session, paths).addBoth(finish)

    def _refused(
        self,
        migrationId: str,
        domain: str,
        peer: str,
        devices: Any,
        reason: str,
        started: float,
    ) -> None:
        """
        A Prepare opened no session: it ends REFUSED, unless its id names a
        migration this host has (a Prepare sent again: that one has its own).
        """
        record = self.history.record(migrationId)
        if (
            migrationId in self.sessions
            or self.admission.held(migrationId) is not None
            or (record is not None and not record.refused)
        ):
            return
        took = self.clock.seconds() - started
        self._ended(
            MigrationSummary.ofRefusal(migrationId, domain, peer, devices, reason, took)
        )

    def _ended(self, summary: MigrationSummary) -> None:
        """A migration is over: its summary line, and the metrics told."""
        summary.log()
        self.metrics.ended(summary)

    def _recordOf(self, session: TargetSession) -> MigrationRecord:
        return self.history.recordOf(session, self.staging.paths(session.migrationId))

    def _finished(self, session: TargetSession) -> Deferred[None]:
        """The session ended (its end is journalled or due): release, hook, clean."""
        self._ended(MigrationSummary.ofSession(session))
        self.admission.release(session.migrationId)  # idempotent; a commit ends here
        if session.phase is Phase.COMMITTED:
            # What is left in staging is nobody's now (a restart removes it
            # too): the toolstack need not wait for its removal to resume.
            self._release(session)
            return self.staging.remove(session.migrationId)
        d = self.staging.remove(session.migrationId)
        d.addCallback(lambda _: self._release(session))
        return d

    def _release(self, session: TargetSession) -> None:
        if session.phase is Phase.COMMITTED:
            record = self._recordOf(session)
            log.debug(
                "migration {migration_id}: released to the resume gate",
                migration_id=session.migrationId,
            )
            self.gate.committed(record.release())
            self._runHook(record)
        else:
            self.gate.aborted(session.migrationId, session.domain, session.reason)
        self.history.prune()
        for migrationId in [m for m in self.commits if m not in self.sessions]:
            del self.commits[migrationId]

    def _runHook(self, record: MigrationRecord) -> None:
        """Run the on-commit hook of ``record``; journal that it ran."""
        if record.hook is None:
            return
        migrationId = record.migrationId

        def ran(_: None) -> Deferred[None]:
            return self.history.hookDelivered(migrationId)

        def notJournalled(failure: Any) -> None:
            log.failure(
                "migration {migration_id}: the hook ran, but the journal could not "
                "record it: it runs again after a restart",
                failure,
                migration_id=migrationId,
            )

        hook = self.commitHook.committed(
            migrationId, record.domain, record.peer, record.installed
        )
        hook.addCallback(ran).addErrback(notJournalled)

    def closeAll(self, reason: str) -> Deferred[None]:
        """
        Abort every session that has not begun to commit, and let each commit
        under way end (daemon shutting down).
        """
        pending: list[Deferred[Any]] = [
            s.abort(reason)
            for s in self.sessions.values()
            if s.phase not in FINAL and s.phase is not Phase.COMMITTING
        ]
        pending += [
            c.result().addErrback(lambda _: None)
            for c in self.commits.values()
            if not c.ended
        ]
        return (
            gatherResults(pending).addCallback(lambda _: None)
            if pending
            else succeed(None)
        )


def _reason(error: Exception) -> str:
    """What a refusal says: a declared error's message, else the error's repr."""
    return str(error) if isinstance(error, XenmigError) else repr(error)
