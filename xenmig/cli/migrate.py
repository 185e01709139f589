"""``xenmig migrate``: its options, their checks, and the run they start."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from xenmig.cli.arguments import (
    addVerbose,
    bandwidth,
    duration,
    parseMigrationId,
    positive,
)
from xenmig.cli.connection import addTargetOptions, clientTLS
from xenmig.errors import BadSpec
from xenmig.model import DEFAULT_STATE_DIR, DeviceSpec

#: ``--via-daemon``'s argument, a path (a client file's relative one is taken
#: from the file's directory).
VIA_DAEMON_METAVAR = "STATE_DIR|SOCKET"


def parseDevice(text: str) -> DeviceSpec:
    """A ``--device KIND:NAME:key=val,...`` argument."""
    try:
        return DeviceSpec.parse(text)
    except BadSpec as e:
        raise argparse.ArgumentTypeError(str(e))


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``migrate`` and its options to the ``xenmig`` command line."""
    migrate = subcommands.add_parser(
        "migrate", help="migrate device state to a target host"
    )
    addVerbose(migrate)
    addTargetOptions(migrate, required=True)
    migrate.add_argument("--domain", required=True, help="the VM's name")
    migrate.add_argument(
        "--device",
        action="append",
        required=True,
        type=parseDevice,
        metavar="KIND:NAME:key=val,...",
        help="a device (repeatable); target-side keys start with 'target'",
    )
    migrate.add_argument(
        "--migration-id",
        type=parseMigrationId,
        metavar="ID",
        help="the migration's id (default: a random one)",
    )
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
        metavar="xl|qmp:PATH|libvirt:URI|none",
        help="pause the VM (and resume it after a failure, release it after the "
        "commit) through xl, QEMU's QMP or libvirt's virsh, instead of commands",
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
        "--bandwidth",
        type=bandwidth,
        metavar="RATE",
        help="the most bytes per second the migration's streams send together, "
        "shared fairly between them (e.g. 500M; K, M, G are powers of 1024)",
    )
    migrate.add_argument(
        "--max-downtime",
        type=duration,
        metavar="TIME",
        help="with --live: pause the VM only once the final round is estimated to "
        "fit in TIME (e.g. 300ms, 2s); abort if it never does within --max-rounds "
        "(default 10)",
    )
    migrate.add_argument(
        "--downtime-fallback",
        choices=("abort", "pause"),
        help="when --max-downtime never fits within --max-rounds: abort (default; "
        "the VM keeps running here) or pause anyway",
    )
    migrate.add_argument(
        "--command-timeout",
        type=positive(float),
        default=120.0,
        metavar="S",
        help="seconds the pause and resume commands may take (default 120)",
    )
    migrate.add_argument(
        "--busy-timeout",
        type=positive(float),
        metavar="S",
        help="seconds to keep retrying while the target is busy (default 300)",
    )
    migrate.add_argument(
        "--no-resume",
        action="store_true",
        help="abort on a broken connection instead of re-establishing it",
    )
    migrate.add_argument(
        "--reconnect-timeout",
        type=positive(float),
        default=60.0,
        metavar="S",
        help="seconds to keep re-establishing a broken connection (default 60)",
    )
    migrate.add_argument(
        "--stall-timeout",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="seconds a state stream may make no progress during a pre-copy round "
        "or the final transfer before the migration aborts (default 60; 0: never)",
    )
    migrate.add_argument(
        "--via-daemon",
        nargs="?",
        const=DEFAULT_STATE_DIR,
        metavar=VIA_DAEMON_METAVAR,
        help="let the local daemon send the migration, as this host (with its own "
        "certificate): no start-up here; its state directory or socket (default "
        f"{DEFAULT_STATE_DIR}); --ca, --cert, --key, --insecure-plaintext and "
        "--verbose cannot apply",
    )
    migrate.add_argument(
        "--no-via-daemon",
        dest="via_daemon",
        action="store_const",
        const=None,
        help="send from this process, whatever client.toml says of via-daemon",
    )
    migrate.set_defaults(main=main)


def _seconds(text: str) -> float:
    """A number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


async def main(reactor: Any, args: argparse.Namespace) -> int:
    """Check the arguments, then run a L{MigrateCommand}; its exit status."""
    from xenmig.toolstack.migratesetup import buildCommand
    from xenmig.toolstack.progress import ProgressDisplay

    bars = sys.stderr.isatty()
    display = ProgressDisplay(reactor, sys.stderr, bars, prefix="xenmig migrate")
    command = buildCommand(reactor, args, lambda: clientTLS(args), display)
    return await command.run()
