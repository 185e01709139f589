"""The target's core: sessions, stream tokens, device contexts and the resume gate."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from xenmig.amp_commands import ACCEPTED_PROTOCOL_VERSIONS, MAX_JSON, PROTOCOL_VERSION
from xenmig.errors import (
    BadSpec,
    BadToken,
    DeviceRefused,
    DuplicateMigration,
    InvalidTransition,
    MigrationAborted,
    NotAuthorized,
    StreamError,
    UnknownDevice,
    UnknownMigration,
    VersionMismatch,
    XenmigError,
)
from xenmig.fs import removeTree
from xenmig.interfaces import IDeviceKind, ITargetDevice
from xenmig.limits import bounded
from xenmig.model import (
    DeviceDescription,
    DeviceOffer,
    checkMigrationId,
    checkName,
)
from xenmig.target.authz import Grant, PeerPolicy, PolicySource
from xenmig.target.config import TargetConfig
from xenmig.target.context import TargetContext
from xenmig.target.gate import Release, ResumeGate
from xenmig.target.journal import KEEP_FINISHED, Journal
from xenmig.target.session import FINAL, Phase, TargetDeviceSlot, TargetSession

log = Logger()

#: Finished sessions kept as live objects; older ones become journal records.
KEEP_IN_MEMORY = 32


@dataclass
class _Token:
    migrationId: str
    device: str
    peer: str
    expires: float


class MigrationTarget:
    """
    Everything a target host knows about its migrations.  The AMP protocols call
    it; it calls the handlers, the journal, and the on-commit hook.
    """

    def __init__(
        self,
        reactor: Any,
        config: TargetConfig,
        kinds: dict[str, IDeviceKind],
        runInThread: Callable[..., Deferred[Any]],
        runHook: Callable[[str, dict[str, str], str], Deferred[int]] | None = None,
        policy: PolicySource | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.config = config
        self.kinds = kinds
        self.runInThread = runInThread
        self.runHook = runHook
        self.stagingRoot = config.stateDir.child("staging")
        self.journal = Journal(config.stateDir.child("sessions"), runInThread)
        self.sessions: dict[str, TargetSession] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self._contexts: dict[str, list[TargetContext]] = {}
        self._tokens: dict[bytes, _Token] = {}
        self._received: dict[str, int] = {}
        self._budgets: dict[str, int] = {}
        self.policies = policy or PolicySource(None, config.roots)
        self.gate = ResumeGate(self.clock, self._claimed)
        self.stagingRoot.makedirs(ignoreExistingDirectory=True)
        os.chmod(self.stagingRoot.path, 0o700)

    def recover(self) -> None:
        """Blocking, at start-up: abort and clean what a previous run left."""
        for record in self.journal.recover(self.clock.seconds()):
            self.history[record["migration_id"]] = record
            if record.get("phase") == "COMMITTED":
                self.gate.committed(_release(record), bool(record.get("claimed")))
        for child in self.stagingRoot.children():
            removeTree(child.path)

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
            raise

    def _checkGrant(
        self, grant: Grant, descriptions: list[DeviceDescription], migrationId: str
    ) -> None:
        """Refuse kinds, counts and sizes beyond what the peer may send here."""
        peer = grant.identity
        for description in descriptions:
            if not grant.allowsKind(description.kind):
                allowed = ", ".join(sorted(grant.kinds or ())) or "none"
                raise NotAuthorized(
                    f"migration {migrationId}: {peer} may not migrate devices of "
                    f"kind {description.kind!r} (device {description.name}) to this "
                    f"host; its kinds are: {allowed} ({grant.entry})"
                )
        mine = [
            s for s in self.sessions.values() if s.peer == peer and s.phase not in FINAL
        ]
        if grant.maxSessions is not None and len(mine) >= grant.maxSessions:
            raise DeviceRefused(
                f"{peer} already runs {len(mine)} migration(s) here, its limit "
                f"(max-sessions of {grant.entry}); retry later"
            )
        declared = sum(_declaredBytes(d) for d in descriptions)
        if grant.maxBytes is not None and declared > grant.maxBytes:
            raise DeviceRefused(
                f"migration {migrationId}: the devices declare {declared} bytes, "
                f"more than the {grant.maxBytes} bytes {peer} may send here "
                f"(max-bytes of {grant.entry})"
            )

    def chargeStream(self, migrationId: str) -> Callable[[int], None]:
        """
        A function each stream of ``migrationId`` calls with the bytes it
        received: it raises StreamError once they pass the peer's max-bytes.
        """

        def charge(count: int) -> None:
            total = self._received.get(migrationId, 0) + count
            self._received[migrationId] = total
            budget = self._budgets.get(migrationId)
            if budget is not None and total > budget:
                raise StreamError(
                    f"migration {migrationId}: the source sent more than the "
                    f"{budget} bytes it may send here (max-bytes of the peers file)"
                )

        return charge

    # -- prepare -------------------------------------------------------------------

    async def prepare(
        self,
        peer: str,
        migrationId: str,
        domain: str,
        version: int,
        devices: list[dict[str, Any]],
        fingerprint: str = "",
    ) -> tuple[int, list[DeviceOffer]]:
        """Open a session if every device is accepted; otherwise refuse them all."""
        grant = self.authorize(peer, fingerprint)
        if version not in ACCEPTED_PROTOCOL_VERSIONS:
            raise VersionMismatch(
                f"control protocol version {version} is not supported; this host "
                f"speaks {PROTOCOL_VERSION}: upgrade the older host"
            )
        self._checkNew(migrationId, domain, devices)
        descriptions = [self._describe(d) for d in devices]
        self._checkGrant(grant, descriptions, migrationId)
        contexts = [
            TargetContext(self, migrationId, domain, peer, d.name, grant.roots)
            for d in descriptions
        ]
        self._contexts[migrationId] = contexts
        accepted: list[ITargetDevice] = []
        try:
            offers = await self._offer(descriptions, contexts, accepted)
        except BaseException:
            await self._refuse(migrationId, domain, peer, [], accepted)
            raise
        if len(accepted) < len(descriptions):
            await self._refuse(migrationId, domain, peer, offers, accepted)
            self._recordRefusal(migrationId, domain, peer, descriptions, offers)
            return PROTOCOL_VERSION, offers
        slots = [TargetDeviceSlot(dev, dev.description, self.clock) for dev in accepted]
        session = TargetSession(
            migrationId,
            domain,
            peer,
            slots,
            self.clock,
            self.config.timeouts.deadlines(),
            self._changed,
        )
        self.sessions[migrationId] = session
        if grant.maxBytes is not None:
            self._budgets[migrationId] = grant.maxBytes
        await self._changed(session)
        log.info(
            "migration {migration_id} of {domain} prepared from {peer}: {devices}",
            migration_id=migrationId,
            domain=domain,
            peer=peer,
            devices=", ".join(f"{d.kind}:{d.name}" for d in descriptions),
        )
        return PROTOCOL_VERSION, offers

    def _checkNew(self, migrationId: str, domain: str, devices: list[Any]) -> None:
        checkMigrationId(migrationId)
        checkName("domain", domain)
        refused = self.history.get(migrationId, {}).get("refused")
        if migrationId in self.sessions or (
            migrationId in self.history and not refused
        ):
            raise DuplicateMigration(f"migration {migrationId} already exists here")
        active = [s for s in self.sessions.values() if s.phase not in FINAL]
        if len(active) >= self.config.maxSessions:
            raise DeviceRefused(
                f"this host already runs {len(active)} migrations (the limit); "
                f"retry later"
            )
        if any(s.domain == domain for s in active):
            raise DuplicateMigration(f"domain {domain} is already being migrated here")
        names = [d.get("name") for d in devices]
        most = self.config.maxDevices
        if not devices or len(devices) > most or len(set(names)) != len(names):
            raise BadSpec(f"a migration needs 1 to {most} devices with distinct names")

    def _describe(self, device: dict[str, Any]) -> DeviceDescription:
        return DeviceDescription(
            kind=device["kind"],
            name=device["name"],
            size=device["size"],
            params=device["params"],
            precopy=device["precopy"],
        )

    async def _offer(
        self,
        descriptions: list[DeviceDescription],
        contexts: list[TargetContext],
        accepted: list[ITargetDevice],
    ) -> list[DeviceOffer]:
        """Ask every handler; the accepting ones are appended to ``accepted``."""
        offers: list[DeviceOffer] = []
        for description, context in zip(descriptions, contexts, strict=True):
            name = description.name
            kind = self.kinds.get(description.kind)
            if kind is None:
                reason = f"no handler for device kind {description.kind!r} on this host"
                offers.append(DeviceOffer(name, False, reason))
                continue
            try:
                await self.runInThread(_makePrivateDir, context.stagingDir.path)
                device = kind.target(description, context)
                params = await device.accept()
            except XenmigError as e:
                reason = str(e) if f"device {name}" in str(e) else f"device {name}: {e}"
                offers.append(DeviceOffer(name, False, reason))
                continue
            except Exception as e:
                log.failure(
                    "migration {migration_id}: device {device} failed at prepare",
                    migration_id=context.migrationId,
                    device=name,
                )
                reason = f"device {name}: the {description.kind} handler failed: {e!r}"
                offers.append(DeviceOffer(name, False, reason))
                continue
            accepted.append(device)
            offers.append(DeviceOffer(name, True, "", params or {}))
        return offers

    async def _refuse(
        self,
        migrationId: str,
        domain: str,
        peer: str,
        offers: list[DeviceOffer],
        accepted: list[ITargetDevice],
    ) -> None:
        for device in accepted:
            try:
                await device.abort()
            except Exception:
                log.failure(
                    "migration {migration_id}: abort after a refusal failed",
                    migration_id=migrationId,
                )
        contexts = self._contexts.pop(migrationId, [])
        paths = [self.stagingRoot.child(migrationId).path]
        await self.runInThread(_removeAll, paths + _external(contexts))
        reasons = "; ".join(o.reason for o in offers if not o.accepted) or "error"
        log.warn(
            "migration {migration_id} of {domain} from {peer} refused: {reasons}",
            migration_id=migrationId,
            domain=domain,
            peer=peer,
            reasons=reasons,
        )

    def _recordRefusal(
        self,
        migrationId: str,
        domain: str,
        peer: str,
        descriptions: list[DeviceDescription],
        offers: list[DeviceOffer],
    ) -> None:
        """
        Keep a refused Prepare for ``xenmig status`` (and the journal), so the
        operator of this host sees it and why; the id may be prepared again.
        """
        now = self.clock.seconds()
        reasons = {o.name: o.reason for o in offers}
        reason = "refused at Prepare: " + "; ".join(
            o.reason for o in offers if not o.accepted
        )
        record: dict[str, Any] = {
            "migration_id": migrationId,
            "domain": domain,
            "phase": "ABORTED",
            "peer": peer,
            "reason": reason,
            "refused": True,
            "started": now,
            "updated": now,
            "installed": [],
            "staging": [],
            "devices": [
                {
                    "name": d.name,
                    "kind": d.kind,
                    "state": "REFUSED" if reasons.get(d.name) else "ABORTED",
                    "bytes_done": 0,
                    "bytes_expected": d.size,
                    "rate": 0.0,
                    "digest": "",
                    "reason": reasons.get(d.name, ""),
                }
                for d in descriptions
            ],
        }
        self.history[migrationId] = record
        self.gate.aborted(migrationId, domain, reason)
        self.journal.write(migrationId, record).addErrback(
            lambda f: log.failure(
                "migration {migration_id}: journal write failed",
                f,
                migration_id=migrationId,
            )
        )
        self._prune()

    # -- streams -------------------------------------------------------------------

    def session(self, migrationId: str, peer: str | None = None) -> TargetSession:
        """The session, if ``peer`` (when given) is the host that prepared it."""
        session = self.sessions.get(migrationId)
        if session is None:
            record = self.history.get(migrationId)
            if record is not None and record.get("phase") == "COMMITTED":
                raise InvalidTransition(f"migration {migrationId} has committed")
            if record is not None:
                raise MigrationAborted(
                    f"migration {migrationId} was aborted: {record.get('reason', '')}"
                )
            raise UnknownMigration(f"no migration {migrationId!r} on this host")
        if peer is not None and peer != session.peer:
            raise NotAuthorized(
                f"migration {migrationId} belongs to {session.peer}, not {peer}"
            )
        return session

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
        self._expireTokens()
        for old in [
            t
            for t, c in self._tokens.items()
            if (c.migrationId, c.device) == (migrationId, device)
        ]:
            del self._tokens[old]
        token = secrets.token_bytes(32)
        expires = self.clock.seconds() + self.config.timeouts.token
        self._tokens[token] = _Token(migrationId, device, peer, expires)
        return token

    def claimToken(
        self, peer: str, token: bytes, fingerprint: str = ""
    ) -> tuple[TargetSession, str]:
        """Use a stream token: the session and the device whose stream this is."""
        self.authorize(peer, fingerprint)
        self._expireTokens()
        claim = self._tokens.pop(token, None)
        if claim is None:
            raise BadToken("the stream token is unknown, used or expired")
        if claim.peer != peer:
            log.warn(
                "migration {migration_id}: {peer} presented a token issued to {owner}",
                migration_id=claim.migrationId,
                peer=peer,
                owner=claim.peer,
            )
            raise BadToken("the stream token was issued to another host")
        session = self.session(claim.migrationId, peer)
        session.streamStarted(claim.device)
        return session, claim.device

    def _expireTokens(self) -> None:
        now = self.clock.seconds()
        for token in [t for t, c in self._tokens.items() if c.expires < now]:
            del self._tokens[token]

    # -- verification, commit, abort ------------------------------------------------

    def deviceReady(self, peer: str, migrationId: str, device: str) -> Deferred[Any]:
        """A Deferred firing with the device's verified ContentDigest."""
        return self.session(migrationId, peer).awaitReady(device)

    async def commit(self, peer: str, migrationId: str) -> list[str]:
        """
        Install everything and release the VM; what was installed.  Idempotent: a
        commit asked again (its answer was lost) answers the same.
        """
        record = self.history.get(migrationId)
        if record is not None and record.get("phase") == "COMMITTED":
            if record.get("peer") != peer:
                raise NotAuthorized(f"migration {migrationId} is not {peer}'s")
            return list(record.get("installed", []))
        return await self.session(migrationId, peer).commit()

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

    # -- status and the resume gate -------------------------------------------------

    def query(self, migrationId: str, viewer: str | None = None) -> dict[str, Any]:
        """
        The status of a migration.  With a peers file in force, a remote
        ``viewer`` sees only its own migrations.
        """
        record: dict[str, Any] | None = None
        if migrationId in self.sessions:
            record = self.sessions[migrationId].status().toJSON()
        elif migrationId in self.history:
            record = self.history[migrationId]
        if record is None or not self._visible(record, viewer):
            raise UnknownMigration(
                f"no migration {bounded(repr(migrationId), 200)} on this host"
            )
        return record

    def _visible(self, record: dict[str, Any], viewer: str | None) -> bool:
        if viewer is None or not self.policy.restricted:
            return True
        return record.get("peer") == viewer

    def list(self, limit: int = 50, viewer: str | None = None) -> list[dict[str, Any]]:
        """
        The most recent migrations, newest first: at most ``limit``, and no more
        than fit in one AMP answer (a remote ``viewer``: see L{query}).
        """
        records = dict(self.history)
        records.update({k: s.status().toJSON() for k, s in self.sessions.items()})
        records = {k: r for k, r in records.items() if self._visible(r, viewer)}
        ordered = sorted(records.values(), key=lambda r: r.get("started", 0))[::-1]
        chosen: list[dict[str, Any]] = []
        budget = MAX_JSON - 1024
        for record in ordered[: max(1, min(limit, KEEP_FINISHED))]:
            budget -= len(json.dumps(record)) + 2
            if budget < 0:
                break
            chosen.append(record)
        return chosen

    def awaitRestored(
        self, domain: str, timeout: float, migrationId: str | None = None
    ) -> Deferred[Release]:
        """See L{ResumeGate.wait}."""
        return self.gate.wait(domain, timeout, migrationId)

    def _claimed(self, migrationId: str) -> None:
        """The toolstack took the VM of ``migrationId``: journal the claim."""
        record = self.history.get(migrationId)
        if record is None and migrationId in self.sessions:
            record = self.sessions[migrationId].summary()
        if record is not None:
            record["claimed"] = True
            self.journal.write(migrationId, record).addErrback(
                lambda f: log.failure(
                    "migration {migration_id}: journal write failed",
                    f,
                    migration_id=migrationId,
                )
            )

    def _changed(self, session: TargetSession) -> Deferred[None]:
        """Every phase change: journal it; at the end, clean, release, hook."""
        record = session.summary()
        contexts = self._contexts.get(session.migrationId, [])
        record["staging"] = [self.stagingRoot.child(session.migrationId).path] + [
            p for c in contexts for p in c.externalStaging
        ]
        d = self.journal.write(session.migrationId, record)
        if session.phase in FINAL:
            d.addCallback(lambda _: self._finished(session))
        return d

    def _finished(self, session: TargetSession) -> Deferred[None]:
        mid = session.migrationId
        paths = [self.stagingRoot.child(mid).path]
        paths += _external(self._contexts.pop(mid, []))
        self._received.pop(mid, None)
        self._budgets.pop(mid, None)
        d = self.runInThread(_removeAll, paths)
        d.addCallback(lambda _: self._release(session))
        return d

    def _release(self, session: TargetSession) -> None:
        if session.phase is Phase.COMMITTED:
            self.gate.committed(_release(session.summary()))
            self._runCommitHook(session)
        else:
            self.gate.aborted(session.migrationId, session.domain, session.reason)
        self._prune()

    def _prune(self) -> None:
        """Keep finished sessions as records, and only the most recent ones."""
        finished = sorted(
            (s for s in self.sessions.values() if s.phase in FINAL),
            key=lambda s: s.updated,
        )
        for session in finished[:-KEEP_IN_MEMORY]:
            del self.sessions[session.migrationId]
            self.history[session.migrationId] = session.summary()
        for migrationId in sorted(
            self.history, key=lambda k: self.history[k].get("started", 0)
        )[:-KEEP_FINISHED]:
            del self.history[migrationId]

    def _runCommitHook(self, session: TargetSession) -> None:
        if not self.config.onCommit or self.runHook is None:
            return
        env = {
            "XENMIG_MIGRATION_ID": session.migrationId,
            "XENMIG_DOMAIN": session.domain,
            "XENMIG_PEER": session.peer,
            "XENMIG_INSTALLED": "\n".join(session.installed),
        }

        def done(code: int) -> None:
            log.info(
                "migration {migration_id}: on-commit hook exited {code}",
                migration_id=session.migrationId,
                code=code,
            )

        self.runHook(self.config.onCommit, env, session.migrationId).addCallbacks(
            done,
            lambda f: log.failure(
                "migration {migration_id}: on-commit hook failed",
                f,
                migration_id=session.migrationId,
            ),
        )

    def closeAll(self, reason: str) -> Deferred[None]:
        """Abort every session that has not committed (daemon shutting down)."""
        pending = [
            s.abort(reason)
            for s in self.sessions.values()
            if s.phase not in FINAL and s.phase is not Phase.COMMITTING
        ]
        return (
            gatherResults(pending).addCallback(lambda _: None)
            if pending
            else succeed(None)
        )


def _declaredBytes(description: DeviceDescription) -> int:
    """The most a device says it may send: its size, or a larger ``max_size``."""
    most = description.params.get("max_size")
    if isinstance(most, int) and not isinstance(most, bool):
        return max(description.size, most)
    return description.size


def _makePrivateDir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=False)


def _external(contexts: list[TargetContext]) -> list[str]:
    return [path for context in contexts for path in context.externalStaging]


def _removeAll(paths: list[str]) -> None:
    for path in paths:
        removeTree(path)


def _release(record: dict[str, Any]) -> Release:
    return Release(
        record["migration_id"], record["domain"], tuple(record.get("installed", []))
    )
