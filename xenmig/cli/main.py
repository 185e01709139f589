"""
The ``xenmig`` command line: migrate, status, abort, await, pki, kinds and demo.

Exit statuses: 0 success (a committed migration); 1 the migration aborted (the
source may resume its VM) or the step failed; 2 a usage or configuration error;
3 the commit is in doubt (do not resume the VM on the source: ask the target).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

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

from xenmig.amp_commands import DEFAULT_PORT, DEFAULT_STATE_DIR
from xenmig.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    daemonFor,
    describeError,
    say,
    where,
)
from xenmig.cli.migrate import migrateCommand
from xenmig.cli.progress import (
    statusDetail,
    statusTable,
)
from xenmig.errors import (
    BadSpec,
    ConfigurationError,
    XenmigError,
)
from xenmig.model import DeviceSpec, MigrationStatus, checkMigrationId
from xenmig.toolstack.localcontrol import LocalControl
from xenmig.tuning import tuneAllocator


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
    try:
        return checkMigrationId(text)
    except BadSpec as e:
        raise argparse.ArgumentTypeError(str(e))


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
    migrate.set_defaults(main=migrateCommand)

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
        from xenmig.cli import pki

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


async def _entry(reactor: Any, args: argparse.Namespace) -> NoReturn:
    """Run the subcommand; map configuration errors onto exit status 2."""
    try:
        code = await args.main(reactor, args)
    except (UsageError, ConfigurationError, BadSpec) as e:
        say(args, f"error: {e}")
        code = EXIT_USAGE
    raise SystemExit(code)


# -- subcommands -----------------------------------------------------------------------


async def _status(reactor: Any, args: argparse.Namespace) -> int:
    daemon = daemonFor(reactor, args)
    try:
        if args.migration_id:
            records = [await daemon.query(args.migration_id)]
        else:
            records = await daemon.listMigrations(args.limit)
    except ConfigurationError:
        raise
    except Exception as e:
        say(args, f"{where(args)}: {describeError(e)}")
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
    daemon = daemonFor(reactor, args)
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
    from xenmig.toolstack.domains import parseDomainControl

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
    from xenmig.demo.run import runDemo

    return await runDemo(reactor, sizeMiB=args.size_mib, keep=args.keep)


if __name__ == "__main__":
    run()
