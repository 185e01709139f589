"""
``xenmig pki``'s command line: its commands and options (standard library
only, so that the ``xenmig`` parser can describe it without cryptography).
"""

from __future__ import annotations

import argparse
from typing import Any

IDENTITY_SUFFIX = ".identity.pem"


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """
    List ``pki`` and its commands on the ``xenmig`` command line (for its help,
    man page and completion); L{xenmig.cli.main.run} hands ``xenmig pki ...``
    to L{main} before that parser sees it.
    """
    pki = subcommands.add_parser(
        "pki",
        help="make the CA and host certificates",
        description="Make xenmig's TLS certificates.",
    )
    addCommands(pki)
    pki.set_defaults(main=None)


def addCommands(parser: argparse.ArgumentParser) -> None:
    """``init-ca`` and ``issue``, with their options."""
    commands = parser.add_subparsers(
        dest="pki_command", metavar="init-ca|issue", required=True
    )
    ca = commands.add_parser("init-ca", help="create a certificate authority")
    ca.add_argument("--dir", required=True, help="directory for ca.pem and ca.key")
    ca.add_argument("--name", default="xenmig CA", help="the CA's common name")
    ca.add_argument(
        "--days", type=int, default=3650, help="lifetime in days (default 3650)"
    )
    issue = commands.add_parser("issue", help="issue a host certificate")
    issue.add_argument("--dir", required=True, help="directory holding the CA")
    issue.add_argument("--host", required=True, help="the host's DNS name")
    issue.add_argument(
        "--ip", action="append", default=[], help="an address of the host (repeat)"
    )
    issue.add_argument(
        "--days", type=int, default=825, help="lifetime in days (default 825)"
    )
    issue.add_argument(
        "--combined",
        action="store_true",
        help=f"also write <host>{IDENTITY_SUFFIX} holding certificate and key",
    )
