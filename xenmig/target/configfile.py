"""TOML configuration files: reading one, checking its keys and types, its paths."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xenmig.errors import ConfigurationError

#: The daemon's configuration file, read when it exists and no --config is given.
DAEMON_CONFIG = "/etc/xenmig/xenmigd.toml"
#: The daemon's options whose values are paths (relative: to the file's directory).
DAEMON_PATHS = frozenset({"state-dir", "ca", "cert", "key", "peers", "allow-root"})
#: Of those, the files that must exist when the configuration file names them.
DAEMON_FILES = frozenset({"ca", "cert", "key", "peers"})
#: The table (array of tables) that holds the peers in the daemon's file.
PEER_TABLE = "peer"

#: What each Python type is called in a message.
_TYPE_NAMES = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "a string",
    list: "a list of strings",
}


def readTOML(path: str, what: str) -> dict[str, Any]:
    """
    Blocking: the document in the TOML file at ``path`` (``what`` names it in
    messages, e.g. "configuration file").

    @raise ConfigurationError: naming the file, if it is missing, unreadable
        or not TOML.
    """
    import tomllib  # here: the command line's start-up need not pay for it

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigurationError(f"{what} {path} does not exist")
    except IsADirectoryError:
        raise ConfigurationError(f"{what} {path} is a directory")
    except OSError as e:
        raise ConfigurationError(f"cannot read {what} {path}: {e.strerror}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"{what} {path} is not valid TOML: {e}")


def unknownKey(path: str, key: str, known: Iterable[str]) -> ConfigurationError:
    """The error for ``key``, unknown in ``path``: with the nearest known key."""
    import difflib

    near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigurationError(f"{path}: unknown key {key!r}{hint}")


def checkType(path: str, key: str, value: Any, kind: type) -> Any:
    """
    ``value`` of ``key`` as ``kind`` (bool, int, float, str, list of str): a
    TOML integer is a float too, nothing else is converted.

    @raise ConfigurationError: naming the file, the key and the type wanted.
    """
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    good = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is list:
        good = good and all(isinstance(v, str) for v in value)
    if not good:
        raise ConfigurationError(
            f"{path}: {key} must be {_TYPE_NAMES[kind]}, not {_shown(value)}"
        )
    return value


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"the list {value!r}"
    return f"{_TYPE_NAMES.get(type(value), type(value).__name__)} ({value!r})"


def resolvePath(path: str, value: str) -> str:
    """A path ``value`` from the file at ``path``: relative ones to its directory."""
    value = os.path.expanduser(value)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), value))


@dataclass(frozen=True)
class DaemonFile:
    """What a daemon's configuration file sets, checked."""

    path: str
    #: Option name -> value, paths absolute (``allow-root`` a list).
    values: dict[str, Any] = field(default_factory=dict)
    #: Whether it holds the peers, as ``[[peer]]`` tables.
    hasPeers: bool = False


def readDaemonFile(path: str, kinds: Mapping[str, type]) -> DaemonFile:
    """
    Blocking: read and check the daemon's configuration file at ``path``.

    @param kinds: every option it may set, with its type (bool for a flag,
        list for ``allow-root``).
    @raise ConfigurationError: naming the file and the key, for an unknown
        key, a value of the wrong type or a file it names that is missing.
    """
    document = readTOML(path, "configuration file")
    values: dict[str, Any] = {}
    for key, value in document.items():
        if key == PEER_TABLE:
            continue
        if key not in kinds:
            raise unknownKey(path, key, [*kinds, PEER_TABLE])
        values[key] = _pathValue(path, key, checkType(path, key, value, kinds[key]))
    tables = document.get(PEER_TABLE)
    if tables is not None:
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise ConfigurationError(f"{path}: peers must be [[peer]] tables")
        if "peers" in values:
            raise ConfigurationError(
                f"{path}: give the peers as [[peer]] tables or in the file named "
                f"by peers = {values['peers']!r}, not both"
            )
    return DaemonFile(path, values, tables is not None)


def _pathValue(path: str, key: str, value: Any) -> Any:
    if key not in DAEMON_PATHS:
        return value
    if isinstance(value, list):
        return [resolvePath(path, v) for v in value]
    resolved = resolvePath(path, value)
    if key in DAEMON_FILES and not os.path.exists(resolved):
        raise ConfigurationError(
            f"{path}: {key} = {value!r}: {resolved} does not exist"
        )
    return resolved


def settingsChanged(file: DaemonFile, kinds: Mapping[str, type]) -> str | None:
    """
    Blocking, at a reload: a line naming the settings of the file read at the
    start that differ in it now (a reload applies only its peers), or None.
    """
    try:
        now = readDaemonFile(file.path, kinds)
    except ConfigurationError as e:
        return f"{e}; a reload reads only the peers, the daemon runs on as started"
    keys = set(now.values) | set(file.values)
    changed = sorted(k for k in keys if now.values.get(k) != file.values.get(k))
    if now.hasPeers != file.hasPeers:
        changed.append(PEER_TABLE)
    if not changed:
        return None
    return (
        f"{file.path}: {', '.join(changed)} changed since the start; a reload "
        f"reads only the peers: restart the daemon to apply the rest"
    )
