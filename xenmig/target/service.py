"""The services twistd runs for a target daemon, and its start-up and readiness."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, NoReturn

from twisted.application import service
from twisted.internet import task
from twisted.logger import ILogObserver, Logger
from twisted.python import threadpool
from twisted.python.components import Componentized
from twisted.python.filepath import FilePath

from xenmig.errors import ConfigurationError
from xenmig.model import LOCAL_SOCKET, hostPort
from xenmig.target.authz import PolicySource
from xenmig.target.core import MigrationTarget
from xenmig.target.notify import SystemdNotifier

log = Logger()

#: Seconds between two looks at the peers file's modification time.
PEERS_CHECK_INTERVAL = 2.0
#: Seconds between two checks of this host's certificate's expiry.
EXPIRY_CHECK_INTERVAL = 24 * 3600.0
#: What the daemon logs, first on its line, once every service has started:
#: it listens, has recovered its journal, and answers.
READY_LINE = "xenmig daemon ready"


class TargetDaemon(service.MultiService):
    """
    The top service of ``twistd xenmig``: its children start in order, and a
    start-up error (L{ConfigurationError}) stops twistd with one clear line
    (L{refuseToStart}).  Once they have all started it logs L{READY_LINE},
    and tells the service manager (``READY=1``, when systemd runs it with
    ``Type=notify``); at stop it tells it ``STOPPING=1``.

    @param twistd: twistd's own options (where it keeps the status pipe of a
        daemonized start), if twistd runs it.
    @param observer: the log observer the daemon's options chose: twistd
        installs it as the application's L{ILogObserver} component (unless
        its own ``--logger`` is given).
    """

    def __init__(
        self,
        address: str,
        twistd: MutableMapping[str, Any] | None,
        observer: ILogObserver | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        super().__init__()
        self.address = address
        self.twistd = twistd
        self.observer = observer
        self.notifier = notifier or SystemdNotifier(None)

    def setServiceParent(self, parent: Any) -> None:
        # twistd adds this service to its application, then starts logging
        # to the application's ILogObserver component, if there is one.
        if self.observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        with self._startupErrors():
            super().privilegedStartService()

    def startService(self) -> None:
        with self._startupErrors():
            super().startService()
        log.info(READY_LINE + ": listening on {address}", address=self.address)
        self.notifier.ready(f"listening on {self.address}")

    def stopService(self) -> Any:
        self.notifier.stopping("stopping: aborting unfinished migrations")
        return super().stopService()

    @contextmanager
    def _startupErrors(self) -> Iterator[None]:
        try:
            yield
        except ConfigurationError as e:
            refuseToStart(str(e), self.twistd)


def refuseToStart(message: str, twistd: MutableMapping[str, Any] | None) -> NoReturn:
    """
    Stop twistd at start-up with ``xenmig: message`` and status 1, without a
    traceback: in the log, on the process's own standard error (twistd has
    sent C{sys.stderr} to the log by now), and, when twistd daemonizes, on
    its status pipe, which the waiting parent prints before it exits 1.
    """
    line = f"xenmig: {message}"
    log.error("{line}", line=line)
    stderr = sys.__stderr__
    if stderr is not None:
        stderr.write(line + "\n")
        stderr.flush()
    pipe = twistd.get("statusPipe") if twistd is not None else None
    if pipe is not None:
        assert twistd is not None
        twistd["statusPipe"] = None
        os.write(pipe, b"1 " + line.encode("utf-8", "replace"))
        os.close(pipe)
    raise SystemExit(1)


class TargetService(service.Service):
    """
    The target core in the daemon.  Before the listeners bind: the state
    directory (0700), no stale local socket, and the port free (else a clear
    L{ConfigurationError}).  At start: the journal's recovery (an interrupted
    commit reversed, an on-commit hook that had not run to its end run again
    once the reactor runs), before the reactor runs, so before any connection
    is answered.  At stop: every session that has not begun to commit
    aborts, and a commit under way is let end.
    """

    def __init__(
        self, target: MigrationTarget, interface: str, port: int | None = None
    ) -> None:
        self.target = target
        self.interface = interface
        self.port = port

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        makeStateDir(self.target.config.stateDir, self.target.config.allowedRoots)
        stale = self.target.config.stateDir.child(LOCAL_SOCKET)
        if stale.exists():
            stale.remove()
        if self.port is not None:
            checkPortFree(self.interface, self.port)

    def startService(self) -> None:
        super().startService()
        self.target.recover()

    def stopService(self) -> Any:
        super().stopService()
        return self.target.closeAll("the target daemon is stopping")


def makeStateDir(state: FilePath, allowedRoots: tuple[FilePath, ...]) -> None:
    """
    Blocking: make the state directory (owner-only), and ``devices`` in it
    when it is the allowed root (no ``--allow-root``).

    @raise ConfigurationError: if it cannot be made.
    """
    try:
        state.makedirs(ignoreExistingDirectory=True)
        os.chmod(state.path, 0o700)
        if not allowedRoots:
            state.child("devices").makedirs(ignoreExistingDirectory=True)
    except OSError as e:
        raise ConfigurationError(f"state directory {state.path}: {e.strerror}")


def checkPortFree(interface: str, port: int) -> None:
    """
    Blocking: bind a probe to the port, so that a port in use is one clear line.

    @raise ConfigurationError: if it cannot be bound.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((interface, port))
    except OSError as e:
        where = hostPort(interface, port)
        reason = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise ConfigurationError(f"cannot listen on {where}: {reason}")
    finally:
        probe.close()


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
    L{PEERS_CHECK_INTERVAL} seconds), in the I/O thread pool.  A SIGHUP
    (``systemctl reload``) is told to the service manager (``RELOADING=1``,
    then ``READY=1``); without a peers file it reloads nothing, and says so.

    @param settingsChanged: blocking, run at each SIGHUP: a line naming the
        settings of the configuration file changed since the start (they
        apply at the next start), or None.
    """

    def __init__(
        self,
        source: PolicySource,
        reactor: Any,
        runInThread: Any,
        notifier: SystemdNotifier | None = None,
        settingsChanged: Callable[[], str | None] | None = None,
    ) -> None:
        self.source = source
        self.reactor = reactor
        self.runInThread = runInThread
        self.notifier = notifier or SystemdNotifier(None)
        self.settingsChanged = settingsChanged
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)
        if self.source.path is not None:
            self._loop.start(PEERS_CHECK_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Any:
        """What a SIGHUP does: read the peers again; a Deferred."""
        if self.source.path is None:
            log.info("SIGHUP: no peers file, nothing to read again")
        else:
            log.info(
                "SIGHUP: reading the peers file {path} again", path=self.source.path
            )
        self.notifier.reloading("reading the peers again")

        def reload() -> str:
            loaded = self.source.path is None or self.source.reload()
            changed = self.settingsChanged() if self.settingsChanged else None
            if changed:
                log.warn("{changed}", changed=changed)
            if not loaded:
                return "the peers file did not load: the previous peers stay in force"
            return "peers read again" if self.source.path else "nothing to reload"

        def done(status: str) -> None:
            self.notifier.ready(status)

        def failed(f: Any) -> None:
            log.failure("reading the peers file failed", f)
            self.notifier.ready("reading the peers failed")

        return self.runInThread(reload).addCallbacks(done, failed)

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
        from xenmig.certificates import expiryWarning

        warning = expiryWarning(self.identity)
        if warning:
            log.warn("{warning}", warning=warning)
