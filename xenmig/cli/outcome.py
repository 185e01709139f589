"""How a ``xenmig`` subcommand ends: exit statuses, usage errors, one-line messages."""

from __future__ import annotations

import argparse
import json
import sys

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_IN_DOUBT = 3


class UsageError(Exception):
    """The command line cannot work; the message is one line for the operator."""


def say(args: argparse.Namespace, message: str) -> None:
    """One line for the operator on stderr, named after the subcommand."""
    print(f"xenmig {args.command}: {message}", file=sys.stderr, flush=True)


def printJSONError(code: str, message: str, exitStatus: int) -> None:
    """
    A failure as ``--json`` prints it on stdout, when there is no report to
    carry it: ``{"error": {"code": ..., "message": ...}, "exit_status": N}``.
    """
    error = {"error": {"code": code, "message": message}, "exit_status": exitStatus}
    print(json.dumps(error, indent=2), flush=True)
