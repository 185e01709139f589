"""
The ``xenmig`` console script: the parser, the entry point and the logging.

The subcommands are migrate, status, abort, await, pki, kinds, demo,
config, service, completion and manpage.  Each lives in a module of its own
that adds its options to the parser (``register``) and runs it
(``main(reactor, args)``), importing what it needs only then: the parser and
this module import the standard library alone, and ``migrate --via-daemon``
runs without Twisted (L{xenmig.cli.viadaemon}).  Their defaults
come from the client files first (L{xenmig.cli.clientconfig}).

Exit statuses: 0 success (a committed migration); 1 the migration aborted (the
source may resume its VM) or the step failed; 2 a usage or configuration error;
3 the commit is in doubt (do not resume the VM on the source: ask the target).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from xenmig import version
from xenmig.cli import (
    abort,
    awaitcmd,
    completion,
    configcmd,
    democmd,
    kinds,
    manpage,
    migrate,
    pkiargs,
    servicecmd,
    status,
)
from xenmig.errors import BadSpec, ConfigurationError
from xenmig.toolstack.outcome import EXIT_USAGE, UsageError, printJSONError, say


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as one line (and exit status 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


class _Version(argparse.Action):
    """``--version``: the version is read (through importlib.metadata) only then."""

    def __init__(self, option_strings: list[str], dest: str, help: str) -> None:
        super().__init__(
            option_strings,
            argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help=help,
        )

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None):
        print(f"xenmig {version()}")
        parser.exit()


def parser() -> argparse.ArgumentParser:
    """The whole ``xenmig`` command line."""
    top = _Parser(
        prog="xenmig",
        description="Migrate VM device state between hosts (see doc/cli.md).",
        epilog="exit status: 0 success, 1 aborted/failed, 2 usage or configuration "
        "error, 3 commit in doubt",
    )
    top.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    top.add_argument(
        "--config",
        metavar="FILE",
        help="read the options' defaults from this TOML file only (default: "
        "/etc/xenmig/client.toml, then $XDG_CONFIG_HOME/xenmig/client.toml)",
    )
    top.add_argument(
        "--version", action=_Version, help="print xenmig's version and exit"
    )
    sub = top.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )
    migrate.register(sub)
    status.register(sub)
    abort.register(sub)
    awaitcmd.register(sub)
    # ``xenmig pki`` runs its own command line (xenmig.cli.pki.main), which
    # L{run} hands it before this parser sees it: here it is only described.
    pkiargs.register(sub)
    kinds.register(sub)
    democmd.register(sub)
    configcmd.register(sub, top)
    servicecmd.register(sub)
    completion.register(sub, top)
    manpage.register(sub, top)
    return top


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``xenmig`` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["pki"]:
        from xenmig.cli import pki

        sys.exit(pki.main(arguments[1:]))
    try:
        args = _parse(arguments)
    except ConfigurationError as e:
        from xenmig.toolstack.failures import errorCode

        print(f"xenmig: error: {e}", file=sys.stderr)
        if "--json" in arguments:
            printJSONError(errorCode(e), str(e), EXIT_USAGE)
        sys.exit(EXIT_USAGE)
    except UsageError as e:
        print(e, file=sys.stderr)
        if "--json" in arguments:
            printJSONError("USAGE", str(e).split(": error: ", 1)[-1], EXIT_USAGE)
        sys.exit(EXIT_USAGE)
    if getattr(args, "via_daemon", None) is not None:
        from xenmig.cli.viadaemon import runViaDaemon

        sys.exit(runViaDaemon(args))
    from twisted.internet.task import react

    from xenmig.tuning import tuneAllocator

    startLogging(args.verbose)
    tuneAllocator()
    react(_entry, (args,))


def _parse(arguments: list[str]) -> argparse.Namespace:
    """The command line, with the client files' defaults (see L{clientconfig})."""
    import os

    from xenmig.cli.clientconfig import configured

    command = parser()
    config = None
    for n, argument in enumerate(arguments):  # xenmig's own, before the command
        if not argument.startswith("-"):
            break
        if argument.startswith("--config="):
            config = argument.partition("=")[2]
        elif argument == "--config" and n + 1 < len(arguments):
            config = arguments[n + 1]
    command.set_defaults(settings=configured(command, config, os.environ))
    return command.parse_args(arguments)


def startLogging(verbose: bool) -> None:
    """The CLI's only log observer: text events on stderr, or nothing at all."""
    from twisted.logger import (
        FilteringLogObserver,
        ILogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    from zope.interface import provider

    @provider(ILogObserver)
    def discard(event: dict[str, Any]) -> None:
        """Without --verbose the command line logs nothing."""

    if verbose:
        observer = FilteringLogObserver(
            textFileLogObserver(sys.stderr),
            [LogLevelFilterPredicate(LogLevel.info)],
        )
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    else:
        globalLogBeginner.beginLoggingTo(
            [discard], discardBuffer=True, redirectStandardIO=False
        )


async def _entry(reactor: Any, args: argparse.Namespace) -> NoReturn:
    """Run the subcommand; map configuration errors onto exit status 2."""
    try:
        code = await args.main(reactor, args)
    except (UsageError, ConfigurationError, BadSpec) as e:
        say(args, f"error: {e}")
        if getattr(args, "json", False):
            from xenmig.toolstack.failures import errorCode

            kind = "USAGE" if isinstance(e, UsageError) else errorCode(e)
            printJSONError(kind, str(e), EXIT_USAGE)
        code = EXIT_USAGE
    raise SystemExit(code)


if __name__ == "__main__":
    run()
