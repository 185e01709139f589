"""The target's AMP protocols: the control connection (TLS) and the local socket."""

from __future__ import annotations

from typing import Any, Protocol, cast

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig import amp_commands as commands
from xenmig import tls as _tls
from xenmig.certificates import peerFingerprint, peerIdentity
from xenmig.errors import Busy, ConfigurationError, NotAuthorized
from xenmig.interfaces import IMigrationTarget
from xenmig.limits import (
    INLINE_OFFER,
    MAX_BOX_BYTES,
    ConnectionGate,
    ConnectionLimits,
    bounded,
)
from xenmig.model import SEND_PROTOCOL, DeviceOffer
from xenmig.responders import StatusResponders, guarded
from xenmig.streamreceiver import StreamReceiver

log = Logger()


class ResumableTarget(Protocol):
    """What the commands of streams and resumable sessions need of the target core."""

    def grantResume(self, peer: str, migrationId: str) -> bool: ...

    async def openStreamAt(
        self, peer: str, migrationId: str, device: str, fingerprint: str = ""
    ) -> dict[str, Any]: ...

    def streamPosition(self, peer: str, migrationId: str, device: str) -> dict: ...

    def streamAttached(self, session: Any, device: str, receiver: Any) -> None: ...

    def reattach(self, peer: str, migrationId: str, holder: set[str]) -> str: ...

    async def streamRecords(
        self,
        peer: str,
        migrationId: str,
        device: str,
        offset: int,
        data: bytes,
        fingerprint: str = "",
    ) -> tuple[int, Any]: ...


class LocalSending(Protocol):
    """What the local socket needs of the daemon's sender (``--via-daemon``)."""

    def send(self, options: dict[str, Any], emit: Any) -> Any:
        """Start a migration; an object with ``done`` (a Deferred of the exit
        status) and ``interrupt()``."""


def _offerBox(offer: DeviceOffer) -> dict[str, Any]:
    return {
        "name": offer.name,
        "accepted": offer.accepted,
        "reason": offer.reason,
        "params": offer.params,
    }


@implementer(IHandshakeListener)
class ControlProtocol(StatusResponders, amp.AMP):
    """
    The AMP control connection from a source host.  It parses commands and hands
    them to the L{IMigrationTarget}, with the peer's certificate identity.

    A session is tied to the connection that prepared it: the target hears
    when that connection is lost (and aborts what has not begun to commit;
    the source then learns the outcome with QueryMigration on a new
    connection).  The L{ConnectionGate} admits the connection and, once its
    handshake is done, serves it or (beyond ``--max-connections``) has it
    answer BUSY to its first command and close.
    """

    def __init__(
        self,
        target: IMigrationTarget,
        tls: bool = True,
        handshakeTimeout: float = 30.0,
        gate: ConnectionGate | None = None,
        idleTimeout: float | None = None,
    ) -> None:
        super().__init__()
        self.target = target
        self.tls = tls
        self.handshakeTimeout = handshakeTimeout
        self.gate = gate
        self.idleTimeout = idleTimeout
        self.transport: Any = None
        self.peer: str | None = None
        self.fingerprint = ""
        self.prepared: set[str] = set()
        self._handshakeTimer: IDelayedCall | None = None
        self._idleTimer: IDelayedCall | None = None
        self._address = ""
        self._admitted = False
        self._handshaking = False
        self._served = False
        self._busy: Busy | None = None
        self._boxBytes = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        # Small request/answer boxes: never wait for a delayed ACK (measured:
        # 40 ms per Prepare without this).
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        address = self.transport.getPeer()
        self._address = str(getattr(address, "host", address))
        if self.gate is not None:
            if not self.gate.admit(self._address):
                self.transport.abortConnection()
                return
            self._admitted = True
        # Bounds the handshake, and a connection kept only to answer BUSY.
        self._handshakeTimer = self.target.clock.callLater(
            self.handshakeTimeout, self._handshakeExpired
        )
        if self.tls:
            self._handshaking = True
        else:
            self.peer = peerIdentity(self.transport)
            self._serve()

    def handshakeCompleted(self) -> None:
        self._handshaking = False
        try:
            self.peer = peerIdentity(self.transport)
            self.fingerprint = peerFingerprint(self.transport)
        except NotAuthorized as e:
            log.warn(
                "refused a connection from {address}: {e}", address=self._address, e=e
            )
            self.transport.abortConnection()
            return
        log.debug("control connection from {peer}", peer=self.peer)
        if not self._serve():
            return
        try:
            self.target.authorize(self.peer, self.fingerprint)  # logs a refusal
        except NotAuthorized:
            pass  # every command says why; the idle time-out closes it

    def _serve(self) -> bool:
        """
        Serve this connection, or (beyond ``--max-connections``) keep it only
        to answer BUSY, within the handshake's time; whether it is served.
        """
        if self.gate is not None and self._admitted:
            if not self.gate.serve(self._address):
                self._busy = self.gate.busy()
                return False
            self._served = True
        if self._handshakeTimer is not None and self._handshakeTimer.active():
            self._handshakeTimer.cancel()
        self._handshakeTimer = None
        self._armIdle()
        return True

    def announcedLimits(self) -> dict[str, int]:
        """The limits this daemon announces in its answer to Prepare."""
        limits = self.gate.limits if self.gate is not None else ConnectionLimits()
        return limits.announced(self.target.config.maxSessions).toWire()

    def _busyFor(self, command: str) -> Busy | None:
        return self._busy or super()._busyFor(command)

    # -- bounds on what a connection holds ---------------------------------------

    def _armIdle(self) -> None:
        if self.idleTimeout is None:
            return
        if self._idleTimer is not None and self._idleTimer.active():
            self._idleTimer.reset(self.idleTimeout)
        else:
            self._idleTimer = self.target.clock.callLater(
                self.idleTimeout, self._idleExpired
            )

    def _stopIdle(self) -> None:
        if self._idleTimer is not None and self._idleTimer.active():
            self._idleTimer.cancel()
        self._idleTimer = None

    def _idleExpired(self) -> None:
        self._idleTimer = None
        if self._inFlight or self.target.hasActiveWork(self.prepared):
            self._armIdle()
            return
        log.info(
            "control connection from {peer} idle for {seconds} s; closed",
            peer=self.peer or self._address,
            seconds=self.idleTimeout,
        )
        self.transport.loseConnection()

    def stringReceived(self, string: bytes) -> None:
        self._boxBytes += len(string) + 2
        if self._boxBytes > MAX_BOX_BYTES:
            self._drop(f"an AMP box of more than {MAX_BOX_BYTES} bytes")
            return
        super().stringReceived(string)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self._boxBytes = 0
        if amp.COMMAND not in box:
            # This side never asks: an answer or an error box is out of place.
            self._drop("an AMP box that is not a command")
            return
        if self._busy is None:
            self._armIdle()
        super().ampBoxReceived(box)
        if self._busy is not None:  # answered BUSY at once: nothing more
            self.transport.loseConnection()

    def _drop(self, what: str) -> None:
        log.warn(
            "dropping the connection from {peer}: it sent {what}",
            peer=self.peer or self._address,
            what=what,
        )
        self.transport.abortConnection()

    def _viewer(self) -> str | None:
        peer = self._peer()
        self.target.authorize(peer, self.fingerprint)
        return peer

    def _handshakeExpired(self) -> None:
        self._handshakeTimer = None
        if self._busy is not None:  # it asked nothing: it may not wait longer
            self.transport.abortConnection()
            return
        log.warn(
            "TLS handshake from {address} not finished in {seconds} s; dropped",
            address=self.transport.getPeer(),
            seconds=self.handshakeTimeout,
        )
        self.transport.abortConnection()

    def _peer(self) -> str:
        if self.peer is None:
            raise NotAuthorized("the TLS handshake has not completed")
        return self.peer

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if self._handshakeTimer is not None and self._handshakeTimer.active():
            self._handshakeTimer.cancel()
        self._stopIdle()
        if self._admitted and self.gate is not None:
            self._admitted = False
            self.gate.closed(self._address, self._served)
        if self.tls and self.peer is None and self._handshaking:
            self._logHandshakeFailure(reason)
        self.target.controlConnectionLost(self.peer, self.prepared)
        super().connectionLost(reason)

    def _logHandshakeFailure(self, reason: Failure) -> None:
        refusal = _tls.handshakeRefusal(self.transport)
        if refusal is None and not reason.check(SSL.Error):
            return  # closed or timed out (logged then): nothing to explain
        why = refusal or reason.getErrorMessage()
        log.warn(
            "TLS handshake from {address} failed: {why}",
            address=self._address,
            why=bounded(why, 500),
        )

    @commands.Prepare.responder
    @guarded
    def prepare(
        self,
        migration_id: str,
        domain: str,
        protocol_version: int,
        devices: list[dict[str, Any]],
        resume: bool = False,
    ) -> Deferred[dict[str, Any]]:
        preparing = self.target.prepare(
            self._peer(),
            migration_id,
            domain,
            protocol_version,
            devices,
            self.fingerprint,
        )
        # Admitted (a refusal would have raised): from now on the migration is
        # this connection's, and losing the connection abandons it.
        self.prepared.add(migration_id)
        answering = self._answerPrepare(migration_id, preparing, resume)
        return Deferred.fromCoroutine(answering)

    def _resuming(self) -> ResumableTarget:
        return cast(ResumableTarget, self.target)

    async def _answerPrepare(
        self,
        migrationId: str,
        preparing: Deferred[tuple[int, list[DeviceOffer]]],
        resume: bool = False,
    ) -> dict[str, Any]:
        try:
            version, offers = await preparing
        except BaseException:
            self.prepared.discard(migrationId)  # it opened no session
            raise
        answer = {
            "protocol_version": version,
            "offers": [_offerBox(o) for o in offers],
            "limits": self.announcedLimits(),
            "inline": INLINE_OFFER,
        }
        if not all(offer.accepted for offer in offers):
            self.prepared.discard(migrationId)  # refused: the id may come again
        elif resume:
            answer["resume"] = self._resuming().grantResume(self._peer(), migrationId)
        return answer

    @commands.OpenStream.responder
    @guarded
    async def openStream(self, migration_id: str, device: str) -> dict[str, Any]:
        return await self._resuming().openStreamAt(
            self._peer(), migration_id, device, self.fingerprint
        )

    @commands.StreamRecords.responder
    @guarded
    async def streamRecords(
        self, migration_id: str, device: str, offset: int, data: bytes
    ) -> dict[str, Any]:
        taken, digest = await self._resuming().streamRecords(
            self._peer(), migration_id, device, offset, data, self.fingerprint
        )
        if digest is None:
            return {"taken": taken}
        return {"taken": taken, **_digestAnswer(digest)}

    @commands.StreamPosition.responder
    @guarded
    def streamPosition(self, migration_id: str, device: str) -> dict[str, Any]:
        return self._resuming().streamPosition(self._peer(), migration_id, device)

    @commands.Reattach.responder
    @guarded
    def reattach(self, migration_id: str) -> dict[str, Any]:
        self.target.authorize(self._peer(), self.fingerprint)
        phase = self._resuming().reattach(self._peer(), migration_id, self.prepared)
        return {"phase": phase}

    @commands.StartStream.responder
    @guarded
    def startStream(self, token: bytes) -> StreamReceiver:
        session, device = self.target.claimToken(self._peer(), token, self.fingerprint)
        self._stopIdle()  # the stream has its own idle time-out
        receiver = StreamReceiver(
            session,
            device,
            self.target.timeouts.idle,
            self.target.chargeStream(session.migrationId),
            self.target.bandwidth,
            stallTimeout=self.target.timeouts.stall,
        )
        self._resuming().streamAttached(session, device, receiver)
        return receiver

    @commands.DeviceReady.responder
    @guarded
    async def deviceReady(self, migration_id: str, device: str) -> dict[str, Any]:
        digest = await self.target.deviceReady(self._peer(), migration_id, device)
        return _digestAnswer(digest)

    @commands.Commit.responder
    @guarded
    async def commit(self, migration_id: str) -> dict[str, Any]:
        return {"installed": await self.target.commit(self._peer(), migration_id)}

    @commands.Abort.responder
    @guarded
    async def abort(self, migration_id: str, reason: str) -> dict[str, Any]:
        return {"phase": await self.target.abort(self._peer(), migration_id, reason)}

    @commands.DeviceRequest.responder
    @guarded
    async def deviceRequest(
        self, migration_id: str, device: str, method: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        answer = await self.target.deviceRequest(
            self._peer(), migration_id, device, method, payload
        )
        return {"payload": answer}


class LocalControlProtocol(StatusResponders, amp.AMP):
    """
    The owner-only local socket: the target toolstack's view of the daemon,
    and the source's sender (``xenmig migrate --via-daemon``).
    """

    def __init__(
        self, target: IMigrationTarget, sender: LocalSending | None = None
    ) -> None:
        super().__init__()
        self.target = target
        self.sender = sender
        self.sending: Any = None
        self.lost = False

    @commands.SendMigration.responder
    @guarded
    async def sendMigration(self, protocol: int, options: dict) -> dict[str, Any]:
        if protocol != SEND_PROTOCOL:
            raise ConfigurationError(
                f"--via-daemon: the command line speaks version {protocol} of the "
                f"send exchange, this daemon {SEND_PROTOCOL}: use the same xenmig"
            )
        if self.sender is None:
            raise ConfigurationError("--via-daemon: this daemon sends no migrations")
        if self.sending is not None:
            raise ConfigurationError("--via-daemon: one migration per connection")
        self.sending = self.sender.send(options, self._emit)
        return {"exit_status": await self.sending.done}

    @commands.InterruptSend.responder
    def interruptSend(self) -> dict[str, Any]:
        if self.sending is not None:
            self.sending.interrupt()
        return {}

    def _emit(self, event: dict[str, Any]) -> None:
        """One event to the caller of SendMigration, while it is there."""
        if not self.lost:
            self.callRemote(commands.SendEvent, event=event)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """The caller of SendMigration gone (killed, say): abort its migration."""
        self.lost = True
        if self.sending is not None:
            self.sending.interrupt()
        super().connectionLost(reason)

    @commands.AwaitRestored.responder
    @guarded
    async def awaitRestored(
        self, domain: str, timeout: float, migration_id: str | None = None
    ) -> dict[str, Any]:
        log.info(
            "the local toolstack awaits the VM of {domain} (migration {migration_id}) "
            "for up to {timeout} s",
            domain=domain,
            migration_id=migration_id or "any",
            timeout=timeout,
        )
        release = await self.target.awaitRestored(domain, timeout, migration_id)
        return {"migration_id": release.migrationId, "installed": release.installed}

    @commands.Abort.responder
    @guarded
    async def abort(self, migration_id: str, reason: str) -> dict[str, Any]:
        return {"phase": await self.target.abort(None, migration_id, reason)}


def _digestAnswer(digest: Any) -> dict[str, Any]:
    """A verified ContentDigest as DeviceReady (and StreamRecords) answer it."""
    return {"size": digest.size, "algorithm": digest.algorithm, "digest": digest.digest}
