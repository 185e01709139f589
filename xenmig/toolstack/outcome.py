"""
How a ``xenmig`` subcommand ends: exit statuses, usage errors, one-line messages.

Standard library only: the command line's parser imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from xenmig.model import LOCAL_SOCKET, hostPort

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_IN_DOUBT = 3


@dataclass(frozen=True)
class Reach:
    """How a subcommand reached (or tried to reach) its daemon, for its messages."""

    #: ``HOST:PORT`` of ``--target``, or the local daemon's socket.
    where: str
    #: Whether it is ``--target`` (TCP, TLS unless plaintext), not the local socket.
    remote: bool = False
    plaintext: bool = False
    #: ``--server-name``, if given; ``--ca`` and ``--cert`` as given.
    serverName: str | None = None
    ca: str | None = None
    cert: str | None = None


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


def where(args: argparse.Namespace) -> str:
    """Where the daemon is: ``HOST:PORT``, or its local socket."""
    if args.target is not None:
        return hostPort(*args.target)
    return os.path.join(args.state_dir, LOCAL_SOCKET)


def reach(args: argparse.Namespace) -> Reach:
    """What the command line says about reaching the daemon (see L{Reach})."""
    if getattr(args, "target", None) is None:
        return Reach(where(args))
    return Reach(
        where(args),
        remote=True,
        plaintext=getattr(args, "insecure_plaintext", False),
        serverName=getattr(args, "server_name", None),
        ca=getattr(args, "ca", None),
        cert=getattr(args, "cert", None),
    )
