"""``twistd xenmig``: the daemon's options and its service."""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
from typing import Any

from twisted.application import internet, service
from twisted.internet import task
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import threadpool, usage
from twisted.python.filepath import FilePath

from xenmig.amp_commands import DEFAULT_PORT, DEFAULT_STATE_DIR
from xenmig.errors import ConfigurationError
from xenmig.factories import ControlFactory, LocalControlFactory
from xenmig.limits import ConnectionLimits
from xenmig.plugins import deviceKinds
from xenmig.target.authz import PolicySource
from xenmig.target.config import TargetConfig, Timeouts
from xenmig.target.core import MigrationTarget
from xenmig.target.hooks import runHook
from xenmig.tuning import tuneAllocator

log = Logger()

#: Seconds between two looks at the peers file's modification time.
PEERS_CHECK_INTERVAL = 2.0
#: Seconds between two checks of this host's certificate's expiry.
EXPIRY_CHECK_INTERVAL = 24 * 3600.0


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
        [
            "peers",
            None,
            None,
            "TOML file of the peers allowed to migrate here, and their limits.",
        ],
        ["max-devices", None, 64, "Devices (and streams) of one migration.", int],
        ["max-connections", None, 512, "Connections open at once.", int],
        ["max-handshakes", None, 64, "TLS handshakes in progress at once.", int],
        [
            "per-address-handshakes",
            None,
            8,
            "TLS handshakes in progress from one address.",
            int,
        ],
        [
            "control-idle-timeout",
            None,
            300.0,
            "Seconds a control connection with nothing running may stay silent.",
            float,
        ],
        ["tls-minimum", None, "1.2", "Lowest TLS version accepted: 1.2 or 1.3."],
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
        for name in (
            "max-sessions",
            "max-devices",
            "max-connections",
            "max-handshakes",
            "per-address-handshakes",
            "io-threads",
        ):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be 1 or more")
        if self["tls-minimum"] not in TLS_VERSIONS:
            raise usage.UsageError("--tls-minimum must be 1.2 or 1.3")
        if self["insecure-plaintext"]:
            if not self["interface"]:
                self["interface"] = "127.0.0.1"
            if not _isLoopback(self["interface"]):
                raise usage.UsageError("--insecure-plaintext binds to loopback only")
        elif not (self["ca"] and self["cert"]):
            raise usage.UsageError("--ca and --cert are required (mutual TLS)")


def _tlsVersions() -> dict[str, Any]:
    from twisted.internet.ssl import TLSVersion

    return {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}


TLS_VERSIONS = ("1.2", "1.3")


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
        maxDevices=options["max-devices"],
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


class PolicyService(service.Service):
    """
    Keeps the peers file in force up to date: read again on SIGHUP, and when
    its modification time, size or inode changes (looked at every
    L{PEERS_CHECK_INTERVAL} seconds), in the I/O thread pool.
    """

    def __init__(self, source: PolicySource, reactor: Any, runInThread: Any) -> None:
        self.source = source
        self.reactor = reactor
        self.runInThread = runInThread
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        if self.source.path is None:
            return
        self._previous = signal.signal(signal.SIGHUP, self._hangup)
        self._loop.start(PEERS_CHECK_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _hangup(self, signum: int, frame: Any) -> None:
        log.info("SIGHUP: reading the peers file again")
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Any:
        return self.runInThread(self.source.reload).addErrback(
            lambda f: log.failure("reading the peers file failed", f)
        )

    def check(self) -> Any:
        def reloadIfChanged() -> None:
            if self.source.changed():
                self.source.reload()

        return self.runInThread(reloadIfChanged).addErrback(
            lambda f: log.failure("checking the peers file failed", f)
        )


class ExpiryService(service.Service):
    """Warns, at start and then daily, when this host's certificate expires soon."""

    def __init__(self, identity: Any, reactor: Any) -> None:
        self.identity = identity
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        self._loop.start(EXPIRY_CHECK_INTERVAL, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        from xenmig import certificates

        warning = certificates.expiryWarning(self.identity)
        if warning:
            log.warn("{warning}", warning=warning)


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
    kinds = deviceKinds()
    policies = PolicySource(options["peers"], config.roots, kinds)
    policies.load()
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
        kinds,
        runInThread,
        lambda command, env, migrationId: runHook(reactor, command, env, migrationId),
        policies,
    )
    target.recover()
    TargetService(target).setServiceParent(top)
    PolicyService(policies, reactor, runInThread).setServiceParent(top)
    if options["peers"] is None:
        log.warn(
            "no --peers file: any host whose certificate chains to --ca may migrate "
            "to this host, any kind, into any --allow-root (see doc/security.md)"
        )
    else:
        log.info(
            "peers file {path}: {count} peer(s) may migrate to this host",
            path=options["peers"],
            count=len(policies.policy.entries),
        )
    limits = ConnectionLimits(
        connections=options["max-connections"],
        handshakes=options["max-handshakes"],
        handshakesPerAddress=options["per-address-handshakes"],
        idle=options["control-idle-timeout"] or None,
    )

    if options["insecure-plaintext"]:
        log.warn("INSECURE: plaintext, unauthenticated control on loopback")
        endpoint: Any = TCP4ServerEndpoint(
            reactor, options["port"], interface=options["interface"]
        )
        factory = ControlFactory(target, tls=False, limits=limits)
    else:
        endpoint = tls.serverEndpoint(
            reactor,
            options["port"],
            options["interface"],
            tls.serverOptions(
                identity, authorities, _tlsVersions()[options["tls-minimum"]]
            ),
        )
        factory = ControlFactory(target, tls=True, limits=limits)
        ExpiryService(identity, reactor).setServiceParent(top)
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
