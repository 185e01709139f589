"""
Frozen value objects: device specifications, descriptions, offers, progress;
and the textual forms every room shares (addresses, rates, durations).

Standard library only: the command line's parser imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from xenmig.errors import BadSpec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_MIGRATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
#: A control character (below 32, or DEL) in a parameter's value.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Parameter values: printable, no control characters, bounded.
MAX_VALUE = 4096
#: Integers (sizes, offsets, parameter values) fit in a signed 64-bit off_t.
MAX_INT = 2**63 - 1

#: Keys that describe the target side of a device start with this prefix.
TARGET_PREFIX = "target"


def checkName(what: str, value: str) -> str:
    """
    Return ``value`` if it is a valid device, kind or domain name.

    @raise BadSpec: naming ``what`` and the rule, if it is not.
    """
    if not isinstance(value, str) or not _NAME.match(value):
        raise BadSpec(
            f"{what} {value!r} is invalid: use 1-64 letters, digits, '_', '.', '+' "
            f"or '-', starting with a letter or digit"
        )
    return value


def checkMigrationId(value: str) -> str:
    """
    Return ``value`` if it is a valid migration id.

    @raise BadSpec: naming the rule, if it is not.
    """
    if not isinstance(value, str) or not _MIGRATION_ID.match(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise BadSpec(
            f"migration id {shown} is invalid: use 1-64 letters, digits, '_', '.' "
            f"or '-', starting with a letter or digit"
        )
    return value


def checkParams(what: str, params: dict[str, Any]) -> dict[str, Any]:
    """Return ``params`` if every key and value is well formed, else raise BadSpec."""
    if not isinstance(params, dict):
        raise BadSpec(f"{what}: parameters must be a mapping")
    if len(params) > 64:
        raise BadSpec(f"{what}: too many parameters ({len(params)}, at most 64)")
    for key, value in params.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise BadSpec(f"{what}: parameter name {key!r} is invalid")
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            if not -MAX_INT <= value <= MAX_INT:
                raise BadSpec(f"{what}: parameter {key} is out of range")
            continue
        if not isinstance(value, str):
            raise BadSpec(f"{what}: parameter {key} must be a string or a number")
        if len(value) > MAX_VALUE or _CONTROL.search(value):
            raise BadSpec(f"{what}: parameter {key} has a bad value")
    return params


@dataclass(frozen=True)
class DeviceSpec:
    """
    What the toolstack asks to migrate: ``KIND:NAME:key=val,key=val``.

    Keys starting with ``target`` describe the target side (``target=DST``,
    ``target-ctrl=PATH``); the rest describe the source side.
    """

    kind: str
    name: str
    params: dict[str, str] = field(default_factory=dict)
    targetParams: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checkName("device kind", self.kind)
        checkName("device name", self.name)
        checkParams(f"device {self.name}", self.params)
        checkParams(f"device {self.name}", self.targetParams)

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        """
        Parse ``KIND:NAME[:key=val,key=val...]``.

        @raise BadSpec: with the offending part named.
        """
        parts = text.split(":", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise BadSpec(f"device spec {text!r} is not KIND:NAME[:key=val,...]")
        kind, name = parts[0], parts[1]
        params: dict[str, str] = {}
        targetParams: dict[str, str] = {}
        if len(parts) == 3 and parts[2]:
            for item in parts[2].split(","):
                key, sep, value = item.partition("=")
                key = key.strip()
                if not sep or not key:
                    raise BadSpec(f"device spec {text!r}: {item!r} is not key=val")
                side = targetParams if key.startswith(TARGET_PREFIX) else params
                if key in side:
                    raise BadSpec(f"device spec {text!r}: {key} given twice")
                side[key] = value
        return cls(kind, name, params, targetParams)


@dataclass(frozen=True)
class DeviceDescription:
    """What the source tells the target about one device at Prepare."""

    kind: str
    name: str
    size: int
    params: dict[str, Any] = field(default_factory=dict)
    precopy: bool = False

    def __post_init__(self) -> None:
        checkName("device kind", self.kind)
        checkName("device name", self.name)
        checkParams(f"device {self.name}", self.params)
        if not isinstance(self.size, int) or not 0 <= self.size <= MAX_INT:
            raise BadSpec(
                f"device {self.name}: size must be an integer from 0 to {MAX_INT}"
            )

    def withTargetParams(self, spec: DeviceSpec) -> DeviceDescription:
        """
        This description as the target receives it: with the target keys of
        ``spec`` (the device's spec on the source) added to its parameters.
        """
        params = {**spec.targetParams, **self.params}
        return DeviceDescription(self.kind, self.name, self.size, params, self.precopy)


@dataclass(frozen=True)
class DeviceOffer:
    """A target handler's answer at Prepare: accepted (with parameters) or refused."""

    name: str
    accepted: bool
    reason: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceProgress:
    """A snapshot of one device's transfer."""

    name: str
    kind: str
    state: str
    bytesDone: int
    bytesExpected: int
    rate: float = 0.0
    digest: str = ""
    reason: str = ""


@dataclass(frozen=True)
class MigrationStatus:
    """A snapshot of one migration session, as ``xenmig status`` shows it."""

    migrationId: str
    domain: str
    phase: str
    peer: str
    reason: str
    started: float
    updated: float
    devices: tuple[DeviceProgress, ...] = ()
    installed: tuple[str, ...] = ()

    def toJSON(self) -> dict[str, Any]:
        """A plain dict, for ``--json`` output and the wire."""
        return {
            "migration_id": self.migrationId,
            "domain": self.domain,
            "phase": self.phase,
            "peer": self.peer,
            "reason": self.reason,
            "started": self.started,
            "updated": self.updated,
            "installed": list(self.installed),
            "devices": [
                {
                    "name": d.name,
                    "kind": d.kind,
                    "state": d.state,
                    "bytes_done": d.bytesDone,
                    "bytes_expected": d.bytesExpected,
                    "rate": d.rate,
                    "digest": d.digest,
                    "reason": d.reason,
                }
                for d in self.devices
            ],
        }

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> MigrationStatus:
        """The inverse of ``toJSON``."""
        devices = tuple(
            DeviceProgress(
                d["name"],
                d["kind"],
                d["state"],
                d["bytes_done"],
                d["bytes_expected"],
                d.get("rate", 0.0),
                d.get("digest", ""),
                d.get("reason", ""),
            )
            for d in data.get("devices", [])
        )
        return cls(
            data["migration_id"],
            data["domain"],
            data["phase"],
            data.get("peer", ""),
            data.get("reason", ""),
            data.get("started", 0.0),
            data.get("updated", 0.0),
            devices,
            tuple(data.get("installed", [])),
        )


@dataclass(frozen=True)
class RoundResult:
    """
    What one pre-copy round sent, and how much is still to send.  The
    migration adds what it measured of the round: how long it took
    (``seconds``) and how many of the bytes it queued had not yet left the
    source when it ended (``unsent``).  ``figures`` are the handler's own
    numbers for the report (the ``devmodel`` kind: QEMU's RAM counters), plain
    JSON values.
    """

    bytesSent: int
    remaining: int
    seconds: float | None = None
    unsent: int = 0
    figures: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ContentDigest:
    """The digest of a device's whole logical content, and its size."""

    size: int
    algorithm: str
    digest: bytes

    @property
    def hex(self) -> str:
        """The digest as ``algorithm:hexdigits``, as reports show it."""
        return f"{self.algorithm}:{self.digest.hex()}"


# -- the textual forms every room shares -----------------------------------------------

#: The TCP port a daemon listens on, unless told otherwise.
DEFAULT_PORT = 8002
#: A daemon's state directory (journal, staging, its local control socket).
DEFAULT_STATE_DIR = "/var/lib/xenmig"
#: The daemon's owner-only local socket, in its state directory.
LOCAL_SOCKET = "control.sock"
#: The version of the local socket's send exchange (``migrate --via-daemon``):
#: the command line and the daemon speak the same one.
SEND_PROTOCOL = 1
#: Its AMP commands' names (see amp_commands.py), as the command line's
#: standard-library codec writes them.
SEND_MIGRATION = b"xenmig-send-migration"
SEND_EVENT = b"xenmig-send-event"
INTERRUPT_SEND = b"xenmig-interrupt-send"


def hostPort(host: str, port: int | str) -> str:
    """
    ``HOST:PORT`` as it is written everywhere: an IPv6 address in brackets
    (``[2001:db8::1]:8002``), a name or an IPv4 address as it is; an empty
    host (every address) is ``*``.
    """
    host = host or "*"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def splitHostPort(text: str) -> tuple[str, str]:
    """
    The host and the port of ``HOST:PORT`` or ``[IPv6]:PORT`` (the brackets
    removed); the port is empty when there is none (``HOST``, ``[IPv6]``).

    @raise ValueError: for an IPv6 address without brackets, or unbalanced ones.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")) or ":" not in host:
            raise ValueError(
                f"{text!r}: write an IPv6 address in brackets, as [2001:db8::1]:8002"
            )
        return host, rest[1:]
    if text.count(":") > 1:
        raise ValueError(
            f"{text!r}: write an IPv6 address in brackets, as [{text}] or [{text}]:8002"
        )
    host, _, port = text.partition(":")
    return host, port


#: The lowest bandwidth accepted (bytes per second): slower streams would sit
#: silent for longer than the time-outs allow between records.
MIN_BANDWIDTH = 64 * 1024
_RATE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_RATE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([kmg]?)(?:i?b)?(?:/s)?$", re.IGNORECASE)


def parseBandwidth(text: str) -> int:
    """
    A bandwidth in bytes per second: ``"500M"`` -> 524288000 (K, M, G in powers
    of 1024; a trailing ``B``, ``iB`` or ``/s`` is allowed; a plain number is
    bytes per second).

    @raise ValueError: saying what is wrong with ``text``.
    """
    match = _RATE.match(text.strip())
    if match is None:
        raise ValueError(
            f"bandwidth {text!r} is not a number of bytes per second with an "
            f"optional K, M or G suffix (e.g. 500M)"
        )
    number, unit = match.groups()
    rate = int(float(number) * _RATE_UNITS[unit.lower()])
    if rate < MIN_BANDWIDTH:
        raise ValueError(
            f"bandwidth {text!r} is below the lowest accepted, "
            f"{MIN_BANDWIDTH // 1024}K bytes per second"
        )
    return rate


_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)$", re.IGNORECASE)


def parseDuration(text: str) -> float:
    """
    A duration with its unit, in seconds: ``"300ms"`` -> 0.3, ``"2s"`` -> 2.0.

    @raise ValueError: saying what is wrong with ``text``.
    """
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(
            f"duration {text!r} is not a number with the unit ms or s "
            f"(e.g. 300ms or 0.5s)"
        )
    number, unit = match.groups()
    seconds = float(number) / (1000 if unit.lower() == "ms" else 1)
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be more than zero")
    return seconds
