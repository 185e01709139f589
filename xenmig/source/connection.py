"""The source's connection to a target daemon: control calls with deadlines, streams."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory
from twisted.protocols import amp

from xenmig import amp_commands as commands
from xenmig.amp_commands import DEFAULT_PORT
from xenmig.interfaces import IDeviceKind
from xenmig.limits import withDeadline
from xenmig.plugins import deviceKinds
from xenmig.source.streamsender import StreamSender
from xenmig.source.threadedstream import StreamEndpoint, ThreadedStreamSender


@dataclass(frozen=True)
class ClientTimeouts:
    """Bounds on every wait of the source, in seconds."""

    connect: float = 30.0
    call: float = 60.0
    ready: float = 3600.0
    commit: float = 120.0
    keepalive: float = 10.0
    abort: float = 10.0


class TargetConnection:
    """
    A target daemon as the source reaches it: control connections, calls
    bounded by the time-outs, and the devices' state streams.

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

    # -- connections and calls -------------------------------------------------------

    def endpoint(self) -> IStreamClientEndpoint:
        tcp = TCP4ClientEndpoint(
            self.reactor, self.host, self.port, timeout=self.timeouts.connect
        )
        return wrapClientTLS(self.tls, tcp) if self.tls is not None else tcp

    async def connect(self) -> amp.AMP:
        """A new control connection (the TLS handshake is part of the bound)."""
        d = self.endpoint().connect(Factory.forProtocol(amp.AMP))
        protocol = await bounded(d, self.timeouts.connect, self.reactor, "connecting")
        if hasattr(protocol.transport, "setTcpNoDelay"):
            protocol.transport.setTcpNoDelay(True)  # small boxes: no delayed ACKs
        return protocol

    async def call(self, protocol: amp.AMP, command: type, **kw: Any) -> dict[str, Any]:
        """One AMP call, bounded by the call time-out."""
        name = getattr(command, "commandName", b"command").decode()
        return await self.callWithin(self.timeouts.call, name, protocol, command, **kw)

    async def callWithin(
        self, seconds: float, what: str, protocol: amp.AMP, command: type, /, **kw: Any
    ) -> dict[str, Any]:
        """One AMP call; past ``seconds`` it fails with PhaseTimeout naming ``what``."""
        d = protocol.callRemote(command, **kw)
        return await bounded(d, seconds, self.reactor, what)

    def hangUp(self, protocol: amp.AMP | None) -> None:
        """Close an AMP connection, unless it is gone (AMP then drops its transport)."""
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()

    # -- on a connection of their own ------------------------------------------------

    async def query(self, migrationId: str) -> dict[str, Any]:
        """The target's status of a migration, on a fresh connection."""
        protocol = await self.connect()
        try:
            answer = await self.call(
                protocol, commands.QueryMigration, migration_id=migrationId
            )
            return answer["status"]
        finally:
            self.hangUp(protocol)

    async def listMigrations(self, limit: int = 50) -> list[dict[str, Any]]:
        """The target's most recent migrations."""
        protocol = await self.connect()
        try:
            answer = await self.call(protocol, commands.ListMigrations, limit=limit)
            return answer["migrations"]
        finally:
            self.hangUp(protocol)

    async def abortMigration(self, migrationId: str, reason: str) -> str:
        """Abort a migration on the target by id; its phase afterwards."""
        protocol = await self.connect()
        try:
            answer = await self.call(
                protocol, commands.Abort, migration_id=migrationId, reason=reason
            )
            return answer["phase"]
        finally:
            self.hangUp(protocol)

    # -- the streams of a migration's devices -----------------------------------------

    def streamSender(self, device: str) -> StreamSender | ThreadedStreamSender:
        """
        A sender for ``device``'s stream, not yet open: sent from a thread when
        the client has a stream endpoint, else through Twisted's TLS.
        """
        keepalive = self.timeouts.keepalive
        if self.streamEndpoint is not None:
            return ThreadedStreamSender(self.reactor, device, keepalive)
        return StreamSender(device, self.reactor, keepalive)

    async def openStream(
        self,
        control: amp.AMP,
        migrationId: str,
        sender: StreamSender | ThreadedStreamSender,
    ) -> None:
        """
        Open ``sender``'s stream: a token from the target (OpenStream on the
        control connection), presented on a new connection (StartStream).
        """
        answer = await self.call(
            control, commands.OpenStream, migration_id=migrationId, device=sender.device
        )
        if isinstance(sender, ThreadedStreamSender):
            assert self.streamEndpoint is not None
            await bounded(
                sender.open(self.streamEndpoint, answer["token"]),
                self.timeouts.connect,
                self.reactor,
                f"opening the stream of {sender.device}",
            )
            return
        protocol = await self.connect()
        await self.call(
            protocol,
            commands.StartStream,
            token=answer["token"],
            _protoToSwitchToFactory=_SwitchFactory(sender),
        )
        await sender.opened


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
