"""Host pairs: which peers may migrate to this host, and what each may do."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from twisted.python.filepath import FilePath

from xenmig.errors import ConfigurationError, NotAuthorized
from xenmig.model import checkName

log = Logger()

_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_IDENTITY = re.compile(r"^[A-Za-z0-9*][A-Za-z0-9_.:*-]{0,252}$")
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b?)\s*$", re.I)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_KEYS = {"identity", "sha256", "kinds", "roots", "max-sessions", "max-bytes"}


@dataclass(frozen=True)
class Grant:
    """
    What one authenticated peer may do here.  ``None`` means "no limit of this
    policy's own": every installed kind, every ``--allow-root``, the daemon's
    ``--max-sessions``, no byte limit.
    """

    identity: str
    kinds: frozenset[str] | None = None
    roots: tuple[FilePath, ...] | None = None
    maxSessions: int | None = None
    maxBytes: int | None = None
    entry: str = "any peer of the CA (no peers file)"

    def allowsKind(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds


@dataclass(frozen=True)
class PeerEntry:
    """One ``[[peer]]`` table of the peers file."""

    where: str
    identity: str | None
    sha256: str | None
    kinds: frozenset[str] | None
    roots: tuple[FilePath, ...] | None
    maxSessions: int | None
    maxBytes: int | None

    def grant(self, identity: str) -> Grant:
        return Grant(
            identity,
            self.kinds,
            self.roots,
            self.maxSessions,
            self.maxBytes,
            self.where,
        )


class PeerPolicy:
    """
    The peers allowed to migrate to this host.  Without a peers file
    (L{PeerPolicy.open}) any peer whose certificate chains to the CA is allowed
    everything; with one, only the peers it lists, each within its own limits.
    """

    def __init__(self, entries: Sequence[PeerEntry], path: str | None) -> None:
        self.entries = tuple(entries)
        self.path = path

    @classmethod
    def open(cls) -> PeerPolicy:
        """The policy of a daemon without a peers file: every peer of the CA."""
        return cls((), None)

    @property
    def restricted(self) -> bool:
        """Whether a peers file is in force."""
        return self.path is not None

    def authorize(self, identity: str, fingerprint: str = "") -> Grant:
        """
        The grant of the peer named ``identity`` whose certificate has the
        SHA-256 ``fingerprint`` (lowercase hex, or empty when not known).

        @raise NotAuthorized: saying why, if the peers file does not list it.
        """
        if not self.restricted:
            return Grant(identity)
        name = identity.lower()
        pinnedElsewhere = False
        for entry in self.entries:
            nameMatches = entry.identity is None or entry.identity == name
            printMatches = entry.sha256 is None or entry.sha256 == fingerprint
            if nameMatches and printMatches:
                return entry.grant(identity)
            if nameMatches and entry.identity is not None:
                pinnedElsewhere = True
        shown = f"sha256 {fingerprint}" if fingerprint else "no fingerprint"
        if pinnedElsewhere:
            raise NotAuthorized(
                f"{identity} is listed in {self.path}, but its certificate "
                f"({shown}) is not the one pinned there; update the sha256 of its "
                f"[[peer]] entry if its certificate was renewed"
            )
        raise NotAuthorized(
            f"this host does not accept migrations from {identity} (certificate "
            f"{shown}): it is not listed in {self.path}; add a [[peer]] entry "
            f"for it there"
        )


def loadPolicy(
    path: str,
    allowedRoots: Sequence[FilePath],
    kinds: Iterable[str] = (),
    settings: Iterable[str] = (),
) -> PeerPolicy:
    """
    Blocking: read and check a peers file (TOML), or the ``[[peer]]`` tables of
    the daemon's configuration file.

    @param allowedRoots: the daemon's roots; every peer's roots must lie inside.
    @param kinds: the installed device kinds (a peer naming another is logged).
    @param settings: top-level keys to pass over (in a configuration file: the
        daemon's options, read and checked by L{xenmig.target.configfile}).
    @raise ConfigurationError: naming the file, the entry and the problem.
    """
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigurationError(f"peers file {path} does not exist")
    except OSError as e:
        raise ConfigurationError(f"cannot read peers file {path}: {e.strerror}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"peers file {path} is not valid TOML: {e}")
    unknown = set(document) - {"peer"} - set(settings)
    if unknown:
        raise ConfigurationError(
            f"peers file {path}: unknown top-level key(s) "
            f"{', '.join(sorted(unknown))}; give [[peer]] tables"
        )
    tables = document.get("peer", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigurationError(f"peers file {path}: 'peer' must be [[peer]] tables")
    roots = [os.path.realpath(root.path) for root in allowedRoots]
    entries = [
        _entry(f"{path} [[peer]] #{n}", table, roots)
        for n, table in enumerate(tables, 1)
    ]
    _checkDistinct(path, entries)
    installed = set(kinds)
    for entry in entries:
        for kind in sorted((entry.kinds or frozenset()) - installed):
            if installed:
                log.warn(
                    "{where}: kind {kind} is not installed on this host",
                    where=entry.where,
                    kind=kind,
                )
    return PeerPolicy(entries, path)


def _entry(where: str, table: dict[str, Any], roots: list[str]) -> PeerEntry:
    unknown = set(table) - _KEYS
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: "
            f"{', '.join(sorted(_KEYS))})"
        )
    identity = table.get("identity")
    if identity is not None:
        if not isinstance(identity, str) or not _IDENTITY.match(identity):
            raise ConfigurationError(f"{where}: identity {identity!r} is not a name")
        identity = identity.lower()
    sha256 = table.get("sha256")
    if sha256 is not None:
        sha256 = _fingerprint(where, sha256)
    if identity is None and sha256 is None:
        raise ConfigurationError(f"{where}: give identity = NAME, sha256 = HEX or both")
    return PeerEntry(
        where=where + (f" ({identity})" if identity else ""),
        identity=identity,
        sha256=sha256,
        kinds=_kinds(where, table.get("kinds")),
        roots=_roots(where, table.get("roots"), roots),
        maxSessions=_count(where, "max-sessions", table.get("max-sessions")),
        maxBytes=_bytes(where, table.get("max-bytes")),
    )


def _fingerprint(where: str, value: Any) -> str:
    """A SHA-256 fingerprint, as hex with or without colons, lowercased."""
    text = value.replace(":", "").strip().lower() if isinstance(value, str) else ""
    if not _FINGERPRINT.match(text):
        raise ConfigurationError(
            f"{where}: sha256 {value!r} is not a SHA-256 fingerprint (64 hex digits, "
            f"colons allowed: openssl x509 -noout -fingerprint -sha256 -in CERT)"
        )
    return text


def _kinds(where: str, value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise ConfigurationError(f"{where}: kinds must be a list of kind names")
    try:
        return frozenset(checkName("device kind", k) for k in value)
    except Exception as e:
        raise ConfigurationError(f"{where}: {e}")


def _roots(where: str, value: Any, allowed: list[str]) -> tuple[FilePath, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ConfigurationError(f"{where}: roots must be a non-empty list of paths")
    found = []
    for root in value:
        if not isinstance(root, str) or not os.path.isabs(root):
            raise ConfigurationError(f"{where}: root {root!r} is not an absolute path")
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise ConfigurationError(f"{where}: root {root} is not a directory")
        if not any(_within(real, r) for r in allowed):
            raise ConfigurationError(
                f"{where}: root {root} is not inside the daemon's allowed roots "
                f"({', '.join(allowed)}); add it with --allow-root first"
            )
        found.append(FilePath(real))
    return tuple(found)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _count(where: str, key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{where}: {key} must be a whole number of 1 or more")
    return value


def _bytes(where: str, value: Any) -> int | None:
    """An integer, or a size such as ``"500G"``, ``"2TiB"`` (powers of 1024)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or (match.group(3) and not match.group(2)):
        raise ConfigurationError(
            f"{where}: max-bytes {value!r} is not a size (a number of bytes, or "
            f'e.g. "500G", "2TiB")'
        )
    return int(match.group(1)) * 1024 ** _UNITS[match.group(2).lower()]


def _checkDistinct(path: str, entries: list[PeerEntry]) -> None:
    seen: dict[tuple[str | None, str | None], str] = {}
    for entry in entries:
        key = (entry.identity, entry.sha256)
        if key in seen:
            raise ConfigurationError(
                f"peers file {path}: {entry.where} repeats {seen[key]}"
            )
        seen[key] = entry.where


class PolicySource:
    """
    The policy in force, and where it comes from: a peers file that is read
    again when it changes (``reload``: on SIGHUP, and when its modification
    time, size or inode changes, checked by ``changed``).  A file that no longer
    loads keeps the previous policy in force, and says so in the log.
    """

    def __init__(
        self,
        path: str | None,
        allowedRoots: Sequence[FilePath],
        kinds: Iterable[str] = (),
        settings: Iterable[str] = (),
    ) -> None:
        self.path = path
        self.allowedRoots = tuple(allowedRoots)
        self.kinds = tuple(kinds)
        #: With the peers in the configuration file: its other keys.
        self.settings = frozenset(settings)
        self.policy = PeerPolicy.open()
        self._seen: tuple[int, int, int] | None = None

    def load(self) -> PeerPolicy:
        """Blocking, at start-up: read the file; ConfigurationError if it is bad."""
        if self.path is None:
            return self.policy
        stamp = self._statFile()
        self.policy = loadPolicy(
            self.path, self.allowedRoots, self.kinds, self.settings
        )
        self._seen = stamp
        return self.policy

    def changed(self) -> bool:
        """Blocking (one stat): whether the file changed since last read."""
        if self.path is None:
            return False
        try:
            return self._statFile() != self._seen
        except ConfigurationError:
            return self._seen is not None

    def reload(self) -> bool:
        """
        Blocking: read the file again.  True if the new policy is in force;
        False (logged, the previous policy kept) if it does not load.
        """
        if self.path is None:
            return False
        stamp = None
        try:
            stamp = self._statFile()
            policy = loadPolicy(self.path, self.allowedRoots, self.kinds, self.settings)
        except ConfigurationError as e:
            self._seen = stamp  # not tried again until it changes
            log.error(
                "peers file not reloaded, the previous policy stays in force: {error}",
                error=str(e),
            )
            return False
        self.policy, self._seen = policy, stamp
        log.info(
            "peers file {path} loaded: {count} peer(s)",
            path=self.path,
            count=len(policy.entries),
        )
        return True

    def _statFile(self) -> tuple[int, int, int]:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise ConfigurationError(f"peers file {self.path}: {e.strerror}")
        return (st.st_mtime_ns, st.st_size, st.st_ino)
