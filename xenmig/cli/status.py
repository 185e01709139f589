"""``xenmig status``: the migrations a daemon knows, as a table, or one in detail."""

from __future__ import annotations

import argparse
import json
from typing import Any

from xenmig.cli.arguments import addVerbose, positive
from xenmig.cli.connection import (
    addStateDirOption,
    addTargetOptions,
    daemonFor,
)
from xenmig.errors import ConfigurationError
from xenmig.toolstack.outcome import (
    EXIT_FAILED,
    EXIT_OK,
    printJSONError,
    reach,
    say,
    where,
)


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``status`` and its options to the ``xenmig`` command line."""
    status = subcommands.add_parser("status", help="show migrations on a target host")
    addVerbose(status)
    status.add_argument(
        "migration_id", nargs="?", metavar="ID", help="show this migration in detail"
    )
    addStateDirOption(status)
    addTargetOptions(status, required=False)
    status.add_argument("--json", action="store_true", help="print JSON on stdout")
    status.add_argument(
        "--limit",
        type=positive(int),
        default=50,
        metavar="N",
        help="list at most N migrations (default 50)",
    )
    status.set_defaults(main=main)


async def main(reactor: Any, args: argparse.Namespace) -> int:
    """Ask the daemon (``--target``, else the local one); print what it answers."""
    from xenmig.model import MigrationStatus
    from xenmig.toolstack.progress import statusDetail, statusTable

    daemon = daemonFor(reactor, args)
    try:
        if args.migration_id:
            records = [await daemon.query(args.migration_id)]
        else:
            records = await daemon.listMigrations(args.limit)
    except ConfigurationError:
        raise
    except Exception as e:
        from xenmig.toolstack.failures import diagnose

        explained = await diagnose(reactor, e, reach(args))
        # A remote daemon is named in the message; the local one by its socket.
        socket = "" if args.target else f"{where(args)}: "
        say(args, f"{socket}{explained.message}")
        if args.json:
            printJSONError(explained.code, explained.message, EXIT_FAILED)
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
