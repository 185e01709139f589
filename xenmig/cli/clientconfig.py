"""
The command line's defaults from ``client.toml``: the system's, then the user's.

Each key is an option's long name (``ca``, ``cert``, ``key``, ``server-name``,
``busy-timeout``, ...) and gives that option's default to every subcommand that
has it; ``port`` is the port of a ``--target`` given without one.  The files
are ``/etc/xenmig/client.toml`` then ``$XDG_CONFIG_HOME/xenmig/client.toml``
(``~/.config/xenmig/client.toml``), the later overriding the earlier, or the
one file of ``xenmig --config FILE``; the command line overrides them all.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xenmig.cli.connection import parseTarget
from xenmig.errors import ConfigurationError
from xenmig.model import DEFAULT_PORT
from xenmig.target.configfile import checkType, readTOML, resolvePath, unknownKey

#: The system's client file, read first.
SYSTEM_CLIENT_CONFIG = "/etc/xenmig/client.toml"
#: The key of the default port (no option has that name).
PORT = "port"
#: The subcommands whose options a client file gives defaults: those that
#: speak to a daemon.
SUBCOMMANDS = ("migrate", "status", "abort", "await")
#: Options that name one migration or one run, not a default.
NOT_DEFAULTS = frozenset(
    {
        "help",
        "version",
        "verbose",
        "config",
        "domain",
        "device",
        "migration-id",
        "reason",
        "no-via-daemon",
    }
)
#: Options whose values are paths (relative ones: to the file's directory).
_PATH_METAVARS = ("FILE", "DIR", "STATE_DIR|SOCKET")


def userConfig(environ: Mapping[str, str]) -> str:
    """The user's client file: under ``$XDG_CONFIG_HOME``, else ``~/.config``."""
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config"
    )
    return os.path.join(base, "xenmig", "client.toml")


def clientFiles(environ: Mapping[str, str]) -> list[str]:
    """The client files read when no ``--config`` is given, in order."""
    return [SYSTEM_CLIENT_CONFIG, userConfig(environ)]


@dataclass(frozen=True)
class ClientSettings:
    """The defaults the client files give, checked: each key's value and file."""

    #: The files read, in order (those that exist, or the one named).
    read: tuple[str, ...] = ()
    #: Key -> its value as the option takes it (converted, paths absolute).
    values: dict[str, Any] = field(default_factory=dict)
    #: Key -> the file that gave it.
    sources: dict[str, str] = field(default_factory=dict)


def settable(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """Every option a client file may give a default: long name -> its actions."""
    found: dict[str, list[argparse.Action]] = {}
    for action in _actions(parser, SUBCOMMANDS):
        for option in action.option_strings:
            name = option[2:]
            if option.startswith("--") and name not in NOT_DEFAULTS:
                found.setdefault(name, []).append(action)
    return found


def _actions(
    parser: argparse.ArgumentParser, commands: Sequence[str]
) -> Iterator[argparse.Action]:
    """The actions of the subcommands ``commands`` of ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name in commands:
                yield from action.choices[name]._actions


def readClientFiles(
    paths: Sequence[str], parser: argparse.ArgumentParser, named: bool = False
) -> ClientSettings:
    """
    Blocking: read and check ``paths`` in order (those missing are passed
    over, unless ``named``: the one file of ``--config``).

    @raise ConfigurationError: naming the file and the key, for an unknown
        key or a value its option does not take.
    """
    actions = settable(parser)
    read: list[str] = []
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for path in paths:
        if not named and not os.path.exists(path):
            continue
        document = readTOML(path, "client configuration file")
        read.append(path)
        port = values.get(PORT, DEFAULT_PORT)
        if PORT in document:
            values[PORT] = port = _port(path, document[PORT])
            sources[PORT] = path
        for key, value in document.items():
            if key == PORT:
                continue
            if key not in actions:
                raise unknownKey(path, key, [*actions, PORT])
            values[key] = _convert(path, key, value, actions[key][0], port)
            sources[key] = path
    return ClientSettings(tuple(read), values, sources)


def _port(path: str, value: Any) -> int:
    port = checkType(path, PORT, value, int)
    if not 0 < port < 65536:
        raise ConfigurationError(f"{path}: {PORT} must be 1-65535, not {port}")
    return int(port)


def _convert(
    path: str, key: str, value: Any, action: argparse.Action, port: int
) -> Any:
    """``value`` as ``action`` would take it from the command line."""
    if action.nargs == 0:  # a flag: store_true
        return checkType(path, key, value, bool)
    if action.nargs == "?" and isinstance(value, bool):  # true: the option alone
        return action.const if value else None
    if isinstance(action, argparse._AppendAction):
        texts = checkType(path, key, value, list)
        return [_one(path, key, text, action, port) for text in texts]
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    return _one(path, key, checkType(path, key, value, str), action, port)


def _one(path: str, key: str, text: str, action: argparse.Action, port: int) -> Any:
    if action.metavar in _PATH_METAVARS:
        text = resolvePath(path, text)
    kind = targetType(port) if action.dest == "target" else action.type
    try:
        converted = kind(text) if callable(kind) else text
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise ConfigurationError(f"{path}: {key} = {text!r}: {e}")
    if action.choices is not None and converted not in action.choices:
        known = ", ".join(map(str, action.choices))
        raise ConfigurationError(f"{path}: {key} must be one of {known}")
    return converted


def targetType(port: int) -> Any:
    """``--target``'s argument type, with ``port`` for a HOST alone."""

    def target(text: str) -> tuple[str, int]:
        return parseTarget(text, port)

    return target


def applyDefaults(parser: argparse.ArgumentParser, settings: ClientSettings) -> None:
    """Make the files' values the defaults of ``parser``'s options."""
    actions = settable(parser)
    if PORT in settings.values:
        for action in _actions(parser, SUBCOMMANDS):
            if action.dest == "target":
                action.type = targetType(settings.values[PORT])
    for key, value in settings.values.items():
        for action in actions.get(key, []):
            action.default = value
            action.required = False


def configured(
    parser: argparse.ArgumentParser,
    config: str | None,
    environ: Mapping[str, str],
) -> ClientSettings:
    """
    Blocking: read the client files (``config``, else the system's and the
    user's) and make them ``parser``'s defaults; what they gave.
    """
    if config:
        settings = readClientFiles([config], parser, named=True)
    else:
        settings = readClientFiles(clientFiles(environ), parser)
    applyDefaults(parser, settings)
    return settings
