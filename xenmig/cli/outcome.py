"""How a ``xenmig`` subcommand ends: exit statuses, usage errors, one-line messages."""

from __future__ import annotations

import argparse
import sys

from xenmig.errors import XenmigError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_IN_DOUBT = 3


class UsageError(Exception):
    """The command line cannot work; the message is one line for the operator."""


def say(args: argparse.Namespace, message: str) -> None:
    """One line for the operator on stderr, named after the subcommand."""
    print(f"xenmig {args.command}: {message}", file=sys.stderr, flush=True)


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
