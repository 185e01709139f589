"""The daemon a subcommand speaks to: ``--target`` over mutual TLS, or the local one."""

from __future__ import annotations

import argparse
from typing import Any

from xenmig.model import DEFAULT_PORT, DEFAULT_STATE_DIR, splitHostPort
from xenmig.toolstack.outcome import UsageError, say


def parseTarget(text: str, defaultPort: int = DEFAULT_PORT) -> tuple[str, int]:
    """
    ``HOST:PORT``, ``[IPv6]:PORT`` (or ``HOST``, ``[IPv6]``: port 8002 or
    ``defaultPort``) -> ``(host, port)``, the host without brackets.
    """
    try:
        host, port = splitHostPort(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    if not port and not text.endswith(":"):
        port = str(defaultPort)
    if not host or any(c.isspace() or c in "/[]@" for c in host):
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be 1-65535")
    return host, int(port)


def addTargetOptions(parser: argparse.ArgumentParser, required: bool) -> None:
    """``--target HOST:PORT`` and the mutual TLS options that reach it."""
    parser.add_argument(
        "--target",
        required=required,
        type=parseTarget,
        metavar="HOST:PORT",
        help="the target daemon (port 8002, or client.toml's port, if left out)",
    )
    parser.add_argument("--ca", metavar="FILE", help="PEM bundle of the CA(s)")
    parser.add_argument(
        "--cert", metavar="FILE", help="this host's certificate (and key, unless --key)"
    )
    parser.add_argument("--key", metavar="FILE", help="this host's private key")
    parser.add_argument(
        "--server-name",
        metavar="NAME",
        help="name or address in the target's certificate (default: HOST)",
    )
    parser.add_argument(
        "--pin-sha256",
        action="append",
        default=[],
        metavar="HEX",
        help="the target's certificate must have this SHA-256 fingerprint "
        "(repeatable: any of them)",
    )
    parser.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="DEVELOPMENT ONLY: no TLS, to a daemon on loopback",
    )


def addStateDirOption(parser: argparse.ArgumentParser) -> None:
    """``--state-dir``: where the local daemon's socket is."""
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"the local daemon's state directory (default {DEFAULT_STATE_DIR})",
    )


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
            "--ca and --cert are required with --target (mutual TLS), on the "
            "command line or in client.toml (see doc/cli.md); "
            "make them with 'xenmig pki'"
        )
    from xenmig.source.client import tlsArguments

    identity = tls.loadIdentity(args.cert, args.key)
    authorities = tls.loadAuthority(args.ca)
    pins = [tls.parsePin(pin) for pin in args.pin_sha256]
    return tlsArguments(args.server_name or host, identity, authorities, pins)


def _isLoopback(host: str) -> bool:
    try:
        import ipaddress

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
    from xenmig.toolstack.localcontrol import LocalControl

    if args.target is not None:
        return remoteClient(reactor, args)
    return LocalControl(reactor, args.state_dir)
