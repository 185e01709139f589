"""``twistd xenmig``: the daemon's options and its service."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import Any

from twisted.application import internet, service
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import threadpool, usage
from twisted.python.filepath import FilePath

from xenmig.errors import ConfigurationError
from xenmig.factories import ControlFactory, LocalControlFactory
from xenmig.hooks import runHook
from xenmig.plugins import deviceKinds
from xenmig.target import MigrationTarget, TargetConfig, Timeouts
from xenmig.tuning import tuneAllocator

log = Logger()

DEFAULT_PORT = 8002
DEFAULT_STATE_DIR = "/var/lib/xenmig"


class Options(usage.Options):
    """Options of ``twistd xenmig``."""

    synopsis = "[options]"
    longdesc = (
        "Receive migrations of virtual machine device state (vTPM, disks, device "
        "model) from peer hosts over mutual TLS."
    )
    optParameters = [
        ["port", "p", DEFAULT_PORT, "TCP port to listen on.", int],
        ["interface", "i", "", "Address to listen on (default: all)."],
        ["state-dir", "d", DEFAULT_STATE_DIR, "Journal, staging and local socket."],
        ["ca", None, None, "PEM bundle of the CA(s) that peer certificates chain to."],
        [
            "cert",
            None,
            None,
            "PEM with this host's certificate (and key, unless --key).",
        ],
        ["key", None, None, "PEM with this host's private key."],
        ["on-commit", None, None, "Shell command run after each commit."],
        ["handshake-timeout", None, 30.0, "Seconds for a TLS handshake.", float],
        ["idle-timeout", None, 60.0, "Seconds a stream may stay silent.", float],
        ["prepare-timeout", None, 600.0, "Seconds from Prepare to a stream.", float],
        ["receive-timeout", None, 3600.0, "Seconds to receive every device.", float],
        [
            "ready-timeout",
            None,
            600.0,
            "Seconds a READY session waits to commit.",
            float,
        ],
        ["token-timeout", None, 60.0, "Seconds a stream token stays valid.", float],
        [
            "commit-timeout",
            None,
            300.0,
            "Seconds each device may take to install.",
            float,
        ],
        ["max-sessions", None, 16, "Concurrent migrations accepted.", int],
        ["io-threads", None, 8, "Threads for file I/O and hashing.", int],
    ]
    optFlags = [
        [
            "insecure-plaintext",
            None,
            "DEVELOPMENT ONLY: no TLS, no peer authentication; binds to loopback.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["allow-root"] = []

    def opt_allow_root(self, path: str) -> None:
        """A directory where received state may be installed (repeatable)."""
        self["allow-root"].append(path)

    def postOptions(self) -> None:
        if self["insecure-plaintext"]:
            if not self["interface"]:
                self["interface"] = "127.0.0.1"
            if not _isLoopback(self["interface"]):
                raise usage.UsageError("--insecure-plaintext binds to loopback only")
        elif not (self["ca"] and self["cert"]):
            raise usage.UsageError("--ca and --cert are required (mutual TLS)")


def _isLoopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _checkPortFree(interface: str, port: int) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((interface, port))
    except OSError as e:
        where = f"{interface or '*'}:{port}"
        reason = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise ConfigurationError(f"cannot listen on {where}: {reason}")
    finally:
        probe.close()


def _stateDir(path: str) -> FilePath:
    state = FilePath(os.path.abspath(path))
    try:
        state.makedirs(ignoreExistingDirectory=True)
        os.chmod(state.path, 0o700)
    except OSError as e:
        raise ConfigurationError(f"state directory {state.path}: {e.strerror}")
    return state


def _config(options: Options, state: FilePath) -> TargetConfig:
    roots = tuple(FilePath(os.path.abspath(p)) for p in options["allow-root"])
    for root in roots:
        if not root.isdir():
            raise ConfigurationError(f"--allow-root {root.path} is not a directory")
    if not roots:
        state.child("devices").makedirs(ignoreExistingDirectory=True)
    timeouts = Timeouts(
        handshake=options["handshake-timeout"],
        idle=options["idle-timeout"],
        prepared=options["prepare-timeout"],
        receiving=options["receive-timeout"],
        ready=options["ready-timeout"],
        token=options["token-timeout"],
        commit=options["commit-timeout"],
    )
    return TargetConfig(
        stateDir=state,
        allowedRoots=roots,
        onCommit=options["on-commit"],
        timeouts=timeouts,
        maxSessions=options["max-sessions"],
    )


class ThreadPoolService(service.Service):
    """Starts and stops the daemon's I/O thread pool with the service."""

    def __init__(self, pool: threadpool.ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class TargetService(service.Service):
    """Aborts unfinished sessions when the daemon stops."""

    def __init__(self, target: MigrationTarget) -> None:
        self.target = target

    def stopService(self) -> Any:
        super().stopService()
        return self.target.closeAll("the target daemon is stopping")


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    """Build the daemon; a misconfiguration stops start-up with one clear line."""
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    tuneAllocator()
    try:
        return _makeService(options, reactor)
    except ConfigurationError as e:
        raise SystemExit(f"xenmig: {e}")


def _makeService(options: Options, reactor: Any) -> service.MultiService:
    from xenmig import tls

    state = _stateDir(options["state-dir"])
    config = _config(options, state)
    if not options["insecure-plaintext"]:
        identity = tls.loadIdentity(options["cert"], options["key"])
        authorities = tls.loadAuthority(options["ca"])
    _checkPortFree(options["interface"], options["port"])

    top = service.MultiService()
    pool = threadpool.ThreadPool(2, options["io-threads"], name="xenmig-io")
    ThreadPoolService(pool).setServiceParent(top)

    def runInThread(f: Any, *args: Any, **kw: Any) -> Any:
        return deferToThreadPool(reactor, pool, f, *args, **kw)

    target = MigrationTarget(
        reactor,
        config,
        deviceKinds(),
        runInThread,
        lambda command, env, migrationId: runHook(reactor, command, env, migrationId),
    )
    target.recover()
    TargetService(target).setServiceParent(top)

    if options["insecure-plaintext"]:
        log.warn("INSECURE: plaintext, unauthenticated control on loopback")
        endpoint: Any = TCP4ServerEndpoint(
            reactor, options["port"], interface=options["interface"]
        )
        factory = ControlFactory(target, tls=False)
    else:
        endpoint = tls.serverEndpoint(
            reactor,
            options["port"],
            options["interface"],
            tls.serverOptions(identity, authorities),
        )
        factory = ControlFactory(target, tls=True)
    listener = internet.StreamServerEndpointService(endpoint, factory)
    listener._raiseSynchronously = True
    listener.setServiceParent(top)

    local = UNIXServerEndpoint(
        reactor, state.child("control.sock").path, mode=0o600, wantPID=False
    )
    socketPath = state.child("control.sock")
    if socketPath.exists():
        socketPath.remove()
    internet.StreamServerEndpointService(
        local, LocalControlFactory(target)
    ).setServiceParent(top)
    log.info(
        "xenmig target on {interface}:{port}, state in {state}, roots {roots}",
        interface=options["interface"] or "*",
        port=options["port"],
        state=state.path,
        roots=", ".join(r.path for r in config.roots),
    )
    return top
