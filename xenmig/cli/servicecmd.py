"""``xenmig service install``: the shipped systemd unit, fitted to this host."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any

from xenmig.cli.arguments import addVerbose
from xenmig.errors import ConfigurationError
from xenmig.toolstack.outcome import EXIT_OK, say

UNIT = "xenmig.service"
UNIT_DIR = "/etc/systemd/system"
#: What the shipped unit runs and reads, replaced by what this host has.
SHIPPED_TWISTD = "/usr/bin/twistd"
SHIPPED_CONFIG = "/etc/xenmig/xenmigd.toml"
SHIPPED_PATHS = "ReadWritePaths=/var/lib/xenmig"


def shippedUnit() -> str:
    """The unit as the package ships it (``xenmig/data/xenmig.service``)."""
    from importlib import resources

    return resources.files("xenmig").joinpath("data", UNIT).read_text()


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``service install`` to the ``xenmig`` command line."""
    service = subcommands.add_parser(
        "service", help="install the daemon's systemd unit"
    )
    actions = service.add_subparsers(dest="action", required=True, metavar="ACTION")
    install = actions.add_parser(
        "install",
        help="write xenmig.service, fitted to this host",
        description="Write the shipped systemd unit of the daemon, its ExecStart "
        "pointing at this host's twistd and --config, its ReadWritePaths at the "
        "configuration's state-dir and allow-root directories; then say what "
        "to run.",
    )
    addVerbose(install)
    where = install.add_mutually_exclusive_group()
    where.add_argument(
        "--unit-dir",
        metavar="DIR",
        help=f"where to write {UNIT} (default {UNIT_DIR})",
    )
    where.add_argument(
        "--prefix",
        metavar="DIR",
        help=f"write it to DIR{UNIT_DIR} (a staging root, for packages)",
    )
    install.add_argument(
        "--config",
        metavar="FILE",
        default=SHIPPED_CONFIG,
        help=f"the daemon's configuration file (default {SHIPPED_CONFIG})",
    )
    install.add_argument(
        "--twistd",
        metavar="FILE",
        help="the twistd to run (default: the one installed beside xenmig)",
    )
    install.add_argument(
        "--dry-run", action="store_true", help="print the unit; write nothing"
    )
    install.set_defaults(main=main)


async def main(reactor: Any, args: argparse.Namespace) -> int:
    """Write (or print) the unit and say what comes next."""
    unit = fittedUnit(args.twistd or findTwistd(), os.path.abspath(args.config))
    directory = args.unit_dir or (args.prefix or "") + UNIT_DIR
    path = os.path.join(directory, UNIT)
    if args.dry_run:
        print(unit, end="")
        say(args, f"dry run: would write {path}")
        return EXIT_OK
    try:
        os.makedirs(directory, exist_ok=True)
        temporary = path + ".tmp"
        with open(temporary, "w") as f:
            f.write(unit)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as e:
        raise ConfigurationError(f"cannot write {path}: {e.strerror}")
    print(f"wrote {path}")
    if not os.path.exists(args.config):
        print(f"next: write {args.config} (doc/daemon.md, the configuration file)")
    print("next: systemctl daemon-reload && systemctl enable --now xenmig")
    return EXIT_OK


def findTwistd() -> str:
    """The twistd beside this Python (a virtualenv's), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("twistd")
    if found is None:
        raise ConfigurationError("no twistd found: give its path with --twistd")
    return found


def fittedUnit(twistd: str, config: str) -> str:
    """
    The shipped unit running ``twistd`` with ``--config config``, and writable
    paths from that file (its state-dir and allow-roots) when it reads well.
    """
    unit = shippedUnit().replace(f"ExecStart={SHIPPED_TWISTD} ", f"ExecStart={twistd} ")
    unit = unit.replace(f"--config {SHIPPED_CONFIG}", f"--config {config}")
    paths = writablePaths(config)
    if paths:
        unit = unit.replace(SHIPPED_PATHS, "ReadWritePaths=" + " ".join(paths))
    return unit


def writablePaths(config: str) -> list[str]:
    """The state-dir and allow-roots of the daemon's file (none if it does not read)."""
    from xenmig import tap
    from xenmig.target.configfile import readDaemonFile

    if not os.path.exists(config):
        return []
    values = readDaemonFile(config, tap.Options().settingKinds()).values
    paths = [values.get("state-dir", "/var/lib/xenmig"), *values.get("allow-root", [])]
    return [p.replace(" ", "\\x20") for p in dict.fromkeys(paths)]
