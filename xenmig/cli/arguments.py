"""Argument types the subcommands share, and the ``--verbose`` every one of them has."""

from __future__ import annotations

import argparse
from typing import Any

from xenmig.errors import BadSpec
from xenmig.model import checkMigrationId


def parseMigrationId(text: str) -> str:
    """A ``--migration-id`` argument (see L{checkMigrationId})."""
    try:
        return checkMigrationId(text)
    except BadSpec as e:
        raise argparse.ArgumentTypeError(str(e))


def positive(kind: type) -> Any:
    """The argument type of a number of ``kind`` (int, float) more than 0."""

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


def bandwidth(text: str) -> int:
    """A bandwidth argument (``500M``: bytes per second, K/M/G in powers of 1024)."""
    from xenmig.model import parseBandwidth

    try:
        return parseBandwidth(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def duration(text: str) -> float:
    """A duration argument with its unit (``300ms``, ``2s``), in seconds."""
    from xenmig.model import parseDuration

    try:
        return parseDuration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def addVerbose(parser: argparse.ArgumentParser) -> None:
    """``-v``/``--verbose`` after the subcommand (as well as before it)."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log what happens (structured events) to stderr",
    )
