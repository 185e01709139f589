"""Child processes of the CLI and the demo: shell commands and xenmig daemons."""

from __future__ import annotations

import os
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: How twistd is started: the same interpreter as ours, so the same xenmig.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
#: What a daemon logs once every service started (xenmig.target.service.READY_LINE,
#: which this room may not import; a test keeps the two equal).
READY_LINE = "xenmig daemon ready"


class ProcessFailed(Exception):
    """A child process could not be started, failed, or did not finish in time."""


def freePort(interface: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind port 0, read it, close)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((interface, 0))
        return int(probe.getsockname()[1])
    finally:
        probe.close()


class ChildProcess(ProcessProtocol):
    """
    One spawned child: remembers the tail of its output and fires ``ended`` with
    its exit status (a negative number for a signal).
    """

    def __init__(self, name: str, echo: Any = None, keep: int = 40) -> None:
        self.name = name
        self.echo = echo
        self.output: deque[bytes] = deque(maxlen=keep)
        self.ended: Deferred[int] = Deferred()
        self.status: int | None = None
        self._partial = b""

    @property
    def pid(self) -> int | None:
        return self.transport.pid if self.transport is not None else None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if self.echo is not None:
            self.echo.write(data.decode("utf-8", "replace"))
            self.echo.flush()
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        self.output.extend(line[-4096:] for line in lines)

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self.output.append(self._partial)
        if reason.check(ProcessDone):
            self.status = 0
        else:
            value = reason.value
            code = getattr(value, "exitCode", None)
            signal = getattr(value, "signal", None)
            self.status = code if code is not None else -(signal or 1)
        self.ended.callback(self.status)

    def tail(self, lines: int = 5) -> str:
        """The last ``lines`` lines the child wrote, joined with `` | ``."""
        chosen = [line.decode("utf-8", "replace").strip() for line in self.output]
        return " | ".join(line for line in chosen[-lines:] if line)

    def signal(self, name: str) -> None:
        """Send a signal (``"TERM"``, ``"KILL"``) unless the child has ended."""
        if self.status is None and self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    async def stop(self, reactor: Any, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status."""
        if self.status is not None:
            return self.status
        self.signal("TERM")
        if await _within(reactor, self.ended, grace):
            assert self.status is not None
            return self.status
        log.warn("{name} ignored SIGTERM; killing it", name=self.name)
        self.signal("KILL")
        return await self.ended


def fireOnce(d: Deferred[Any], value: Any) -> None:
    """Fire ``d`` with ``value`` unless it has fired already."""
    if not d.called:
        d.callback(value)


async def _within(reactor: Any, d: Deferred[Any], seconds: float) -> bool:
    """Wait up to ``seconds`` for ``d`` (without consuming its result)."""
    if d.called:
        return True
    waiter: Deferred[bool] = Deferred()

    def fired(result: Any) -> Any:
        fireOnce(waiter, True)
        return result

    call = reactor.callLater(seconds, fireOnce, waiter, False)
    d.addBoth(fired)
    done = await waiter
    if call.active():
        call.cancel()
    return done


async def runShell(
    reactor: Any,
    command: str,
    timeout: float,
    env: Mapping[str, str] | None = None,
    echo: Any = None,
) -> ChildProcess:
    """
    Run ``/bin/sh -c command`` and wait for it; the ended child (its ``status``
    and the tail of its output).  Its output is also written to ``echo``.

    @raise ProcessFailed: if it does not end within ``timeout`` seconds (it is
        then terminated).
    """
    child = ChildProcess(command, echo=echo)
    environment = dict(os.environ)
    environment.update(env or {})
    reactor.spawnProcess(child, "/bin/sh", ["/bin/sh", "-c", command], env=environment)
    if not await _within(reactor, child.ended, timeout):
        await child.stop(reactor, grace=2.0)
        raise ProcessFailed(f"{command!r} did not finish within {timeout:g} s")
    return child


def daemonArgv(
    options: Sequence[str], logFile: str, twistdOptions: Sequence[str] = ()
) -> list[str]:
    """
    The command line of a ``twistd -n xenmig`` daemon: in the foreground, no pid
    file, its log in ``logFile``; ``options`` are xenmig's (``--port``, ``--ca``,
    ...), ``twistdOptions`` twistd's own (e.g. profiling).  It reads no
    configuration file (not the host's ``/etc/xenmig/xenmigd.toml``) unless
    ``options`` give ``--config``.
    """
    return [
        *TWISTD,
        "-n",
        "--pidfile=",
        "--logfile",
        logFile,
        *twistdOptions,
        "xenmig",
        "--config=",
        *options,
    ]


def logSaysReady(logFile: str | os.PathLike[str]) -> bool:
    """
    Blocking (reads the whole log: for tests and benchmarks): whether a daemon's
    log says it listens on all its ports (L{READY_LINE}).
    """
    try:
        with open(logFile, encoding="utf-8", errors="replace") as f:
            return READY_LINE in f.read()
    except FileNotFoundError:
        return False


class Daemon:
    """
    A ``twistd -n xenmig`` daemon run as a child process by the reactor, for the
    demo and the benchmarks (the tests' fixtures run theirs with L{daemonArgv}).

    @param options: the options after ``xenmig`` (``--port``, ``--ca``, ...).
    @param logFile: where twistd writes its log.
    """

    def __init__(
        self,
        reactor: Any,
        name: str,
        options: Sequence[str],
        logFile: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.options = list(options)
        self.logFile = logFile
        self.env = env
        self.child: ChildProcess | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def argv(self) -> list[str]:
        """The full command line of the daemon."""
        return daemonArgv(self.options, self.logFile)

    async def start(
        self, ready: Callable[[], Awaitable[Any]], timeout: float = 20.0
    ) -> None:
        """
        Start the daemon and poll ``ready`` (e.g. a TLS call to its port) until it
        succeeds.

        @raise ProcessFailed: if the daemon exits, or is not ready in ``timeout``
            seconds (it is then stopped); with what it last wrote.
        """
        environment = dict(os.environ)
        environment.update(self.env or {})
        self.child = ChildProcess(self.name)
        argv = self.argv()
        self.reactor.spawnProcess(self.child, argv[0], argv, env=environment)
        deadline = self.reactor.seconds() + timeout
        problem = ""
        while self.reactor.seconds() < deadline:
            if self.child.status is not None:
                raise ProcessFailed(
                    f"{self.name} exited with status {self.child.status}: "
                    f"{self.child.tail() or self.logTail()}"
                )
            try:
                await ready()
                return
            except Exception as e:
                problem = str(e) or repr(e)
            await deferLater(self.reactor, 0.1, lambda: None)
        await self.stop()
        raise ProcessFailed(
            f"{self.name} was not ready within {timeout:g} s ({problem}): "
            f"{self.logTail()}"
        )

    def stop(self, grace: float = 5.0) -> Deferred[int]:
        """SIGTERM, then SIGKILL after ``grace`` seconds; fires with the status."""
        if self.child is None:
            return succeed(0)
        return Deferred.fromCoroutine(self.child.stop(self.reactor, grace))

    def logTail(self, lines: int = 5) -> str:
        """Blocking (small file): the last lines of the daemon's log."""
        try:
            with open(self.logFile, "rb") as f:
                text = f.read()[-8192:].decode("utf-8", "replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])
