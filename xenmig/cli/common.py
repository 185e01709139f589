"""
What the ``xenmig`` subcommands share: exit statuses, usage errors, one-line
messages, and the connection to a daemon (mutual TLS options, or its local socket).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

from xenmig.errors import XenmigError
from xenmig.toolstack.localcontrol import LocalControl

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_IN_DOUBT = 3


class UsageError(Exception):
    """The command line cannot work; the message is one line for the operator."""


def say(args: argparse.Namespace, message: str) -> None:
    """One line for the operator on stderr, named after the subcommand."""
    print(f"xenmig {args.command}: {message}", file=sys.stderr, flush=True)


def clientTLS(args: argparse.Namespace) -> dict[str, Any]:
    """
    The TLS keyword arguments of L{MigrationClient} for ``--target``: Twisted
    options for control, an C{ssl} context for the threaded state streams
    (``tls=None`` with ``--insecure-plaintext``).  Reads the files at once.

    @raise UsageError, ConfigurationError: one line naming the problem.
    """
    from xenmig import tls

    host, _ = args.target
    if args.insecure_plaintext:
        if not _isLoopback(host):
            raise UsageError("--insecure-plaintext only connects to loopback")
        say(args, "INSECURE: plaintext, no authentication (development only)")
        return {"tls": None}
    if not (args.ca and args.cert):
        raise UsageError(
            "--ca and --cert are required with --target (mutual TLS); "
            "make them with 'xenmig pki'"
        )
    from xenmig.source.threadedstream import sslContext

    identity = tls.loadIdentity(args.cert, args.key)
    authorities = tls.loadAuthority(args.ca)
    name = args.server_name or host
    pins = [tls.parsePin(pin) for pin in args.pin_sha256]
    return {
        "tls": tls.clientOptions(name, identity, authorities, pins),
        "sslContext": sslContext(identity, authorities, pins),
        "serverName": name,
    }


def _isLoopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def remoteClient(reactor: Any, args: argparse.Namespace) -> Any:
    """A MigrationClient for ``--target`` with the TLS options of the command line."""
    from xenmig.source.client import MigrationClient

    host, port = args.target
    return MigrationClient(reactor, host, port, **clientTLS(args))


def daemonFor(reactor: Any, args: argparse.Namespace) -> Any:
    """The daemon the command speaks to: ``--target`` over TLS, else the local one."""
    if args.target is not None:
        return remoteClient(reactor, args)
    return LocalControl(reactor, args.state_dir)


def where(args: argparse.Namespace) -> str:
    """Where the daemon is: ``HOST:PORT``, or its local socket."""
    if args.target is not None:
        return "{}:{}".format(*args.target)
    return os.path.join(args.state_dir, "control.sock")


def describeError(error: BaseException) -> str:
    """A one-line description of a failure, whatever its type."""
    from OpenSSL.SSL import Error as TLSError
    from service_identity import VerificationError

    if isinstance(error, XenmigError):
        return str(error)
    if isinstance(error, VerificationError):
        return (
            "the target's certificate does not name the host connected to: give "
            "--server-name with a name from its certificate"
        )
    if isinstance(error, TLSError):
        from xenmig.tls import recentRefusals

        reasons = " ".join(str(part[-1]) for part in error.args[0] if part)
        if "certificate verify failed" in reasons and recentRefusals:
            return f"TLS failed: {recentRefusals[-1]}"
        for clue, meaning in _TLS_REASONS:
            if clue in reasons:
                return f"TLS failed ({reasons}): {meaning}"
        return f"TLS failed ({reasons}); check --ca, --cert, --key and --server-name"
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


_TLS_REASONS = [
    (
        "unknown ca",
        "the target does not trust this host's certificate (--cert is not "
        "issued by a CA the target's --ca holds)",
    ),
    (
        "certificate verify failed",
        "the target's certificate does not chain to --ca",
    ),
    ("certificate required", "the target requires this host's certificate"),
    (
        "certificate expired",
        "the target refused this host's certificate as expired: renew --cert "
        "(xenmig pki issue)",
    ),
    (
        "bad certificate",
        "the target refused this host's certificate (not yet valid? check the "
        "clocks of both hosts)",
    ),
]
