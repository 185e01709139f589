"""``xenmig abort``: abort a migration on a daemon before it commits."""

from __future__ import annotations

import argparse
from typing import Any

from xenmig.cli.arguments import addVerbose
from xenmig.cli.connection import (
    addStateDirOption,
    addTargetOptions,
    daemonFor,
)
from xenmig.errors import ConfigurationError
from xenmig.toolstack.outcome import EXIT_FAILED, EXIT_OK, reach, say


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``abort`` and its options to the ``xenmig`` command line."""
    abort = subcommands.add_parser("abort", help="abort a migration before it commits")
    addVerbose(abort)
    abort.add_argument("migration_id", metavar="ID", help="the migration to abort")
    abort.add_argument(
        "--reason",
        default="aborted by the operator",
        metavar="TEXT",
        help="why, as the daemon records it",
    )
    addStateDirOption(abort)
    addTargetOptions(abort, required=False)
    abort.set_defaults(main=main)


async def main(reactor: Any, args: argparse.Namespace) -> int:
    """Abort; print the phase the migration ended in (exit 0 only for ABORTED)."""
    daemon = daemonFor(reactor, args)
    try:
        phase = await daemon.abortMigration(args.migration_id, args.reason)
    except ConfigurationError:
        raise
    except Exception as e:
        from xenmig.toolstack.failures import diagnose

        explained = await diagnose(reactor, e, reach(args))
        say(args, f"migration {args.migration_id}: {explained.message}")
        return EXIT_FAILED
    print(f"migration {args.migration_id}: {phase}")
    return EXIT_OK if phase == "ABORTED" else EXIT_FAILED
