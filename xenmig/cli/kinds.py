"""``xenmig kinds``: the device kinds installed here, with their summaries."""

from __future__ import annotations

import argparse
from typing import Any

from xenmig.cli.arguments import addVerbose
from xenmig.toolstack.outcome import EXIT_OK


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``kinds`` to the ``xenmig`` command line."""
    kinds = subcommands.add_parser("kinds", help="list the installed device kinds")
    addVerbose(kinds)
    kinds.set_defaults(main=main)


async def main(reactor: Any, args: argparse.Namespace) -> int:
    """Print one line per kind: its name and its summary."""
    from xenmig.plugins import deviceKinds

    kinds = deviceKinds()
    width = max((len(name) for name in kinds), default=0)
    for name in sorted(kinds):
        print(f"{name.ljust(width)}  {getattr(kinds[name], 'summary', '')}")
    return EXIT_OK
