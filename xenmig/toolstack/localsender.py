"""
The daemon's local sender: ``xenmig migrate --via-daemon`` run inside the
daemon, as this host (its own certificate and key), with the same
L{MigrateCommand} the command line runs in its own process; what it shows the
operator travels back to the caller as events.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from xenmig.errors import BadSpec, ConfigurationError
from xenmig.model import hostPort
from xenmig.toolstack.outcome import EXIT_USAGE, Reach, UsageError
from xenmig.toolstack.sendrequest import BARS, chunks, requestArgs

log = Logger()

#: Sends one event to the caller (a no-op once the caller has gone).
Emit = Callable[[dict[str, Any]], None]


class ForwardedDisplay:
    """
    A L{ProgressDisplay}'s part for the caller: phase lines, and (when the
    caller draws bars) each device's bytes every ``interval`` seconds.
    """

    def __init__(
        self, reactor: Any, emit: Emit, bars: bool, interval: float = 0.2
    ) -> None:
        self.reactor = reactor
        self.emit = emit
        self.bars = bars
        self.interval = interval
        self.source: Callable[[], Any] | None = None
        self._loop: LoopingCall | None = None

    def phase(self, message: str) -> None:
        for text in chunks(message):
            self.emit({"type": "phase", "message": text})

    def start(self, source: Callable[[], Any], continued: str = "") -> None:
        if not self.bars or self.source is not None:
            return
        self.source = source
        self.emit({"type": "start", "continued": continued, "devices": self._now()})
        self._loop = LoopingCall(self._progress)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self.source is None:
            return
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._progress()
        self.emit({"type": "stop"})
        self.source = None

    def _progress(self) -> None:
        self.emit({"type": "progress", "devices": self._now()})

    def _now(self) -> list[list[Any]]:
        assert self.source is not None
        return [[name, done, expected] for name, done, expected in self.source()]


class ForwardedConsole:
    """A L{TerminalConsole} for the caller: its lines, echoes and the report."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.echo = self

    def say(self, message: str) -> None:
        for text in chunks(message):
            self.emit({"type": "say", "message": text})

    def write(self, text: str) -> None:
        """The pause and resume commands' output."""
        for piece in chunks(text):
            self.emit({"type": "echo", "text": piece})

    def flush(self) -> None:
        """Each write is sent at once."""

    def outcome(self, json: bool, code: int, report: dict[str, Any]) -> None:
        """The report, in pieces; the caller prints it as ``xenmig migrate`` does."""
        import json as _json

        for text in chunks(_json.dumps(report)):
            self.emit({"type": "report", "text": text})


#: Seconds the daemon keeps a committed migration's connection to its target
#: for the next one it sends there (the target closes idle ones after 300 s).
KEEP = 30.0


class LocalSender:
    """
    Sends migrations for the local socket's callers as this host: the client
    identity is the daemon's own certificate and key (``cert``, ``key``), the
    target is checked against its CA file (``ca``).  ``problem``: why it
    cannot send (no TLS identity, a certificate unfit for a client), said to
    every caller.
    """

    def __init__(
        self,
        reactor: Any,
        identity: Any = None,
        authorities: Any = None,
        files: tuple[str, str] = ("", ""),
        problem: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.identity = identity
        self.authorities = authorities
        self.cert, self.ca = files
        self.problem = problem
        #: The control connections its migrations left open, by target and
        #: the TLS checks they passed (address, port, server name, pins).
        self.kept: dict[tuple[Any, ...], Any] = {}

    @classmethod
    def forDaemon(cls, options: Any, reactor: Any) -> LocalSender:
        """The sender of ``twistd xenmig`` with ``options`` (see L{fromFiles})."""
        if options["insecure-plaintext"]:
            problem = "the daemon runs with --insecure-plaintext: it has no identity"
            return cls(reactor, problem=problem)
        return cls.fromFiles(reactor, options["cert"], options["key"], options["ca"])

    @classmethod
    def fromFiles(
        cls, reactor: Any, cert: str | None, key: str | None, ca: str | None
    ) -> LocalSender:
        """
        Blocking (at start-up): load the daemon's identity and check that it
        may authenticate a TLS client; a sender that refuses every caller,
        saying why, if not (the daemon itself runs on).
        """
        from xenmig import tls
        from xenmig.certificates import clientUseProblem

        if not (cert and ca):
            return cls(reactor, problem="the daemon has no --cert and --ca")
        try:
            identity = tls.loadIdentity(cert, key)
            authorities = tls.loadAuthority(ca)
        except ConfigurationError as e:
            return cls(reactor, problem=str(e))
        unfit = clientUseProblem(identity.original.to_cryptography())
        if unfit is not None:
            problem = (
                f"the daemon's certificate {cert} cannot authenticate a TLS client: "
                f"{unfit}; issue one for both uses (xenmig pki issue does)"
            )
            log.warn("--via-daemon: {problem}", problem=problem)
            return cls(reactor, problem=problem)
        return cls(reactor, identity, authorities, (cert, ca))

    def send(self, options: dict[str, Any], emit: Emit) -> LocalSend:
        """Start one migration for a caller; its L{LocalSend}."""
        run = LocalSend(self, options, emit)
        run.done = Deferred.fromCoroutine(run.run())
        return run

    def keptFor(self, args: argparse.Namespace) -> Any:
        """
        The control connections kept (L{KEEP} seconds) to ``args``'s target
        by earlier migrations that passed the same TLS checks: the next
        migration there opens none.
        """
        from xenmig.source.idlepool import IdleConnections

        host, port = args.target
        key = (host, port, args.server_name, tuple(sorted(args.pin_sha256)))
        if key not in self.kept:
            self.kept[key] = IdleConnections(self.reactor, KEEP)
        return self.kept[key]

    def tlsFor(self, args: argparse.Namespace) -> dict[str, Any]:
        """L{MigrationClient}'s TLS keyword arguments, as this host."""
        from xenmig import tls
        from xenmig.source.client import tlsArguments

        name = args.server_name or args.target[0]
        pins = [tls.parsePin(pin) for pin in args.pin_sha256]
        return tlsArguments(name, self.identity, self.authorities, pins)


class LocalSend:
    """One migration sent for a caller of the local socket."""

    def __init__(self, sender: LocalSender, options: dict[str, Any], emit: Emit):
        self.sender = sender
        self.options = options
        self.emit = emit
        self.command: Any = None
        self.done: Deferred[int] = Deferred()

    async def run(self) -> int:
        """Check the options, migrate, report; the exit status."""
        from xenmig.toolstack.migratesetup import buildCommand

        sender, reactor = self.sender, self.sender.reactor
        bars = self.options.get(BARS) is True
        try:
            if sender.problem is not None:
                raise ConfigurationError(f"--via-daemon: {sender.problem}")
            args = requestArgs(self.options)
            reached = Reach(
                hostPort(*args.target),
                remote=True,
                serverName=args.server_name,
                ca=sender.ca,
                cert=sender.cert,
            )
            self.command = buildCommand(
                reactor,
                args,
                lambda: sender.tlsFor(args),
                ForwardedDisplay(reactor, self.emit, bars),
                ForwardedConsole(self.emit),
                reached,
                sender.keptFor(args),
            )
        except (UsageError, ConfigurationError, BadSpec) as e:
            self._refused(e)
            return EXIT_USAGE
        log.info(
            "migration {migration_id} of {domain} to {target}: sending it for "
            "the local socket's caller",
            migration_id=self.command.migration.migrationId,
            domain=args.domain,
            target=reached.where,
        )
        code = int(await self.command.run())
        migration = self.command.migration
        log.info(
            "migration {migration_id} sent for the local socket's caller: "
            "{phase} (exit status {code}) {reason}",
            migration_id=migration.migrationId,
            phase=str(getattr(migration.phase, "value", migration.phase)),
            code=code,
            reason=migration.reason,
        )
        return code

    def _refused(self, error: Exception) -> None:
        """A usage or configuration error, as ``xenmig migrate`` says it."""
        from xenmig.toolstack.failures import errorCode

        code = "USAGE" if isinstance(error, UsageError) else errorCode(error)
        self.emit({"type": "error", "code": code, "message": str(error)[:4096]})

    def interrupt(self) -> None:
        """The caller pressed Ctrl-C, or went: abort as an interrupt does."""
        if self.command is not None:
            self.command.interrupt()
