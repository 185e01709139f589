"""
The source's API for a toolstack: prepare, pre-copy, transfer, commit or abort.

A toolstack drives a migration in phases around the moment it pauses the VM::

    identity, cas = tls.loadIdentity(CERT, KEY), tls.loadAuthority(CA)
    client = MigrationClient(
        reactor, "target.example", 8002,
        tls=tls.clientOptions("target.example", identity, cas),   # control
        sslContext=bulk.sslContext(identity, cas),                 # state streams
    )
    migration = await client.prepare("vm1", [DeviceSpec.parse("file:blob:...")])
    await migration.precopy()        # VM still running (devices that can)
    ...                              # the toolstack pauses the VM
    await migration.transfer()       # final state, verified by the target
    await migration.commit()         # the VM now belongs to the target
    # or, at any point before commit: await migration.abort("why"); resume the VM
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import (
    Deferred,
    gatherResults,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from xenmig import amp_commands as commands
from xenmig.amp_commands import DEFAULT_PORT
from xenmig.errors import (
    CommitInDoubt,
    DeviceRefused,
    DigestMismatch,
    MigrationAborted,
    PhaseTimeout,
    StreamLost,
    XenmigError,
)
from xenmig.interfaces import (
    IConvergencePolicy,
    IDeviceKind,
    ISourceContext,
    ISourceDevice,
)
from xenmig.limits import withDeadline
from xenmig.model import ContentDigest, DeviceDescription, DeviceSpec, RoundResult
from xenmig.plugins import deviceKinds
from xenmig.source.streamsender import StreamSender
from xenmig.source.threadedstream import StreamEndpoint, ThreadedStreamSender

log = Logger()


@dataclass(frozen=True)
class ClientTimeouts:
    """Bounds on every wait of the source, in seconds."""

    connect: float = 30.0
    call: float = 60.0
    ready: float = 3600.0
    commit: float = 120.0
    keepalive: float = 10.0
    abort: float = 10.0


def _timeout(d: Deferred[Any], seconds: float, clock: Any, what: str) -> Deferred[Any]:
    """Bound ``d``; on expiry it fails with PhaseTimeout naming ``what``."""
    return withDeadline(
        d, seconds, clock, f"{what} did not finish within {seconds:g} s"
    )


@implementer(ISourceContext)
class SourceContext:
    """What a source device gets from the framework."""

    def __init__(
        self, migration: SourceMigration | None, reactor: Any, name: str
    ) -> None:
        self.reactor = reactor
        self.migration = migration
        self.name = name

    @property
    def migrationId(self) -> str:
        return self.migration.migrationId if self.migration else ""

    @property
    def domain(self) -> str:
        return self.migration.domain if self.migration else ""

    def runInThread(self, function: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), function, *args, **kw
        )

    def callPeer(self, method: str, payload: dict[str, Any]) -> Deferred[dict]:
        if self.migration is None:
            raise MigrationAborted("the device has not been accepted by a target")
        return self.migration.callPeer(self.name, method, payload)


class _SwitchFactory(ClientFactory):
    """Hands the raw StreamSender to AMP's protocol switch."""

    def __init__(self, sender: StreamSender) -> None:
        self.sender = sender

    def buildProtocol(self, addr: Any) -> StreamSender:
        return self.sender


class MigrationClient:
    """
    Connects to a target daemon and opens migrations.

    @param tls: client TLS options (L{xenmig.tls.clientOptions}), or None for the
        development plaintext mode (loopback only).
    @param sslContext: the same TLS settings as an C{ssl.SSLContext}
        (L{xenmig.source.threadedstream.sslContext}): state streams are then
        sent from threads (L{xenmig.source.threadedstream}), several times
        faster than through the reactor.  Without it, streams go through
        Twisted's TLS, unless in plaintext mode.
    @param serverName: the name the daemon's certificate must carry (default:
        C{host}), for the threaded streams.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int = DEFAULT_PORT,
        tls: Any = None,
        timeouts: ClientTimeouts | None = None,
        kinds: dict[str, IDeviceKind] | None = None,
        sslContext: ssl.SSLContext | None = None,
        serverName: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.tls = tls
        self.timeouts = timeouts or ClientTimeouts()
        self.kinds = kinds if kinds is not None else deviceKinds()
        self.streamEndpoint: StreamEndpoint | None = None
        if sslContext is not None or tls is None:
            self.streamEndpoint = StreamEndpoint(
                host, port, sslContext, serverName or host, self.timeouts.connect
            )

    def endpoint(self) -> IStreamClientEndpoint:
        tcp = TCP4ClientEndpoint(
            self.reactor, self.host, self.port, timeout=self.timeouts.connect
        )
        return wrapClientTLS(self.tls, tcp) if self.tls is not None else tcp

    async def connect(self) -> amp.AMP:
        """A new control connection (the TLS handshake is part of the bound)."""
        d = self.endpoint().connect(Factory.forProtocol(amp.AMP))
        protocol = await _timeout(d, self.timeouts.connect, self.reactor, "connecting")
        if hasattr(protocol.transport, "setTcpNoDelay"):
            protocol.transport.setTcpNoDelay(True)  # small boxes: no delayed ACKs
        return protocol

    async def call(self, protocol: amp.AMP, command: type, **kw: Any) -> dict[str, Any]:
        """One AMP call, bounded by the call time-out."""
        d = protocol.callRemote(command, **kw)
        name = getattr(command, "commandName", b"command").decode()
        return await _timeout(d, self.timeouts.call, self.reactor, name)

    async def query(self, migrationId: str) -> dict[str, Any]:
        """The target's status of a migration, on a fresh connection."""
        protocol = await self.connect()
        try:
            answer = await self.call(
                protocol, commands.QueryMigration, migration_id=migrationId
            )
            return answer["status"]
        finally:
            _hangUp(protocol)

    async def listMigrations(self, limit: int = 50) -> list[dict[str, Any]]:
        """The target's most recent migrations."""
        protocol = await self.connect()
        try:
            answer = await self.call(protocol, commands.ListMigrations, limit=limit)
            return answer["migrations"]
        finally:
            _hangUp(protocol)

    async def abortMigration(self, migrationId: str, reason: str) -> str:
        """Abort a migration on the target by id; its phase afterwards."""
        protocol = await self.connect()
        try:
            answer = await self.call(
                protocol, commands.Abort, migration_id=migrationId, reason=reason
            )
            return answer["phase"]
        finally:
            _hangUp(protocol)

    async def prepare(
        self,
        domain: str,
        specs: Sequence[DeviceSpec],
        migrationId: str | None = None,
    ) -> SourceMigration:
        """
        Describe every device and open a session on the target (VM still running).

        @raise DeviceRefused: naming every refused device and why; nothing changed.
        """
        migration = SourceMigration(self, domain, migrationId or uuid.uuid4().hex)
        await migration.prepare(specs)
        return migration


@dataclass
class DeviceRun:
    """One device of a source migration: its handler, stream and figures."""

    spec: DeviceSpec
    device: ISourceDevice
    description: DeviceDescription | None = None
    sender: StreamSender | ThreadedStreamSender | None = None
    rounds: list[int] | None = None
    digest: ContentDigest | None = None
    started: float | None = None
    finished: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def bytesSent(self) -> int:
        return self.sender.bytesWritten if self.sender else 0


class SourceMigration:
    """One migration from the source's side, driven phase by phase."""

    def __init__(self, client: MigrationClient, domain: str, migrationId: str) -> None:
        self.client = client
        self.reactor = client.reactor
        self.domain = domain
        self.migrationId = migrationId
        self.devices: dict[str, DeviceRun] = {}
        self.phase = "NEW"
        self.reason = ""
        self.times: dict[str, float] = {}
        self.pausedAt: float | None = None
        self.control: amp.AMP | None = None

    def _mark(self, event: str) -> None:
        self.times[event] = time.monotonic()

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
            description = await run.device.describe()
            params = {**run.spec.targetParams, **description.params}
            run.description = DeviceDescription(
                description.kind,
                description.name,
                description.size,
                params,
                description.precopy,
            )
        self.control = await self.client.connect()
        try:
            await self._prepareRemote()
        except BaseException:
            _hangUp(self.control)
            self.phase = "ABORTED"
            raise
        self.phase = "PREPARED"
        self._mark("prepared")

    async def _prepareRemote(self) -> None:
        assert self.control is not None
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
        answer = await self.client.call(
            self.control,
            commands.Prepare,
            migration_id=self.migrationId,
            domain=self.domain,
            protocol_version=commands.PROTOCOL_VERSION,
            devices=devices,
        )
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
            self.client.call(
                self.control,
                commands.DeviceRequest,
                migration_id=self.migrationId,
                device=device,
                method=method,
                payload=payload,
            )
        )
        return d.addCallback(lambda answer: answer["payload"])

    # -- streams -------------------------------------------------------------------

    async def _openStream(self, run: DeviceRun) -> StreamSender | ThreadedStreamSender:
        if run.sender is not None:
            return run.sender
        assert self.control is not None
        answer = await self.client.call(
            self.control,
            commands.OpenStream,
            migration_id=self.migrationId,
            device=run.name,
        )
        keepalive = self.client.timeouts.keepalive
        endpoint = self.client.streamEndpoint
        sender: StreamSender | ThreadedStreamSender
        if endpoint is not None:
            sender = ThreadedStreamSender(self.reactor, run.name, keepalive)
            run.sender = sender  # so that an abort stops its thread
            await _timeout(
                sender.open(endpoint, answer["token"]),
                self.client.timeouts.connect,
                self.reactor,
                f"opening the stream of {run.name}",
            )
        else:
            sender = StreamSender(run.name, self.reactor, keepalive)
            protocol = await self.client.connect()
            await self.client.call(
                protocol,
                commands.StartStream,
                token=answer["token"],
                _protoToSwitchToFactory=_SwitchFactory(sender),
            )
            await sender.opened
            run.sender = sender
        run.started = time.monotonic()
        return sender

    # -- pre-copy ------------------------------------------------------------------

    async def precopy(
        self, policy: IConvergencePolicy | None = None
    ) -> dict[str, list[int]]:
        """
        Send pre-copy rounds for every device that can, while the VM runs, until
        ``policy`` says stop.  Returns the bytes sent per round, per device.
        """
        self._require("PREPARED")
        self._mark("precopy")
        self.phase = "PRECOPY"
        from xenmig.source.convergence import ConvergencePolicy

        policy = policy or ConvergencePolicy()
        runs = [r for r in self.devices.values() if r.device.precopy]
        await self._allOrAbort([self._precopy(r, _fresh(policy)) for r in runs])
        self.phase = "PRECOPIED"
        self._mark("precopied")
        return {r.name: list(r.rounds or []) for r in runs}

    async def _precopy(self, run: DeviceRun, policy: IConvergencePolicy) -> None:
        sender = await self._openStream(run)
        run.rounds = []
        round = 0
        while True:
            await sender.writeRound(round, False)
            before = sender.bytesWritten
            result: RoundResult = await run.device.sendRound(sender, round)
            run.rounds.append(sender.dataBytes if round == 0 else result.bytesSent)
            log.info(
                "migration {migration_id}: {device} round {round} sent {sent} bytes",
                migration_id=self.migrationId,
                device=run.name,
                round=round,
                sent=sender.bytesWritten - before,
            )
            if not policy.proceed(round, result):
                return
            round += 1

    # -- the paused part -------------------------------------------------------------

    def paused(self) -> None:
        """Note that the toolstack has just paused the VM (for the report)."""
        self.pausedAt = time.monotonic()

    async def transfer(self) -> dict[str, ContentDigest]:
        """
        With the VM paused: send every device's final state in parallel and wait
        until the target has verified each; the digests, by device.

        @raise DigestMismatch, MigrationAborted, ...: the session is then aborted
            and the source devices rolled back; the VM may be resumed.
        """
        if self.phase not in ("PREPARED", "PRECOPIED"):
            self._require("PREPARED")
        if self.pausedAt is None:
            self.paused()
        self._mark("transfer")
        self.phase = "TRANSFER"
        await self._allOrAbort([self._transfer(run) for run in self.devices.values()])
        self.phase = "READY"
        self._mark("ready")
        return {name: run.digest for name, run in self.devices.items() if run.digest}

    async def _transfer(self, run: DeviceRun) -> None:
        sender = await self._openStream(run)
        await sender.writeRound(len(run.rounds or []), True)
        digest = await run.device.sendFinal(sender)
        await sender.finish(digest)
        assert self.control is not None
        answer = await _timeout(
            self.control.callRemote(
                commands.DeviceReady, migration_id=self.migrationId, device=run.name
            ),
            self.client.timeouts.ready,
            self.reactor,
            f"verification of device {run.name}",
        )
        theirs = ContentDigest(answer["size"], answer["algorithm"], answer["digest"])
        if theirs != digest:
            raise DigestMismatch(
                f"device {run.name}: the target verified {theirs.hex} "
                f"({theirs.size} bytes), the source sent {digest.hex} ({digest.size})"
            )
        run.digest = digest
        run.finished = time.monotonic()

    async def commit(self) -> list[str]:
        """
        The point of no return: the target installs and releases the VM; then the
        source devices are released.  What the target installed.

        @raise CommitInDoubt: if the answer never came and the target cannot be
            asked: do NOT resume the VM on the source before knowing.
        """
        self._require("READY")
        self._mark("commit")
        assert self.control is not None
        try:
            answer = await _timeout(
                self.control.callRemote(commands.Commit, migration_id=self.migrationId),
                self.client.timeouts.commit,
                self.reactor,
                "commit",
            )
            installed = answer["installed"]
        except (MigrationAborted, XenmigError) as e:
            if isinstance(e, PhaseTimeout):
                installed = await self._resolveDoubt(e)
            else:
                await self._failed(e)
                raise
        except Exception as e:
            installed = await self._resolveDoubt(e)
        self.phase = "COMMITTED"
        self._mark("committed")
        self.installed = installed
        await self._release()
        return installed

    async def _resolveDoubt(self, error: BaseException) -> list[str]:
        try:
            status = await self.client.query(self.migrationId)
        except Exception as e:
            self.phase = "IN-DOUBT"
            raise CommitInDoubt(
                f"migration {self.migrationId}: the commit was sent but no answer came "
                f"({error}) and the target cannot be asked ({e}); the VM may run on "
                f"the target: ask with 'xenmig status {self.migrationId}' before "
                f"resuming it here"
            )
        if status["phase"] == "COMMITTED":
            return list(status.get("installed", []))
        if status["phase"] == "ABORTED":
            await self._failed(MigrationAborted(status.get("reason", "")))
            raise MigrationAborted(
                f"migration {self.migrationId} was aborted on the target: "
                f"{status.get('reason', '')}"
            )
        self.phase = "IN-DOUBT"
        raise CommitInDoubt(
            f"migration {self.migrationId} is {status['phase']} on the target after "
            f"the commit was sent; ask again with 'xenmig status {self.migrationId}'"
        )

    async def _release(self) -> None:
        if self.control is not None:
            _hangUp(self.control)
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
        if self.phase in ("COMMITTED", "IN-DOUBT"):
            raise CommitInDoubt(
                f"migration {self.migrationId} is {self.phase}; it cannot be aborted"
            )
        await self._failed(MigrationAborted(reason))

    async def _allOrAbort(self, steps: list[Any]) -> None:
        """
        Run every device's step in parallel; on the first failure abort the
        migration and raise (the target's own reason, if a stream broke).
        """
        try:
            await _gather(steps)
        except BaseException as e:
            reason = await self._targetReason(e)
            await self._failed(reason or e)
            if reason is not None:
                raise reason from e
            raise

    async def _targetReason(self, error: BaseException) -> MigrationAborted | None:
        """
        When a stream broke, the target usually aborted first (no space, a bad
        record): ask it, so the error names its reason, not "connection reset".
        """
        if not isinstance(error, StreamLost) or self.control is None:
            return None
        try:
            answer = await _timeout(
                self.control.callRemote(
                    commands.QueryMigration, migration_id=self.migrationId
                ),
                self.client.timeouts.abort,
                self.reactor,
                "query",
            )
        except Exception:
            return None
        status = answer["status"]
        if status.get("phase") != "ABORTED" or not status.get("reason"):
            return None
        self.reason = f"the target aborted: {status['reason']}"
        return MigrationAborted(f"migration {self.migrationId}: {self.reason}")

    async def _failed(self, error: BaseException) -> None:
        if self.phase == "ABORTED":
            return
        self.phase = "ABORTED"
        self.reason = self.reason or str(error) or repr(error)
        # Abort first, so the target records this reason, not "stream cut off".
        if self.control is not None:
            try:
                await _timeout(
                    self.control.callRemote(
                        commands.Abort,
                        migration_id=self.migrationId,
                        reason=self.reason[:2000],
                    ),
                    self.client.timeouts.abort,
                    self.reactor,
                    "abort",
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
        if self.control is not None:
            _hangUp(self.control)
        await self._everyDevice("rollback")

    def _require(self, phase: str) -> None:
        if self.phase != phase:
            raise MigrationAborted(
                f"migration {self.migrationId} is {self.phase}"
                + (f" ({self.reason})" if self.reason else "")
                + f"; this step needs {phase}"
            )

    # -- figures -----------------------------------------------------------------------

    def progress(self) -> list[tuple[str, int, int]]:
        """``(device, bytes sent, bytes expected)`` for every device."""
        return [
            (r.name, r.bytesSent, r.description.size if r.description else 0)
            for r in self.devices.values()
        ]

    def report(self) -> dict[str, Any]:
        """The JSON report: ids, per-device bytes and digests, phase durations."""

        def span(start: str, end: str) -> float | None:
            if start in self.times and end in self.times:
                return round(self.times[end] - self.times[start], 6)
            return None

        paused = None
        if self.pausedAt is not None and "committed" in self.times:
            paused = round(self.times["committed"] - self.pausedAt, 6)
        return {
            "migration_id": self.migrationId,
            "domain": self.domain,
            "phase": self.phase,
            "reason": self.reason,
            "installed": list(getattr(self, "installed", [])),
            "durations": {
                "prepare": span("prepare", "prepared"),
                "precopy": span("precopy", "precopied"),
                "transfer": span("transfer", "ready"),
                "commit": span("commit", "committed"),
                "total": span("prepare", "committed"),
            },
            "paused_window": paused,
            "devices": [
                {
                    "name": r.name,
                    "kind": r.spec.kind,
                    "bytes": r.bytesSent,
                    "data_bytes": r.sender.dataBytes if r.sender else 0,
                    "expected": r.description.size if r.description else 0,
                    "rounds": list(r.rounds or []),
                    "digest": r.digest.hex if r.digest else None,
                    "seconds": (
                        round(r.finished - r.started, 6)
                        if r.started is not None and r.finished is not None
                        else None
                    ),
                }
                for r in self.devices.values()
            ],
        }


def _fresh(policy: IConvergencePolicy) -> IConvergencePolicy:
    """A policy per device: policies may remember the rounds they have seen."""
    fresh = getattr(policy, "fresh", None)
    return fresh() if callable(fresh) else policy


def _hangUp(protocol: amp.AMP | None) -> None:
    """Close an AMP connection, unless it is gone (AMP then drops its transport)."""
    if protocol is not None and protocol.transport is not None:
        protocol.transport.loseConnection()


async def _gather(coroutines: list[Any]) -> list[Any]:
    """Run coroutines in parallel; the first failure cancels the rest and is raised."""
    deferreds = [Deferred.fromCoroutine(c) for c in coroutines]
    if not deferreds:
        return []
    try:
        return await gatherResults(deferreds, consumeErrors=True)
    except BaseException as e:
        for d in deferreds:
            d.cancel()
        inner = getattr(e, "subFailure", None)
        if inner is not None:
            inner.raiseException()
        raise
