"""``xenmig demo``: the options of the demo (L{xenmig.demo.run}) and its start."""

from __future__ import annotations

import argparse
from typing import Any

from xenmig.cli.arguments import addVerbose, positive


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``demo`` and its options to the ``xenmig`` command line."""
    demo = subcommands.add_parser(
        "demo", help="run two daemons here and migrate real state between them"
    )
    addVerbose(demo)
    demo.add_argument("--keep", action="store_true", help="keep the temp directory")
    demo.add_argument(
        "--size-mib",
        type=positive(int),
        default=64,
        metavar="N",
        help="size of the demo's state file, in MiB (default 64)",
    )
    demo.add_argument(
        "--no-real-guest",
        dest="real_guest",
        action="store_false",
        help="leave out the real Linux guest (it boots under TCG: about 30 s)",
    )
    demo.set_defaults(main=main)


async def main(reactor: Any, args: argparse.Namespace) -> int:
    """Run the demo; 0 only if everything verified."""
    from xenmig.demo.run import runDemo

    return await runDemo(
        reactor, sizeMiB=args.size_mib, keep=args.keep, realGuest=args.real_guest
    )
