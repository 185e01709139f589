"""Factories for the daemon's listening sockets: TLS control/streams and local."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from xenmig.interfaces import IMigrationTarget
from xenmig.limits import (
    ConnectionGate,
    ConnectionLimits,
    incoherence,
    openFilesWanted,
)
from xenmig.protocol import ControlProtocol, LocalControlProtocol, LocalSending
from xenmig.tuning import raiseOpenFiles

log = Logger()


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

    def startFactory(self) -> None:
        """
        Before the port serves anyone: say what in the limits does not fit
        together, and raise the limit of open files to what they may hold.
        """
        config = self.target.config
        for problem in incoherence(self.limits, config.maxSessions, config.maxDevices):
            log.warn("{problem}", problem=problem)
        wanted = openFilesWanted(self.limits, config.maxSessions, config.maxDevices)
        allowed = raiseOpenFiles(wanted)
        if allowed < wanted:
            log.warn(
                "this process may open {allowed} files, less than the {wanted} its "
                "connection limits may hold: raise its limit (ulimit -n, systemd "
                "LimitNOFILE=), or lower --max-connections",
                allowed=allowed,
                wanted=wanted,
            )

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
    """
    Builds the protocol of the owner-only local socket: for the target
    toolstack, and for ``migrate --via-daemon`` through ``sender``.
    """

    def __init__(self, target: IMigrationTarget, sender: LocalSending | None = None):
        self.target = target
        self.sender = sender

    def buildProtocol(self, addr: Any) -> LocalControlProtocol:
        return LocalControlProtocol(self.target, self.sender)
