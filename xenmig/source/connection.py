"""The source's connection to a target daemon: control calls with deadlines, streams."""

from __future__ import annotations

import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig import amp_commands as commands
from xenmig.errors import Busy
from xenmig.interfaces import IDeviceKind
from xenmig.limits import AnnouncedLimits, withDeadline
from xenmig.model import DEFAULT_PORT
from xenmig.plugins import LazyKinds
from xenmig.pump import TokenBucket
from xenmig.source.backoff import CONNECTING_FAILURES, NotConnected, whileBusy
from xenmig.source.idlepool import IdleConnections
from xenmig.source.pacing import Slots, handshakeSlots
from xenmig.source.resumable import ResumePolicy
from xenmig.source.streamsender import StreamSender
from xenmig.source.streamtls import StreamTLS
from xenmig.source.threadedstream import StreamEndpoint, ThreadedStreamSender

T = TypeVar("T")


@dataclass(frozen=True)
class ClientTimeouts:
    """Bounds on every wait of the source, in seconds."""

    connect: float = 30.0
    call: float = 60.0
    ready: float = 3600.0
    commit: float = 120.0
    keepalive: float = 10.0
    abort: float = 10.0
    #: A state stream that makes no progress for this long while it should (a
    #: pre-copy round, the final transfer) fails with StreamStalled; 0: never.
    stall: float = 60.0
    #: How long a step (a Prepare, a stream's opening) is tried again while
    #: the target answers BUSY; a connection refused or reset while
    #: connecting is tried again for up to ``connect`` seconds.
    busy: float = 300.0


class TargetConnection:
    """
    A target daemon as the source reaches it: control connections, calls
    bounded by the time-outs, and the devices' state streams.

    @param tls: client TLS options (L{xenmig.tls.clientOptions}), or None for the
        development plaintext mode (loopback only).
    @param sslContext: the same TLS settings for streams sent from threads
        (L{xenmig.source.threadedstream.sslContext}, or an
        C{ssl.SSLContext}): state streams are then
        sent from threads (L{xenmig.source.threadedstream}), several times
        faster than through the reactor.  Without it, streams go through
        Twisted's TLS, unless in plaintext mode.
    @param serverName: the name the daemon's certificate must carry (default:
        C{host}), for the threaded streams.
    @param onRetry: told, in one line, each time a step waits to be tried
        again because the target is busy, or a broken connection is
        re-established (a progress display).
    @param resume: ask the target to keep each migration through broken
        connections (streams reopened, the control connection re-attached),
        tried again within ``resumePolicy``; an older target does not, and a
        broken connection then aborts as it always did.
    @param inline: send the stream of a small device (no pre-copy, at most
        the size the target offers at Prepare: a vTPM's, a small file's) on
        the control connection (StreamRecords), saving a connection and its
        handshake per device; an older target offers nothing.
    @param keepConnections: keep the control connection of a migration that
        committed open for this many seconds, for the next Prepare to the same
        daemon (L{xenmig.source.idlepool}); 0: close it.  Call L{closeIdle}
        before dropping the client.

    It paces itself within the target's L{limits}, which the target
    announces at Prepare: at most L{handshakes} connections being opened at
    once, and a migration's commands (L{xenmig.source.pacing}).
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int = DEFAULT_PORT,
        tls: Any = None,
        timeouts: ClientTimeouts | None = None,
        kinds: Mapping[str, IDeviceKind] | None = None,
        sslContext: StreamTLS | ssl.SSLContext | None = None,
        serverName: str | None = None,
        onRetry: Callable[[str], Any] | None = None,
        resume: bool = False,
        resumePolicy: ResumePolicy | None = None,
        inline: bool = True,
        keepConnections: float = 0.0,
    ) -> None:
        self.reactor = reactor
        self.inline = inline
        self.idle = IdleConnections(reactor, keepConnections, self.hangUp)
        self.host = host
        self.port = port
        self.tls = tls
        self.timeouts = timeouts or ClientTimeouts()
        self.kinds = kinds if kinds is not None else LazyKinds()
        self.onRetry = onRetry
        #: Waits for load (BUSY answers, resets while connecting), by migration id.
        self.retries: Counter[str] = Counter()
        self.resume = resume
        self.resumePolicy = resumePolicy or ResumePolicy()
        #: What the target announced (an older one: AnnouncedLimits()).
        self.limits = AnnouncedLimits()
        self.handshakes = Slots(handshakeSlots(self.limits))
        self.streamEndpoint: StreamEndpoint | None = None
        if sslContext is not None or tls is None:
            self.streamEndpoint = StreamEndpoint(
                host, port, sslContext, serverName or host, self.timeouts.connect
            )

    # -- connections and calls -------------------------------------------------------

    def endpoint(self) -> IStreamClientEndpoint:
        # IPv4 or IPv6, an address or a name (every address it has is tried)
        tcp = HostnameEndpoint(
            self.reactor, self.host, self.port, timeout=self.timeouts.connect
        )
        return wrapClientTLS(self.tls, tcp) if self.tls is not None else tcp

    async def connect(self) -> ControlClient:
        """
        A new control connection, once its TLS handshake has completed (part
        of the bound); one of L{handshakes}.
        """

        def connecting() -> Deferred[ControlClient]:
            connection = Deferred.fromCoroutine(self._connect())
            return bounded(
                connection, self.timeouts.connect, self.reactor, "connecting"
            )

        return await self.handshakes.run(connecting)

    async def _connect(self) -> ControlClient:
        protocol = ControlClient(self.tls is not None)
        try:
            await self.endpoint().connect(Factory.forProtocol(lambda: protocol))
            await protocol.handshaken
        except BaseException:
            self.hangUp(protocol, abort=True)
            raise
        transport: Any = protocol.transport
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)  # small boxes: no delayed ACKs
        return protocol

    async def connectOrRetry(self) -> ControlClient:
        """L{connect}, its failure before the handshake a L{NotConnected}."""
        try:
            return await self.connect()
        except CONNECTING_FAILURES as e:
            raise NotConnected(e) from e

    def whileBusy(
        self,
        step: Callable[[], Awaitable[T]],
        what: str = "",
        retryRefused: bool = True,
        migrationId: str | None = None,
    ) -> Deferred[T]:
        """
        ``step``, tried again while the target is busy (see
        L{xenmig.source.backoff.whileBusy}), within L{ClientTimeouts.busy};
        each wait counted in L{retries} under ``migrationId``.
        """

        def retrying(line: str) -> None:
            if migrationId is not None:
                self.retries[migrationId] += 1
            if self.onRetry is not None:
                self.onRetry(line)

        return Deferred.fromCoroutine(
            whileBusy(
                self.reactor,
                step,
                self.timeouts.busy,
                self.timeouts.connect,
                retrying,
                what,
                retryRefused,
            )
        )

    def learn(self, announced: Any) -> None:
        """Take the limits a target announced at Prepare (None: an older one)."""
        self.limits = AnnouncedLimits.fromWire(announced)
        self.handshakes.resize(handshakeSlots(self.limits))

    async def call(self, protocol: amp.AMP, command: type, **kw: Any) -> dict[str, Any]:
        """One AMP call, bounded by the call time-out."""
        name = getattr(command, "commandName", b"command").decode()
        return await self.callWithin(self.timeouts.call, name, protocol, command, **kw)

    async def callWithin(
        self, seconds: float, what: str, protocol: amp.AMP, command: type, /, **kw: Any
    ) -> dict[str, Any]:
        """One AMP call; past ``seconds`` it fails with PhaseTimeout naming ``what``."""
        d = protocol.callRemote(command, **kw)
        try:
            return await bounded(d, seconds, self.reactor, what)
        finally:  # an answer (or an error) came: the session's tickets too
            if isinstance(protocol, ControlClient) and not protocol.sessionKept:
                self._keepSession(protocol)

    def _keepSession(self, protocol: ControlClient) -> None:
        """Keep the TLS session of a first answer's connection (L{SessionKeeper})."""
        protocol.sessionKept = True
        sessions = getattr(self.tls, "sessions", None)
        handle = getattr(protocol.transport, "getHandle", None)
        if sessions is not None and handle is not None:
            sessions.keep(handle())

    def closeIdle(self) -> None:
        """Hang up the control connections kept for the next migrations."""
        self.idle.close()

    def hangUp(self, protocol: amp.AMP | None, abort: bool = False) -> None:
        """Close an AMP connection, unless it is gone (AMP then drops its transport)."""
        transport: Any = protocol.transport if protocol is not None else None
        if transport is not None:
            if abort:
                transport.abortConnection()
            else:
                transport.loseConnection()

    # -- the Prepare of a migration --------------------------------------------------

    async def prepareRemote(self, **kw: Any) -> tuple[amp.AMP, dict[str, Any]]:
        """
        Prepare on a control connection of its own (``kw``: its arguments),
        tried again while the target is busy (on the same connection, unless
        the target closes it); the connection and the answer, whose limits the
        client now paces itself within.
        """

        control: ControlClient | None = self.idle.take()
        kept = control is not None

        async def once() -> tuple[amp.AMP, dict[str, Any]]:
            nonlocal control, kept
            if control is None or control.lost:  # closed after BUSY: a new one
                control, kept = await self.connectOrRetry(), False
            try:
                return control, await self.call(control, commands.Prepare, **kw)
            except ConnectionClosed as e:
                self.hangUp(control)
                control = None
                if kept:  # a kept connection that had gone: a new one
                    kept = False
                    raise NotConnected(e) from e
                raise
            except Busy as e:
                # The target did nothing: the connection serves the next
                # attempt, unless the target is closing it (--max-connections).
                if e.limit == "--max-connections":
                    self.hangUp(control)
                    control = None
                raise
            except BaseException:
                self.hangUp(control)
                control = None
                raise

        try:
            prepared, answer = await self.whileBusy(
                once, migrationId=kw.get("migration_id")
            )
        except BaseException:
            self.hangUp(control)
            raise
        self.learn(answer.get("limits"))
        return prepared, answer

    # -- on a connection of their own ------------------------------------------------

    async def query(self, migrationId: str) -> dict[str, Any]:
        """The target's status of a migration, on a fresh connection."""
        answer = await self._onItsOwn(commands.QueryMigration, migration_id=migrationId)
        return answer["status"]

    async def listMigrations(self, limit: int = 50) -> list[dict[str, Any]]:
        """The target's most recent migrations."""
        answer = await self._onItsOwn(commands.ListMigrations, limit=limit)
        return answer["migrations"]

    async def abortMigration(self, migrationId: str, reason: str) -> str:
        """Abort a migration on the target by id; its phase afterwards."""
        answer = await self._onItsOwn(
            commands.Abort, migration_id=migrationId, reason=reason
        )
        return answer["phase"]

    async def _onItsOwn(self, command: type, **kw: Any) -> dict[str, Any]:
        """One call on a new connection, tried again while the target is busy."""

        async def once() -> dict[str, Any]:
            protocol = await self.connectOrRetry()
            try:
                return await self.call(protocol, command, **kw)
            finally:
                self.hangUp(protocol)

        return await self.whileBusy(once, retryRefused=False)

    # -- the streams of a migration's devices -----------------------------------------

    def streamSender(
        self,
        device: str,
        bandwidth: TokenBucket | None = None,
        queue: int | None = None,
    ) -> StreamSender | ThreadedStreamSender:
        """
        A sender for ``device``'s stream, not yet open: sent from a thread when
        the client has a stream endpoint, else through Twisted's TLS; paced by
        ``bandwidth`` (shared by the migration's streams) if given.  ``queue``:
        the most bytes that may wait to be sent before the device's writes
        wait (the thread's default if None; Twisted's buffer is smaller still).
        """
        keepalive = self.timeouts.keepalive
        if self.streamEndpoint is not None:
            marks = {"highWater": queue, "lowWater": queue // 2} if queue else {}
            return ThreadedStreamSender(
                self.reactor, device, keepalive, bandwidth=bandwidth, **marks
            )
        return StreamSender(device, self.reactor, keepalive, bandwidth)

    async def openStream(
        self,
        control: amp.AMP,
        migrationId: str,
        sender: StreamSender | ThreadedStreamSender,
        slots: Slots | None = None,
    ) -> dict[str, Any]:
        """
        Open ``sender``'s stream: a token from the target (OpenStream on the
        control connection, one of a migration's command ``slots``), presented on a new
        connection (StartStream, one of L{handshakes}); tried again, with a
        new token, while the target is busy.  The answer to OpenStream: in a
        resumable session, how many records the target has (``position``),
        and whether END among them (``ended``: nothing is opened then).
        """

        async def once() -> dict[str, Any]:
            answer = await (slots or Slots(1)).run(
                self.call,
                control,
                commands.OpenStream,
                migration_id=migrationId,
                device=sender.device,
            )
            if not answer.get("ended"):
                await self._startStream(sender, answer["token"])
            return answer

        return await self.whileBusy(
            once, f"the stream of {sender.device}", migrationId=migrationId
        )

    async def _startStream(
        self, sender: StreamSender | ThreadedStreamSender, token: bytes
    ) -> None:
        if isinstance(sender, ThreadedStreamSender):
            endpoint = self.streamEndpoint
            assert endpoint is not None

            def opening() -> Deferred[None]:
                return bounded(
                    sender.open(endpoint, token),
                    self.timeouts.connect,
                    self.reactor,
                    f"opening the stream of {sender.device}",
                )

            await self.handshakes.run(opening)
            return
        protocol = await self.connectOrRetry()
        try:
            await self.call(
                protocol,
                commands.StartStream,
                token=token,
                _protoToSwitchToFactory=_SwitchFactory(sender),
            )
        except BaseException:
            self.hangUp(protocol)
            raise
        await sender.opened

    async def pacedCall(
        self,
        slots: Slots,
        seconds: float,
        what: str,
        control: amp.AMP,
        command: type,
        /,
        **kw: Any,
    ) -> dict[str, Any]:
        """
        L{callWithin}, holding one of a migration's command ``slots``; tried
        again while the target answers BUSY (it then did nothing).
        """

        async def once() -> dict[str, Any]:
            return await slots.run(
                self.callWithin, seconds, what, control, command, **kw
            )

        return await self.whileBusy(once, what, migrationId=kw.get("migration_id"))


@implementer(IHandshakeListener)
class ControlClient(amp.AMP):
    """
    The source's end of a connection to the target: L{handshaken} fires once
    its TLS handshake has completed (at once without TLS), or fails with why
    the connection went before.
    """

    def __init__(self, tls: bool = True) -> None:
        super().__init__()
        self.tls = tls
        self.lost = False
        #: Whether its TLS session was looked at for the next connections.
        self.sessionKept = not tls
        #: The committed migrations it served (L{xenmig.source.idlepool}).
        self.served = 0
        self.handshaken: Deferred[None] = Deferred()
        #: Told when the connection is lost (a resumable migration reconnects).
        self.onLost: Callable[[], Any] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if not self.tls:
            self._up(None)

    def handshakeCompleted(self) -> None:
        self._up(None)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.lost = True
        self._up(reason)
        super().connectionLost(reason)
        if self.onLost is not None:
            self.onLost()

    def _up(self, failure: Failure | None) -> None:
        if self.handshaken.called:
            return
        if failure is None:
            self.handshaken.callback(None)
        else:
            self.handshaken.errback(failure)


class _SwitchFactory(ClientFactory):
    """Hands the raw StreamSender to AMP's protocol switch."""

    def __init__(self, sender: StreamSender) -> None:
        self.sender = sender

    def buildProtocol(self, addr: Any) -> StreamSender:
        return self.sender


def bounded(d: Deferred[Any], seconds: float, clock: Any, what: str) -> Deferred[Any]:
    """Bound ``d``; on expiry it fails with PhaseTimeout naming ``what``."""
    return withDeadline(
        d, seconds, clock, f"{what} did not finish within {seconds:g} s"
    )
