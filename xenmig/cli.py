"""
The ``xenmig`` command line: migrate, status, abort, await, pki, kinds and demo.

Exit statuses: 0 success (a committed migration); 1 the migration aborted (the
source may resume its VM) or the step failed; 2 a usage or configuration error;
3 the commit is in doubt (do not resume the VM on the source: ask the target).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from zope.interface import provider

from xenmig.errors import (
    BadSpec,
    CommitInDoubt,
    ConfigurationError,
    MigrationAborted,
    XenmigError,
)
from xenmig.localcontrol import LocalControl
from xenmig.model import DeviceSpec, MigrationStatus
from xenmig.processes import fireOnce
from xenmig.progress import (
    ProgressDisplay,
    formatBytes,
    formatRate,
    formatSeconds,
    statusDetail,
    statusTable,
)
from xenmig.tuning import tuneAllocator

if TYPE_CHECKING:
    from xenmig.client import SourceMigration

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_IN_DOUBT = 3

DEFAULT_PORT = 8002
DEFAULT_STATE_DIR = "/var/lib/xenmig"
_MIGRATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class UsageError(Exception):
    """The command line cannot work; the message is one line for the operator."""


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as one line (and exit status 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


# -- argument types --------------------------------------------------------------------


def parseTarget(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``, port 8002) -> ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    if not host or any(c.isspace() or c in "/[]@" for c in host):
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be 1-65535")
    return host, int(port)


def parseDevice(text: str) -> DeviceSpec:
    """A ``--device KIND:NAME:key=val,...`` argument."""
    try:
        return DeviceSpec.parse(text)
    except BadSpec as e:
        raise argparse.ArgumentTypeError(str(e))


def parseMigrationId(text: str) -> str:
    if not _MIGRATION_ID.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a migration id (1-64 letters, digits, '_', '.', '-')"
        )
    return text


def positive(kind: type) -> Any:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
        return value

    convert.__name__ = kind.__name__
    return convert


# -- the parser ------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log what happens (structured events) to stderr",
    )


def _remote(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--target",
        required=required,
        type=parseTarget,
        metavar="HOST:PORT",
        help="the target daemon (port 8002 if left out)",
    )
    parser.add_argument("--ca", metavar="FILE", help="PEM bundle of the CA(s)")
    parser.add_argument(
        "--cert", metavar="FILE", help="this host's certificate (and key, unless --key)"
    )
    parser.add_argument("--key", metavar="FILE", help="this host's private key")
    parser.add_argument(
        "--server-name",
        metavar="NAME",
        help="name or address in the target's certificate (default: HOST)",
    )
    parser.add_argument(
        "--pin-sha256",
        action="append",
        default=[],
        metavar="HEX",
        help="the target's certificate must have this SHA-256 fingerprint "
        "(repeatable: any of them)",
    )
    parser.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="DEVELOPMENT ONLY: no TLS, to a daemon on loopback",
    )


def _local(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"the local daemon's state directory (default {DEFAULT_STATE_DIR})",
    )


def parser() -> argparse.ArgumentParser:
    """The whole ``xenmig`` command line."""
    top = _Parser(
        prog="xenmig",
        description="Migrate VM device state between hosts (see doc/cli.md).",
        epilog="exit status: 0 success, 1 aborted/failed, 2 usage or configuration "
        "error, 3 commit in doubt",
    )
    top.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    migrate = sub.add_parser("migrate", help="migrate device state to a target host")
    _common(migrate)
    _remote(migrate, required=True)
    migrate.add_argument("--domain", required=True, help="the VM's name")
    migrate.add_argument(
        "--device",
        action="append",
        required=True,
        type=parseDevice,
        metavar="KIND:NAME:key=val,...",
        help="a device (repeatable); target-side keys start with 'target'",
    )
    migrate.add_argument("--migration-id", type=parseMigrationId, metavar="ID")
    migrate.add_argument(
        "--json", action="store_true", help="print the report as JSON on stdout"
    )
    migrate.add_argument(
        "--live",
        action="store_true",
        help="pre-copy while the VM runs, then pause it with --pause-command",
    )
    migrate.add_argument("--pause-command", metavar="CMD", help="pauses the VM")
    migrate.add_argument(
        "--domain-control",
        metavar="xl|qmp:PATH|none",
        help="pause the VM (and resume it after a failure, release it after the "
        "commit) through xl or QEMU's QMP, instead of commands",
    )
    migrate.add_argument(
        "--resume-command", metavar="CMD", help="resumes the VM here after a failure"
    )
    migrate.add_argument(
        "--max-rounds", type=positive(int), metavar="N", help="pre-copy rounds at most"
    )
    migrate.add_argument(
        "--convergence",
        metavar="rounds=N,threshold=SIZE,shrink=F",
        help="pre-copy convergence policy",
    )
    migrate.add_argument(
        "--command-timeout",
        type=positive(float),
        default=120.0,
        metavar="S",
        help="seconds the pause and resume commands may take (default 120)",
    )
    migrate.set_defaults(main=_migrate)

    status = sub.add_parser("status", help="show migrations on a target host")
    _common(status)
    status.add_argument("migration_id", nargs="?", metavar="ID")
    _local(status)
    _remote(status, required=False)
    status.add_argument("--json", action="store_true", help="print JSON on stdout")
    status.add_argument("--limit", type=positive(int), default=50, metavar="N")
    status.set_defaults(main=_status)

    abort = sub.add_parser("abort", help="abort a migration before it commits")
    _common(abort)
    abort.add_argument("migration_id", metavar="ID")
    abort.add_argument("--reason", default="aborted by the operator", metavar="TEXT")
    _local(abort)
    _remote(abort, required=False)
    abort.set_defaults(main=_abort)

    wait = sub.add_parser(
        "await", help="on the target: wait until a migration of a domain commits"
    )
    _common(wait)
    wait.add_argument("--domain", required=True, help="the VM's name")
    wait.add_argument(
        "--migration-id",
        type=parseMigrationId,
        metavar="ID",
        help="wait for this migration (even if already claimed)",
    )
    wait.add_argument(
        "--timeout", type=positive(float), default=3600.0, metavar="S", help="seconds"
    )
    _local(wait)
    wait.add_argument("--json", action="store_true", help="print JSON on stdout")
    wait.add_argument(
        "--resume",
        action="store_true",
        help="once committed, resume the VM here through --domain-control",
    )
    wait.add_argument(
        "--domain-control",
        metavar="xl|qmp:PATH",
        help="how --resume resumes the VM (default xl)",
    )
    wait.set_defaults(main=_await)

    sub.add_parser(
        "pki", help="make the CA and host certificates (xenmig pki --help)"
    ).set_defaults(main=None)

    kinds = sub.add_parser("kinds", help="list the installed device kinds")
    _common(kinds)
    kinds.set_defaults(main=_kinds)

    demo = sub.add_parser(
        "demo", help="run two daemons here and migrate real state between them"
    )
    _common(demo)
    demo.add_argument("--keep", action="store_true", help="keep the temp directory")
    demo.add_argument(
        "--size-mib", type=positive(int), default=64, metavar="N", help="file size"
    )
    demo.set_defaults(main=_demo)
    return top


# -- entry point -----------------------------------------------------------------------


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``xenmig`` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["pki"]:
        from xenmig import pki

        sys.exit(pki.main(arguments[1:]))
    try:
        args = parser().parse_args(arguments)
    except UsageError as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_USAGE)
    startLogging(args.verbose)
    tuneAllocator()
    react(_entry, (args,))


def startLogging(verbose: bool) -> None:
    """The CLI's only log observer: text events on stderr, or nothing at all."""
    if verbose:
        observer = FilteringLogObserver(
            textFileLogObserver(sys.stderr),
            [LogLevelFilterPredicate(LogLevel.info)],
        )
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    else:
        globalLogBeginner.beginLoggingTo(
            [_discard], discardBuffer=True, redirectStandardIO=False
        )


@provider(ILogObserver)
def _discard(event: dict[str, Any]) -> None:
    """Without --verbose the command line logs nothing."""


def say(args: argparse.Namespace, message: str) -> None:
    """One line for the operator on stderr, named after the subcommand."""
    print(f"xenmig {args.command}: {message}", file=sys.stderr, flush=True)


async def _entry(reactor: Any, args: argparse.Namespace) -> NoReturn:
    """Run the subcommand; map configuration errors onto exit status 2."""
    try:
        code = await args.main(reactor, args)
    except (UsageError, ConfigurationError, BadSpec) as e:
        say(args, f"error: {e}")
        code = EXIT_USAGE
    raise SystemExit(code)


# -- connections -----------------------------------------------------------------------


def clientTLS(args: argparse.Namespace) -> dict[str, Any]:
    """
    The TLS keyword arguments of L{MigrationClient} for ``--target``: Twisted
    options for control, an C{ssl} context for the threaded state streams
    (``tls=None`` with ``--insecure-plaintext``).  Reads the files at once.

    @raise UsageError, ConfigurationError: one line naming the problem.
    """
    from xenmig import tls

    host, _ = args.target
    if args.insecure_plaintext:
        if not _isLoopback(host):
            raise UsageError("--insecure-plaintext only connects to loopback")
        say(args, "INSECURE: plaintext, no authentication (development only)")
        return {"tls": None}
    if not (args.ca and args.cert):
        raise UsageError(
            "--ca and --cert are required with --target (mutual TLS); "
            "make them with 'xenmig pki'"
        )
    from xenmig.bulk import sslContext

    identity = tls.loadIdentity(args.cert, args.key)
    authorities = tls.loadAuthority(args.ca)
    name = args.server_name or host
    pins = [tls.parsePin(pin) for pin in args.pin_sha256]
    return {
        "tls": tls.clientOptions(name, identity, authorities, pins),
        "sslContext": sslContext(identity, authorities, pins),
        "serverName": name,
    }


def _isLoopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def remoteClient(reactor: Any, args: argparse.Namespace) -> Any:
    """A MigrationClient for ``--target`` with the TLS options of the command line."""
    from xenmig.client import MigrationClient

    host, port = args.target
    return MigrationClient(reactor, host, port, **clientTLS(args))


def _daemon(reactor: Any, args: argparse.Namespace) -> Any:
    """The daemon the command speaks to: ``--target`` over TLS, else the local one."""
    if args.target is not None:
        return remoteClient(reactor, args)
    return LocalControl(reactor, args.state_dir)


def _where(args: argparse.Namespace) -> str:
    if args.target is not None:
        return "{}:{}".format(*args.target)
    return os.path.join(args.state_dir, "control.sock")


def describeError(error: BaseException) -> str:
    """A one-line description of a failure, whatever its type."""
    from OpenSSL.SSL import Error as TLSError
    from service_identity import VerificationError

    if isinstance(error, XenmigError):
        return str(error)
    if isinstance(error, VerificationError):
        return (
            "the target's certificate does not name the host connected to: give "
            "--server-name with a name from its certificate"
        )
    if isinstance(error, TLSError):
        from xenmig.tls import recentRefusals

        reasons = " ".join(str(part[-1]) for part in error.args[0] if part)
        if "certificate verify failed" in reasons and recentRefusals:
            return f"TLS failed: {recentRefusals[-1]}"
        for clue, meaning in _TLS_REASONS:
            if clue in reasons:
                return f"TLS failed ({reasons}): {meaning}"
        return f"TLS failed ({reasons}); check --ca, --cert, --key and --server-name"
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


_TLS_REASONS = [
    (
        "unknown ca",
        "the target does not trust this host's certificate (--cert is not "
        "issued by a CA the target's --ca holds)",
    ),
    (
        "certificate verify failed",
        "the target's certificate does not chain to --ca",
    ),
    ("certificate required", "the target requires this host's certificate"),
    (
        "certificate expired",
        "the target refused this host's certificate as expired: renew --cert "
        "(xenmig pki issue)",
    ),
    (
        "bad certificate",
        "the target refused this host's certificate (not yet valid? check the "
        "clocks of both hosts)",
    ),
]


# -- xenmig migrate --------------------------------------------------------------------


class PauseFailed(XenmigError):
    """The toolstack's pause command failed or did not finish in time."""


class MigrateCommand:
    """
    One ``xenmig migrate``: prepare, [pre-copy, pause the VM,] transfer, commit;
    on a failure, abort (and with ``--live``, resume the VM here).
    """

    def __init__(
        self,
        reactor: Any,
        migration: SourceMigration,
        args: argparse.Namespace,
        display: ProgressDisplay,
        policy: Any = None,
        control: Any = None,
    ) -> None:
        self.reactor = reactor
        self.migration = migration
        self.args = args
        self.display = display
        self.policy = policy
        self.control = control  # an IDomainControl, or None
        self.released: bool | None = None
        self.target = "{}:{}".format(*args.target)
        self.pause: dict[str, Any] | None = None
        self.resumed: bool | None = None
        self.interrupted = False
        self.done: Deferred[None] = Deferred()

    async def run(self) -> int:
        """Migrate; print the outcome; the exit status."""
        trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", self._interrupt
        )
        try:
            code = await self._run()
        finally:
            self.display.stop()
            if not self.interrupted:
                self.reactor.removeSystemEventTrigger(trigger)
        self._output(code)
        self.done.callback(None)
        return code

    async def _run(self) -> int:
        migration = self.migration
        try:
            self.display.phase(
                f"migration {migration.migrationId} of {self.args.domain} to "
                f"{self.target}: preparing {len(self.args.device)} device(s)"
            )
            await migration.prepare(self.args.device)
            self._goOn()
            self.display.phase("the target accepted every device")
            if self.args.live:
                await self._precopy()
                self._goOn()  # never pause the VM after an interrupt
            if self.args.live or self.control is not None:
                await self._pauseVM()
                self._goOn()
            await self._transfer()
            self._goOn()
        except Exception as e:
            return await self._failed(e)
        try:
            self.display.phase("committing")
            await migration.commit()
        except CommitInDoubt as e:
            return self._inDoubt(e)
        except Exception as e:
            return await self._failed(e)
        self.display.phase("committed: the VM now belongs to the target")
        if self.control is not None:
            await self._releaseVM()
        return EXIT_OK

    def _goOn(self) -> None:
        """Stop between steps once interrupted (SIGINT, SIGTERM)."""
        if self.interrupted:
            raise MigrationAborted("interrupted on the source")

    async def _precopy(self) -> None:
        self.display.phase("pre-copy while the VM runs")
        self.display.start(self.migration.progress)
        rounds = await self.migration.precopy(self.policy)
        self.display.stop()
        for name, sent in rounds.items():
            self.display.phase(
                f"{name}: {len(sent)} pre-copy round(s), {formatBytes(sum(sent))}"
            )

    async def _pauseVM(self) -> None:
        from xenmig.processes import runShell

        command = self.args.pause_command
        if self.control is not None:
            command = self.control.description
        self.display.phase(f"pausing the VM: {command}")
        started = self.reactor.seconds()
        self.pause = {"command": command, "status": None, "seconds": None}
        if self.control is not None:
            await self.control.pause()  # DomainControlError says what failed
            status: int | None = 0
        else:
            child = await runShell(
                self.reactor, command, self.args.command_timeout, echo=sys.stderr
            )
            status = child.status
        self.pause["status"] = status
        self.pause["seconds"] = round(self.reactor.seconds() - started, 6)
        if status != 0:
            raise PauseFailed(
                f"the pause command {command!r} exited with status {status}"
            )
        self.migration.paused()
        self.display.phase(f"VM paused ({formatSeconds(self.pause['seconds'])})")

    async def _transfer(self) -> None:
        self.display.phase("transferring the final state")
        self.display.start(self.migration.progress)
        digests = await self.migration.transfer()
        self.display.stop()
        for name, digest in digests.items():
            self.display.phase(f"{name}: verified by the target ({digest.hex})")

    def _inDoubt(self, error: CommitInDoubt) -> int:
        self.display.stop()
        say(self.args, f"COMMIT IN DOUBT: {error}")
        say(
            self.args,
            f"do NOT resume the VM here: it may already run on the target; ask "
            f"with 'xenmig status {self.migration.migrationId} --target "
            f"{self.target} --ca ... --cert ...' (COMMITTED: destroy it here; "
            f"ABORTED: resume it here)",
        )
        return EXIT_IN_DOUBT

    async def _failed(self, error: BaseException) -> int:
        self.display.stop()
        migration = self.migration
        contacted = migration.control is not None
        reason = "interrupted on the source" if self.interrupted else ""
        reason = reason or describeError(error)
        if migration.phase not in ("ABORTED", "COMMITTED", "IN-DOUBT"):
            await migration.abort(reason)
        say(
            self.args,
            f"migration {migration.migrationId} aborted: {migration.reason or reason}",
        )
        if self.pause is not None:
            await self._resumeVM()
        elif self.args.live:
            say(self.args, "the VM was not paused: it keeps running here")
        else:
            say(
                self.args,
                "nothing was installed on the target; the VM may be resumed here",
            )
        if isinstance(error, BadSpec) and not contacted:
            return EXIT_USAGE
        return EXIT_FAILED

    async def _resumeVM(self) -> None:
        from xenmig.processes import ProcessFailed, runShell

        command = self.args.resume_command
        if self.control is not None:
            command = self.control.description
        say(self.args, f"resuming the VM here: {command}")
        try:
            if self.control is not None:
                await self.control.resume()
                status: Any = 0
            else:
                child = await runShell(
                    self.reactor, command, self.args.command_timeout, echo=sys.stderr
                )
                status = child.status
        except (ProcessFailed, XenmigError) as e:
            status = str(e)
        self.resumed = status == 0
        if self.resumed:
            say(self.args, "the VM was resumed here")
        else:
            say(
                self.args,
                f"THE RESUME COMMAND FAILED ({status}): resume the VM here by hand "
                f"(nothing was installed on the target)",
            )

    async def _releaseVM(self) -> None:
        """After the commit: let the domain control release the VM here."""
        assert self.control is not None
        try:
            await self.control.release()
            self.released = True
            self.display.phase(f"released the VM here ({self.control.description})")
        except XenmigError as e:
            self.released = False
            say(self.args, f"the VM runs on the target; releasing it here failed: {e}")

    def _interrupt(self) -> Deferred[None] | None:
        """Before the reactor stops (SIGINT, SIGTERM): abort unless committing."""
        if self.done.called:
            return None
        self.interrupted = True
        migration = self.migration
        committing = "commit" in migration.times
        if migration.phase not in ("ABORTED", "COMMITTED", "IN-DOUBT") and not (
            committing
        ):
            Deferred.fromCoroutine(
                migration.abort("interrupted on the source")
            ).addErrback(lambda _: None)
        waiter: Deferred[None] = Deferred()
        self.done.addBoth(lambda result: fireOnce(waiter, None))
        waiter.addTimeout(self.migration.client.timeouts.commit + 30, self.reactor)
        return waiter.addErrback(lambda _: None)

    def report(self, code: int) -> dict[str, Any]:
        """The client's report, with the target, exit status and the VM's pause."""
        report = self.migration.report()
        report["target"] = self.target
        report["exit_status"] = code
        if self.args.live or self.control is not None:
            report["live"] = {"pause": self.pause, "resumed": self.resumed}
        if self.control is not None:
            report["domain_control"] = {
                "control": self.control.description,
                "released": self.released,
            }
        return report

    def _output(self, code: int) -> None:
        if self.args.json:
            print(json.dumps(self.report(code), indent=2), flush=True)
        elif code == EXIT_OK:
            print(summary(self.report(code)), flush=True)


def summary(report: dict[str, Any]) -> str:
    """A committed migration in a few lines: devices, bytes, time, rate, digest."""
    durations = report["durations"]
    lines = [
        f"committed migration {report['migration_id']} of {report['domain']} to "
        f"{report.get('target', 'the target')} in {formatSeconds(durations['total'])}"
        f" (paused window {formatSeconds(report['paused_window'])})"
    ]
    for device in report["devices"]:
        seconds = device["seconds"] or 0.0
        rate = device["bytes"] / seconds if seconds else 0.0
        lines.append(
            f"  {device['kind']}:{device['name']}  {formatBytes(device['bytes'])} "
            f"({formatBytes(device['data_bytes'])} of data) in "
            f"{formatSeconds(seconds)}, {formatRate(rate)}, {device['digest']}"
        )
    lines += [f"  installed {path}" for path in report["installed"]]
    return "\n".join(lines)


# -- subcommands -----------------------------------------------------------------------


async def _migrate(reactor: Any, args: argparse.Namespace) -> int:
    from xenmig.client import MigrationClient, SourceContext, SourceMigration
    from xenmig.plugins import deviceKinds

    control = _domainControl(args, reactor)
    if control is not None and (args.pause_command or args.resume_command):
        raise UsageError("give --domain-control or the pause and resume commands")
    if (
        args.live
        and control is None
        and not (args.pause_command and args.resume_command)
    ):
        raise UsageError(
            "--live needs --pause-command and --resume-command (or --domain-control)"
        )
    if not args.live and (args.pause_command or args.resume_command):
        raise UsageError("--pause-command and --resume-command need --live")
    kinds = deviceKinds()
    for spec in args.device:
        if spec.kind not in kinds:
            known = ", ".join(sorted(kinds)) or "none"
            raise UsageError(
                f"device {spec.name}: no device kind {spec.kind!r} here "
                f"(known: {known})"
            )
    for spec in args.device:  # the kind's own checks (it raises BadSpec)
        kinds[spec.kind].source(spec, SourceContext(None, reactor, spec.name))
    names = [spec.name for spec in args.device]
    if len(set(names)) != len(names):
        raise UsageError("two --device options have the same NAME")
    policy = _policy(args)
    host, port = args.target
    client = MigrationClient(reactor, host, port, kinds=kinds, **clientTLS(args))
    migrationId = args.migration_id or uuid.uuid4().hex
    migration = SourceMigration(client, args.domain, migrationId)
    bars = sys.stderr.isatty()
    display = ProgressDisplay(reactor, sys.stderr, bars, prefix="xenmig migrate")
    command = MigrateCommand(reactor, migration, args, display, policy, control)
    return await command.run()


def _domainControl(args: argparse.Namespace, reactor: Any) -> Any:
    """The IDomainControl of ``--domain-control`` (None for none or absent)."""
    from xenmig.domains import parseDomainControl

    if not args.domain_control:
        return None
    return parseDomainControl(args.domain_control, reactor, args.domain)


def _policy(args: argparse.Namespace) -> Any:
    from xenmig.convergence import ConvergencePolicy

    if args.convergence and args.max_rounds:
        raise UsageError("give --convergence or --max-rounds, not both")
    if args.convergence:
        return ConvergencePolicy.parse(args.convergence)
    if args.max_rounds:
        return ConvergencePolicy(maxRounds=args.max_rounds)
    return None


async def _status(reactor: Any, args: argparse.Namespace) -> int:
    daemon = _daemon(reactor, args)
    try:
        if args.migration_id:
            records = [await daemon.query(args.migration_id)]
        else:
            records = await daemon.listMigrations(args.limit)
    except ConfigurationError:
        raise
    except Exception as e:
        say(args, f"{_where(args)}: {describeError(e)}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(records[0] if args.migration_id else records, indent=2))
        return EXIT_OK
    statuses = [MigrationStatus.fromJSON(r) for r in records]
    if args.migration_id:
        print(statusDetail(statuses[0]))
    else:
        print(statusTable(statuses))
    return EXIT_OK


async def _abort(reactor: Any, args: argparse.Namespace) -> int:
    daemon = _daemon(reactor, args)
    try:
        phase = await daemon.abortMigration(args.migration_id, args.reason)
    except ConfigurationError:
        raise
    except Exception as e:
        say(args, f"migration {args.migration_id}: {describeError(e)}")
        return EXIT_FAILED
    print(f"migration {args.migration_id}: {phase}")
    return EXIT_OK if phase == "ABORTED" else EXIT_FAILED


async def _await(reactor: Any, args: argparse.Namespace) -> int:
    resumer = _resumer(args, reactor)
    control = LocalControl(reactor, args.state_dir)
    try:
        answer = await control.awaitRestored(
            args.domain, args.timeout, args.migration_id
        )
    except ConfigurationError:
        raise
    except Exception as e:
        reason = describeError(e)
        if args.json:
            result = {"domain": args.domain, "committed": False, "reason": reason}
            print(json.dumps(result, indent=2))
        say(args, f"{args.domain}: not restored: {reason}")
        return EXIT_FAILED
    installed = list(answer["installed"])
    resumed = await _resumeHere(args, resumer) if resumer is not None else None
    if args.json:
        result = {
            "domain": args.domain,
            "committed": True,
            "migration_id": answer["migration_id"],
            "installed": installed,
        }
        if resumer is not None:
            result["resumed"] = resumed
        print(json.dumps(result, indent=2))
    else:
        print(f"migration {answer['migration_id']} of {args.domain} committed")
        for path in installed:
            print(f"  installed {path}")
        if resumed:
            print(f"  resumed the VM ({resumer.description})")
    return EXIT_FAILED if resumed is False else EXIT_OK


def _resumer(args: argparse.Namespace, reactor: Any) -> Any:
    """The IDomainControl that ``await --resume`` resumes the VM with, or None."""
    from xenmig.domains import parseDomainControl

    if not args.resume:
        if args.domain_control:
            raise UsageError("--domain-control needs --resume")
        return None
    control = parseDomainControl(args.domain_control or "xl", reactor, args.domain)
    if control is None:
        raise UsageError("--resume needs a domain control: xl or qmp:PATH")
    return control


async def _resumeHere(args: argparse.Namespace, control: Any) -> bool:
    """Resume the committed VM on this host; whether that worked."""
    try:
        await control.resume()
    except XenmigError as e:
        say(
            args,
            f"{args.domain}: COMMITTED, BUT RESUMING IT FAILED ({e}): the VM's state "
            f"is installed here; resume it by hand",
        )
        return False
    say(args, f"{args.domain}: resumed ({control.description})")
    return True


async def _kinds(reactor: Any, args: argparse.Namespace) -> int:
    from xenmig.plugins import deviceKinds

    kinds = deviceKinds()
    width = max((len(name) for name in kinds), default=0)
    for name in sorted(kinds):
        print(f"{name.ljust(width)}  {getattr(kinds[name], 'summary', '')}")
    return EXIT_OK


async def _demo(reactor: Any, args: argparse.Namespace) -> int:
    from xenmig.demo import runDemo

    return await runDemo(reactor, sizeMiB=args.size_mib, keep=args.keep)


if __name__ == "__main__":
    run()
