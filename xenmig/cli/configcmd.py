"""``xenmig config check``: is a daemon's or a client's file good, and what it sets."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from xenmig.cli.arguments import addVerbose
from xenmig.errors import ConfigurationError
from xenmig.toolstack.outcome import EXIT_OK

DAEMON, CLIENT = "daemon", "client"


def register(
    subcommands: argparse._SubParsersAction[Any], top: argparse.ArgumentParser
) -> None:
    """Add ``config check`` to the ``xenmig`` command line."""
    config = subcommands.add_parser(
        "config", help="check a daemon's or a client's configuration file"
    )
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="validate a file; print each setting it would give, and from where",
        description="Validate a daemon's (xenmigd.toml) or a client's "
        "(client.toml) configuration file, and print the value each setting "
        "would have and where it comes from. Without FILE: the client files "
        "the command line reads (or, with --daemon, /etc/xenmig/xenmigd.toml).",
    )
    addVerbose(check)
    check.add_argument("file", nargs="?", metavar="FILE", help="the file to check")
    which = check.add_mutually_exclusive_group()
    which.add_argument(
        "--daemon", action="store_true", help="it is the daemon's (twistd xenmig)"
    )
    which.add_argument(
        "--client", action="store_true", help="it is a client's (xenmig)"
    )
    check.add_argument("--json", action="store_true", help="print JSON on stdout")
    check.set_defaults(main=main, parser=top)


async def main(reactor: Any, args: argparse.Namespace) -> int:
    """Check; print the settings (text or JSON); ConfigurationError if bad."""
    kind = _kind(args, args.parser)
    if kind == DAEMON:
        report = checkDaemon(args.file)
    else:
        report = checkClient(args.parser, args.file)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(formatReport(report))
    return EXIT_OK


def _kind(args: argparse.Namespace, command: argparse.ArgumentParser) -> str:
    """Which file it is: as told, else guessed from its keys, else its name."""
    if args.daemon:
        return DAEMON
    if args.client or args.file is None:
        return CLIENT
    from xenmig import tap
    from xenmig.cli.clientconfig import PORT, settable
    from xenmig.target.configfile import PEER_TABLE, readTOML

    keys = set(readTOML(args.file, "configuration file"))
    daemonKeys = set(tap.Options().settingKinds()) | {PEER_TABLE}
    clientKeys = set(settable(command)) | {PORT}
    if keys - clientKeys and not keys - daemonKeys:
        return DAEMON
    if keys - daemonKeys and not keys - clientKeys:
        return CLIENT
    return DAEMON if "xenmigd" in os.path.basename(args.file) else CLIENT


def checkDaemon(path: str | None) -> dict[str, Any]:
    """
    Blocking: what ``twistd xenmig --config path`` would run with, checked as
    it checks at start (the TLS files, the roots and the peers included).

    @raise ConfigurationError: saying what is wrong, naming the file and key.
    """
    from twisted.python import usage

    from xenmig import tap
    from xenmig.target.configfile import DAEMON_CONFIG

    options = tap.Options()
    path = path or DAEMON_CONFIG
    try:
        options.parseOptions(["--config", path])
    except SystemExit as e:
        raise ConfigurationError(str(e.code).removeprefix("xenmig: "))
    except usage.UsageError as e:
        raise ConfigurationError(str(e))
    tap.checkConfiguration(options)
    settings = {
        name: {"value": _plain(options[name]), "source": options.sources[name]}
        for name in sorted(options.settingKinds())
    }
    return {"kind": DAEMON, "files": [path], "valid": True, "settings": settings}


def checkClient(command: argparse.ArgumentParser, path: str | None) -> dict[str, Any]:
    """
    Blocking: the defaults the client files give every option (``path``, or
    the files the command line reads), and where each comes from.

    @raise ConfigurationError: naming the file and the key.
    """
    from xenmig.cli.clientconfig import PORT, configured, settable
    from xenmig.model import DEFAULT_PORT

    settings = configured(command, path, os.environ)
    values = {PORT: DEFAULT_PORT}
    for name, actions in settable(command).items():
        values[name] = actions[0].default
    values.update(settings.values)
    report = {
        name: {
            "value": _plain(values[name]),
            "source": settings.sources.get(name, "default"),
        }
        for name in sorted(values)
    }
    return {
        "kind": CLIENT,
        "files": list(settings.read),
        "valid": True,
        "settings": report,
    }


def _plain(value: Any) -> Any:
    """A value as JSON holds it (``--target`` is ``HOST:PORT``)."""
    if isinstance(value, tuple) and len(value) == 2:
        return "{}:{}".format(*value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def formatReport(report: dict[str, Any]) -> str:
    """The text of a report: the files, then one line per setting."""
    files = ", ".join(report["files"]) or "none (no client file exists)"
    lines = [f"{report['kind']} configuration: valid; read {files}"]
    settings = report["settings"]
    width = max(len(name) for name in settings)
    for name, setting in settings.items():
        value = json.dumps(setting["value"])
        lines.append(f"  {name:<{width}} = {value}  ({setting['source']})")
    return "\n".join(lines)
