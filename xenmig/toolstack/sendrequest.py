"""
What ``xenmig migrate --via-daemon`` and the daemon's local sender agree on:
the options carried to the daemon (and checked there), those refused, the
events sent back.  Standard library only: the command line imports it
without Twisted.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping
from typing import Any

from xenmig.errors import BadSpec
from xenmig.model import MIN_BANDWIDTH, DeviceSpec, checkMigrationId

_TEXT = (str, type(None))
_NUMBER = (int, float, type(None))
#: ``migrate``'s options the daemon takes, by their argparse names, and the
#: JSON types each may have.
CARRIED: dict[str, tuple[type, ...]] = {
    "target": (list,),
    "domain": (str,),
    "device": (list,),
    "migration_id": _TEXT,
    "json": (bool,),
    "live": (bool,),
    "pause_command": _TEXT,
    "resume_command": _TEXT,
    "domain_control": _TEXT,
    "max_rounds": (int, type(None)),
    "convergence": _TEXT,
    "bandwidth": (int, type(None)),
    "max_downtime": _NUMBER,
    "downtime_fallback": _TEXT,
    "command_timeout": (int, float),
    "busy_timeout": _NUMBER,
    "no_resume": (bool,),
    "reconnect_timeout": (int, float),
    "stall_timeout": (int, float),
    "server_name": _TEXT,
    "pin_sha256": (list,),
}
#: The least value of each number the daemon takes (as the parser checks them).
_LEAST = {
    "max_rounds": 1,
    "bandwidth": MIN_BANDWIDTH,
    "max_downtime": 1e-9,
    "command_timeout": 1e-9,
    "busy_timeout": 1e-9,
    "reconnect_timeout": 1e-9,
    "stall_timeout": 0,
}
#: The request's own keys beside the options: whether the caller draws bars.
BARS = "bars"
#: Options that cannot apply when the daemon sends (their argparse names),
#: each with its option and why.
REFUSED: dict[str, tuple[str, str]] = {
    "cert": ("--cert", "the daemon sends as this host, with its own certificate"),
    "key": ("--key", "the daemon sends as this host, with its own key"),
    "ca": ("--ca", "the daemon checks the target with its own CA file"),
    "insecure_plaintext": (
        "--insecure-plaintext",
        "the daemon sends over mutual TLS only",
    ),
    "verbose": ("--verbose", "the daemon logs the migration in its own log"),
}
#: The most characters of text one event carries (AMP values stay far below
#: their 65,535-byte limit); longer text travels in several events.
EVENT_TEXT = 16 * 1024


def refused(args: argparse.Namespace, configured: Mapping[str, Any]) -> str | None:
    """
    The first option given on the command line that cannot apply with
    ``--via-daemon`` (one line naming it), or None.  Values that only come
    from the client files (``configured``: their key -> value) are not refused:
    ``ca`` and ``cert`` there serve the in-process runs.
    """
    for dest, (option, why) in REFUSED.items():
        value = getattr(args, dest, None)
        key = option[2:]
        if value and not (key in configured and configured[key] == value):
            return f"{option} cannot apply with --via-daemon: {why}"
    return None


def requestOptions(args: argparse.Namespace, cwd: str) -> dict[str, Any]:
    """
    ``migrate``'s options as the daemon takes them (JSON).  A device's
    source-side value that names an existing path relative to ``cwd`` is made
    absolute: the daemon does not share the caller's working directory.
    """
    options = {name: getattr(args, name) for name in CARRIED}
    options["target"] = list(args.target)
    options["device"] = [_device(spec, cwd) for spec in args.device]
    return options


def _device(spec: DeviceSpec, cwd: str) -> dict[str, Any]:
    params = dict(spec.params)
    for key, value in params.items():
        if value and not os.path.isabs(value):
            path = os.path.join(cwd, value)
            if os.path.exists(path):
                params[key] = os.path.normpath(path)
    return {
        "kind": spec.kind,
        "name": spec.name,
        "params": params,
        "target_params": dict(spec.targetParams),
    }


def requestArgs(options: Mapping[str, Any]) -> argparse.Namespace:
    """
    The daemon's side: the options as ``migrate``'s parsed arguments.

    @raise BadSpec: naming the option that is missing, unknown or malformed.
    """
    unknown = sorted(set(options) - set(CARRIED) - {BARS})
    if unknown:
        raise BadSpec(
            f"--via-daemon: this daemon does not know the option(s) "
            f"{', '.join(unknown)}: is it older than the command line?"
        )
    for name, kinds in CARRIED.items():
        if name not in options:
            raise BadSpec(f"--via-daemon: the option {name} is missing")
        value = options[name]
        if not isinstance(value, kinds) or (
            isinstance(value, bool) and bool not in kinds
        ):
            raise BadSpec(f"--via-daemon: the option {name} has a wrong type")
    args = argparse.Namespace(command="migrate", **dict(options))
    target = options["target"]
    if not (
        len(target) == 2 and isinstance(target[0], str) and isinstance(target[1], int)
    ):
        raise BadSpec("--via-daemon: the option target is not [HOST, PORT]")
    args.target = (target[0], target[1])
    args.device = [_spec(device) for device in options["device"]]
    if not args.device:
        raise BadSpec("--via-daemon: no --device given")
    if args.migration_id is not None:
        checkMigrationId(args.migration_id)
    for name, least in _LEAST.items():
        value = options[name]
        if value is not None and not value >= least:
            raise BadSpec(f"--via-daemon: the option {name} is below {least}")
    if not all(isinstance(pin, str) for pin in args.pin_sha256):
        raise BadSpec("--via-daemon: the option pin_sha256 is not a list of text")
    return args


def _spec(device: Any) -> DeviceSpec:
    """A device as the command line sent it (checked as DeviceSpec checks it)."""
    try:
        return DeviceSpec(
            device["kind"],
            device["name"],
            dict(device["params"]),
            dict(device["target_params"]),
        )
    except (KeyError, TypeError, ValueError):
        raise BadSpec(f"--via-daemon: malformed device {device!r:.200}")


def chunks(text: str, size: int = EVENT_TEXT) -> Iterator[str]:
    """``text`` in pieces of at most ``size`` characters (one, if it is empty)."""
    yield text[:size]
    for start in range(size, len(text), size):
        yield text[start : start + size]
