"""Factories for the daemon's listening sockets: TLS control/streams and local."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory

from xenmig.interfaces import IMigrationTarget
from xenmig.limits import ConnectionGate, ConnectionLimits
from xenmig.protocol import ControlProtocol, LocalControlProtocol


class ControlFactory(Factory):
    """
    Builds a L{ControlProtocol} for every connection to the daemon's port.  Each
    connection is a control connection until a StartStream switches it to a
    state stream.
    """

    def __init__(
        self,
        target: IMigrationTarget,
        tls: bool = True,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.target = target
        self.tls = tls
        self.limits = limits or ConnectionLimits()
        self.gate = ConnectionGate(self.limits, target.clock)

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        protocol = ControlProtocol(
            self.target,
            self.tls,
            self.target.timeouts.handshake,
            self.gate,
            self.limits.idle,
        )
        protocol.factory = self
        return protocol


class LocalControlFactory(Factory):
    """Builds the protocol of the owner-only local socket for the target toolstack."""

    def __init__(self, target: IMigrationTarget) -> None:
        self.target = target

    def buildProtocol(self, addr: Any) -> LocalControlProtocol:
        return LocalControlProtocol(self.target)
