"""The demo's two hosts: a throwaway CA, their identities, directories and daemons."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from xenmig import tls
from xenmig.cli import pki
from xenmig.clients.processes import Daemon, freePort
from xenmig.source.client import MigrationClient
from xenmig.source.connection import ClientTimeouts
from xenmig.source.threadedstream import sslContext

#: The hosts' names; each certificate also names 127.0.0.1.
HOST_NAMES = ("hosta.test", "hostb.test")


@dataclass
class DemoHost:
    """One of the two hosts: its identity, daemon and directories."""

    name: str
    home: str
    pkiDir: str
    port: int = 0
    daemon: Daemon | None = None

    @property
    def stateDir(self) -> str:
        return os.path.join(self.home, "state")

    @property
    def root(self) -> str:
        """The allowed root: state received by this host is installed here."""
        return os.path.join(self.home, "vm")

    @property
    def cert(self) -> str:
        return os.path.join(self.pkiDir, self.name + ".pem")

    @property
    def key(self) -> str:
        return os.path.join(self.pkiDir, self.name + ".key")

    def clientTo(self, reactor: Any, target: DemoHost, **kw: Any) -> MigrationClient:
        """A client with this host's identity, verifying ``target``'s name."""
        identity = tls.loadIdentity(self.cert, self.key)
        authorities = tls.loadAuthority(os.path.join(self.pkiDir, pki.CA_CERTIFICATE))
        options = tls.clientOptions(target.name, identity, authorities)
        return MigrationClient(
            reactor,
            "127.0.0.1",
            target.port,
            tls=options,
            sslContext=sslContext(identity, authorities),
            serverName=target.name,
            **kw,
        )

    async def startDaemon(self, reactor: Any, peer: DemoHost) -> None:
        """
        Start this host's ``twistd -n xenmig`` on a free loopback port; return
        once ``peer`` has its answer over mutual TLS.

        @raise ProcessFailed: if it exits or does not answer in time.
        """
        self.port = freePort()
        options = [
            "--port",
            str(self.port),
            "--interface",
            "127.0.0.1",
            "--state-dir",
            self.stateDir,
            "--ca",
            os.path.join(self.pkiDir, pki.CA_CERTIFICATE),
            "--cert",
            self.cert,
            "--key",
            self.key,
            "--allow-root",
            self.root,
        ]
        log = os.path.join(self.home, "daemon.log")
        self.daemon = Daemon(reactor, f"daemon of {self.name}", options, log)
        probe = peer.clientTo(reactor, self, timeouts=ClientTimeouts(2, 2))
        await self.daemon.start(lambda: probe.listMigrations(1))

    async def stopDaemon(self) -> str | None:
        """
        Stop the daemon (SIGTERM, SIGKILL after 5 s); how it ended, or None if
        none was started.
        """
        if self.daemon is None or self.daemon.child is None:
            return None
        status = await self.daemon.stop(grace=5.0)
        how = {-15: "on SIGTERM", -9: "KILLED after the grace period"}
        return how.get(status, f"with status {status}")


def makeHosts(work: str) -> list[DemoHost]:
    """
    Blocking (run it in a thread): a throwaway CA in ``work/pki`` valid for two
    days, and the two hosts with their certificates and directories in ``work``.
    """
    pkiDir = os.path.join(work, "pki")
    pki.initCA(pkiDir, "xenmig demo CA", 2)
    hosts = []
    for name in HOST_NAMES:
        pki.issueHost(pkiDir, name, ["127.0.0.1"], 2)
        host = DemoHost(name, os.path.join(work, name), pkiDir)
        os.makedirs(host.root)
        hosts.append(host)
    return hosts


@dataclass
class Leg:
    """One migration of the demo: from ``source`` to ``target``."""

    number: int
    source: DemoHost
    target: DemoHost
    migrationId: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
