"""``twistd xenmig``: the daemon's options, and makeService, which assembles it."""

from __future__ import annotations

import ipaddress
import os
from functools import partial
from typing import Any

from twisted.application import internet, service
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import threadpool, usage
from twisted.python.filepath import FilePath

from xenmig.errors import ConfigurationError
from xenmig.factories import ControlFactory, LocalControlFactory
from xenmig.fs import InstallAs, parseMode, parseOwner
from xenmig.limits import ConnectionLimits
from xenmig.model import DEFAULT_PORT, DEFAULT_STATE_DIR, hostPort, parseBandwidth
from xenmig.plugins import deviceKinds
from xenmig.target.authz import PolicySource
from xenmig.target.config import MAX_DEVICES, MAX_SESSIONS, TargetConfig, Timeouts
from xenmig.target.configfile import DAEMON_CONFIG, settingsChanged
from xenmig.target.configoptions import ConfigFileOptions
from xenmig.target.core import MigrationTarget
from xenmig.target.hooks import runHook
from xenmig.target.logobserver import checkLogging, daemonObserver
from xenmig.target.metrics import PrometheusMetrics
from xenmig.target.metricsweb import MetricsService, parseAddress
from xenmig.target.notify import SystemdNotifier
from xenmig.target.service import (
    LOCAL_SOCKET,
    ExpiryService,
    PolicyService,
    TargetDaemon,
    TargetService,
    ThreadPoolService,
)
from xenmig.toolstack.localsender import LocalSender
from xenmig.tuning import tuneAllocator

log = Logger()

#: Where every default comes from: the daemon's option defaults are these.
_TIMEOUTS = Timeouts()
_LIMITS = ConnectionLimits()


class Options(ConfigFileOptions, usage.Options):
    """Options of ``twistd xenmig``."""

    synopsis = "[options]"
    longdesc = (
        "Receive migrations of virtual machine device state (vTPM, disks, device "
        "model) from peer hosts over mutual TLS."
    )
    optParameters = [
        ["port", "p", DEFAULT_PORT, "TCP port to listen on.", int],
        [
            "interface",
            "i",
            "",
            "Address to listen on (default: all IPv4; :: for all).",
        ],
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
        [
            "handshake-timeout",
            None,
            _TIMEOUTS.handshake,
            "Seconds for a TLS handshake.",
            float,
        ],
        [
            "idle-timeout",
            None,
            _TIMEOUTS.idle,
            "Seconds a stream may stay silent.",
            float,
        ],
        [
            "stall-timeout",
            None,
            _TIMEOUTS.stall,
            "Seconds a stream may make no progress while it should (0: never).",
            float,
        ],
        [
            "prepare-timeout",
            None,
            _TIMEOUTS.prepared,
            "Seconds from Prepare to a stream.",
            float,
        ],
        [
            "receive-timeout",
            None,
            _TIMEOUTS.receiving,
            "Seconds to receive every device.",
            float,
        ],
        [
            "ready-timeout",
            None,
            _TIMEOUTS.ready,
            "Seconds a READY session waits to commit.",
            float,
        ],
        [
            "token-timeout",
            None,
            _TIMEOUTS.token,
            "Seconds a stream token stays valid.",
            float,
        ],
        [
            "commit-timeout",
            None,
            _TIMEOUTS.commit,
            "Seconds each device may take to install.",
            float,
        ],
        [
            "reconnect-grace",
            None,
            _TIMEOUTS.reconnect,
            "Seconds a migration waits for a lost connection to come back (0: abort).",
            float,
        ],
        ["max-sessions", None, MAX_SESSIONS, "Concurrent migrations accepted.", int],
        ["io-threads", None, 8, "Threads for file I/O and hashing.", int],
        [
            "peers",
            None,
            None,
            "TOML file of the peers allowed to migrate here, and their limits.",
        ],
        [
            "max-devices",
            None,
            MAX_DEVICES,
            "Devices (and streams) of one migration.",
            int,
        ],
        [
            "max-connections",
            None,
            _LIMITS.connections,
            "Connections open at once.",
            int,
        ],
        [
            "max-handshakes",
            None,
            _LIMITS.handshakes,
            "TLS handshakes in progress at once.",
            int,
        ],
        [
            "per-address-handshakes",
            None,
            _LIMITS.handshakesPerAddress,
            "TLS handshakes in progress from one address.",
            int,
        ],
        [
            "control-idle-timeout",
            None,
            _LIMITS.idle,
            "Seconds a control connection with nothing running may stay silent.",
            float,
        ],
        [
            "max-bandwidth",
            None,
            None,
            "Bytes per second all incoming streams receive together (e.g. 1G; "
            "K, M, G are powers of 1024), shared fairly; default: no limit.",
        ],
        [
            "image-owner",
            None,
            None,
            "USER[:GROUP] of installed images (default: the daemon's user).",
        ],
        [
            "image-mode",
            None,
            None,
            "Octal mode of installed images (default: the source's, else 0600).",
        ],
        ["tls-minimum", None, "1.2", "Lowest TLS version accepted: 1.2 or 1.3."],
        ["log-level", None, "info", "Lowest level logged: debug, info, warn, error."],
        ["log-format", None, "text", "text, or json: one object per line."],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics on [HOST:]PORT/metrics (host: 127.0.0.1).",
        ],
        [
            "config",
            "c",
            None,
            f"TOML file of these options (default: {DAEMON_CONFIG}, if it exists);"
            " the command line overrides it.",
        ],
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
        self.file = None
        self.sources = {}

    def opt_allow_root(self, path: str) -> None:
        """A directory where received state may be installed (repeatable)."""
        self["allow-root"].append(path)

    def opt_version(self) -> None:
        """Print xenmig's version and exit."""
        from xenmig import version

        print(f"twistd xenmig (xenmig) {version()}")
        raise SystemExit(0)

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
                raise usage.UsageError(f"{self.named(name)} must be 1 or more")
        if not self["reconnect-grace"] >= 0:
            raise usage.UsageError(
                f"{self.named('reconnect-grace')} must be 0 or more seconds"
            )
        interface = self["interface"]
        if interface.startswith("[") and interface.endswith("]"):
            self["interface"] = interface[1:-1]  # [2001:db8::1] as written elsewhere
        if self["stall-timeout"] < 0:
            raise usage.UsageError(
                f"{self.named('stall-timeout')} must be 0 (never) or more"
            )
        if self["max-bandwidth"] is not None:
            try:
                self["max-bandwidth"] = parseBandwidth(self["max-bandwidth"])
            except ValueError as e:
                raise usage.UsageError(f"{self.named('max-bandwidth')}: {e}")
        if self["tls-minimum"] not in TLS_VERSIONS:
            raise usage.UsageError(f"{self.named('tls-minimum')} must be 1.2 or 1.3")
        if self["insecure-plaintext"]:
            if not self["interface"]:
                self["interface"] = "127.0.0.1"
            if not _isLoopback(self["interface"]):
                raise usage.UsageError("--insecure-plaintext binds to loopback only")
        elif not (self["ca"] and self["cert"]):
            raise usage.UsageError(
                "--ca and --cert are required (mutual TLS): on the command line, "
                "or as ca and cert in the configuration file"
            )
        self._checkObservability()

    def _checkObservability(self) -> None:
        twistd = getattr(self, "parent", None) or {}
        try:
            checkLogging(self["log-level"], self["log-format"], twistd)
            if self["metrics"] is not None:
                parseAddress(self["metrics"])
        except ValueError as e:
            raise usage.UsageError(str(e))


TLS_VERSIONS = ("1.2", "1.3")


def _isLoopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _config(options: Options) -> TargetConfig:
    state = FilePath(os.path.abspath(options["state-dir"]))
    roots = tuple(FilePath(os.path.abspath(p)) for p in options["allow-root"])
    for root in roots:
        if not root.isdir():
            raise ConfigurationError(
                f"{options.named('allow-root')} {root.path} is not a directory"
            )
    timeouts = Timeouts(
        handshake=options["handshake-timeout"],
        idle=options["idle-timeout"],
        stall=options["stall-timeout"],
        prepared=options["prepare-timeout"],
        receiving=options["receive-timeout"],
        ready=options["ready-timeout"],
        token=options["token-timeout"],
        commit=options["commit-timeout"],
        reconnect=options["reconnect-grace"],
    )
    try:
        installAs = InstallAs()
        if options["image-owner"]:
            installAs = parseOwner(options["image-owner"])
        if options["image-mode"]:
            installAs = InstallAs(mode=parseMode(options["image-mode"])).over(installAs)
    except ValueError as e:
        raise ConfigurationError(f"--image-owner/--image-mode: {e}")
    return TargetConfig(
        stateDir=state,
        installAs=installAs,
        allowedRoots=roots,
        onCommit=options["on-commit"],
        timeouts=timeouts,
        maxSessions=options["max-sessions"],
        maxDevices=options["max-devices"],
        maxBandwidth=options["max-bandwidth"],
    )


def _limits(options: Options) -> ConnectionLimits:
    return ConnectionLimits(
        connections=options["max-connections"],
        handshakes=options["max-handshakes"],
        handshakesPerAddress=options["per-address-handshakes"],
        idle=options["control-idle-timeout"] or None,
    )


def checkConfiguration(options: Options) -> None:
    """
    Blocking: check what makeService reads (roots, the peers, the TLS files)
    without building anything; for ``xenmig config check``.

    @raise ConfigurationError: saying what is wrong.
    """
    from xenmig import tls

    config = _config(options)
    settings = options.settingKinds() if options.peersInConfig else ()
    PolicySource(options["peers"], config.roots, deviceKinds(), settings).load()
    if not options["insecure-plaintext"]:
        tls.loadIdentity(options["cert"], options["key"])
        tls.loadAuthority(options["ca"])


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    """
    Assemble the daemon (it does nothing until twistd starts it: see
    L{xenmig.target.service}); a misconfiguration found here or at start-up
    stops it with one clear line.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    tuneAllocator()
    try:
        return _makeService(options, reactor)
    except ConfigurationError as e:
        raise SystemExit(f"xenmig: {e}")


def _makeService(options: Options, reactor: Any) -> service.MultiService:
    config = _config(options)
    kinds = deviceKinds()
    settings = options.settingKinds() if options.peersInConfig else ()
    policies = PolicySource(options["peers"], config.roots, kinds, settings)
    policies.load()
    _logPolicy(options["peers"], policies)
    address = hostPort(options["interface"], options["port"])
    twistd = getattr(options, "parent", None)
    observer = None
    if twistd is not None and not twistd.get("logger"):  # twistd's --logger wins
        level, form = options["log-level"], options["log-format"]
        observer = daemonObserver(level, form, twistd, reactor)
    notifier = SystemdNotifier.fromEnvironment(os.environ)
    top = TargetDaemon(address, twistd, observer, notifier)
    pool = threadpool.ThreadPool(2, options["io-threads"], name="xenmig-io")
    ThreadPoolService(pool).setServiceParent(top)

    def runInThread(f: Any, *args: Any, **kw: Any) -> Any:
        return deferToThreadPool(reactor, pool, f, *args, **kw)

    def hook(command: str, env: dict[str, str], migrationId: str) -> Any:
        return runHook(reactor, command, env, migrationId)

    metrics = PrometheusMetrics(kinds) if options["metrics"] else None
    target = MigrationTarget(
        reactor, config, kinds, runInThread, hook, policies, metrics
    )
    TargetService(target, options["interface"], options["port"]).setServiceParent(top)
    changed = None
    if options.file is not None:
        changed = partial(settingsChanged, options.file, options.settingKinds())
    PolicyService(policies, reactor, runInThread, notifier, changed).setServiceParent(
        top
    )
    _listen(options, reactor, target, metrics).setServiceParent(top)
    local = UNIXServerEndpoint(
        reactor, config.stateDir.child(LOCAL_SOCKET).path, mode=0o600, wantPID=False
    )
    factory = LocalControlFactory(target, LocalSender.forDaemon(options, reactor))
    internet.StreamServerEndpointService(local, factory).setServiceParent(top)
    if config.maxBandwidth:
        log.info(
            "incoming streams limited to {rate} bytes/s in all",
            rate=config.maxBandwidth,
        )
    log.info(
        "xenmig target on {address}, state in {state}, roots {roots}",
        address=address,
        state=config.stateDir.path,
        roots=", ".join(r.path for r in config.roots),
    )
    if metrics is not None:
        host, port = parseAddress(options["metrics"])
        served = MetricsService(reactor, host, port, metrics.registry)
        served.setServiceParent(top)
        log.info("metrics on http://{where}/metrics", where=served.where)
    return top


def _logPolicy(path: str | None, policies: PolicySource) -> None:
    if path is None:
        log.warn(
            "no --peers file: any host whose certificate chains to --ca may migrate "
            "to this host, any kind, into any --allow-root (see doc/security.md)"
        )
    else:
        log.info(
            "peers file {path}: {count} peer(s) may migrate to this host",
            path=path,
            count=len(policies.policy.entries),
        )


def _listen(
    options: Options,
    reactor: Any,
    target: MigrationTarget,
    metrics: PrometheusMetrics | None = None,
) -> service.MultiService:
    """The port's listener (and, with TLS, the certificate's expiry warnings)."""
    from xenmig import tls

    services = service.MultiService()
    limits = _limits(options)
    if options["insecure-plaintext"]:
        log.warn("INSECURE: plaintext, unauthenticated control on loopback")
        endpoint: Any = TCP4ServerEndpoint(
            reactor, options["port"], interface=options["interface"]
        )
        factory = ControlFactory(target, tls=False, limits=limits)
    else:
        identity = tls.loadIdentity(options["cert"], options["key"])
        authorities = tls.loadAuthority(options["ca"])
        from twisted.internet.ssl import TLSVersion

        versions = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
        minimum = versions[options["tls-minimum"]]
        endpoint = tls.serverEndpoint(
            reactor,
            options["port"],
            options["interface"],
            tls.serverOptions(identity, authorities, minimum),
        )
        factory = ControlFactory(target, tls=True, limits=limits)
        ExpiryService(identity, reactor).setServiceParent(services)
    if metrics is not None:
        metrics.watchConnections(factory.gate)
    listener = internet.StreamServerEndpointService(endpoint, factory)
    listener._raiseSynchronously = True
    listener.setServiceParent(services)
    return services
