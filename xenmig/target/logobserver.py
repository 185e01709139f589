"""The daemon's log observer: its level, text or JSON lines, and where they go."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

from xenmig.target.service import READY_LINE

#: ``--log-level``: the lowest level written.
LOG_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
#: ``--log-format``: twistd's text lines, or one JSON object per line.
LOG_FORMATS = ("text", "json")
#: Where Twisted says, below warn, that a connection or a port came or went.
CHATTER_NAMESPACES = (
    "twisted.protocols.amp",
    "twisted.protocols.tls",
    "twisted.protocols.policies",
    "twisted.internet.tcp",
    "twisted.internet.unix",
    "twisted.web",
    "log_legacy",  # ports starting and closing, from Twisted's older code
)
#: What every Twisted factory says (in its own class's namespace) as it starts
#: and stops.
CHATTER_FORMATS = frozenset(
    {
        "Starting factory {factory!r}",
        "Stopping factory {factory!r}",
        "Starting protocol {protocol!r}",
        "Stopping protocol {protocol!r}",
    }
)
#: What each JSON line has first; the event's own fields follow.
JSON_KEYS = ("time", "level", "namespace", "text")


def isChatter(event: LogEvent) -> bool:
    """
    Whether ``event`` is Twisted's chatter about connections and ports: below
    warn, about no migration, from L{CHATTER_NAMESPACES} or L{CHATTER_FORMATS}.
    """
    if event.get("log_level", LogLevel.info) >= LogLevel.warn:
        return False
    if "migration_id" in event:
        return False
    namespace = event.get("log_namespace", "")
    return event.get("log_format") in CHATTER_FORMATS or any(
        namespace == n or namespace.startswith(n + ".") for n in CHATTER_NAMESPACES
    )


@implementer(ILogFilterPredicate)
class ConnectionChatter:
    """Takes Twisted's chatter (L{isChatter}) as debug events: kept at debug only."""

    def __init__(self, level: Any) -> None:
        self.level = level

    def __call__(self, event: LogEvent) -> Any:
        if self.level > LogLevel.debug and isChatter(event):
            return PredicateResult.no
        return PredicateResult.maybe


@implementer(ILogFilterPredicate)
class ReadyLine:
    """Keeps the daemon's ready line whatever the level: launchers wait for it."""

    def __call__(self, event: LogEvent) -> Any:
        if str(event.get("log_format", "")).startswith(READY_LINE):
            return PredicateResult.yes
        return PredicateResult.maybe


def filtered(observer: ILogObserver, level: Any) -> ILogObserver:
    """``observer``, seeing only events of ``level`` and above, without chatter."""
    return FilteringLogObserver(
        observer,
        [ReadyLine(), ConnectionChatter(level), LogLevelFilterPredicate(level)],
    )


# -- JSON lines ------------------------------------------------------------------------


def eventAsJSON(event: LogEvent) -> str:
    """
    One event as one line of JSON: L{JSON_KEYS}, ``failure`` (a traceback)
    if it carries one, then every field of the event (``migration_id``, ...)
    but Twisted's own (``log_*``).  What JSON cannot hold is written as text.
    """
    record: dict[str, Any] = {
        "time": _isoTime(event.get("log_time")),
        "level": getattr(event.get("log_level"), "name", ""),
        "namespace": event.get("log_namespace", ""),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    if record["namespace"] != "log_legacy":  # its other keys are legacy noise
        for key, value in event.items():
            if not key.startswith("log_") and key not in record:
                record[key] = value
    try:
        return json.dumps(record, default=str)
    except (TypeError, ValueError):  # keys JSON cannot have, a cycle
        return json.dumps({k: _plain(v) for k, v in record.items()}, default=str)


def _isoTime(when: Any) -> str:
    if not isinstance(when, int | float):
        return ""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds")


def _plain(value: Any) -> Any:
    try:
        json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)
    return value


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event to ``out`` as one line of JSON (L{eventAsJSON})."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: LogEvent) -> None:
        self.out.write(eventAsJSON(event) + "\n")
        self.out.flush()


# -- the daemon's observer -------------------------------------------------------------


def checkLogging(level: str, format: str, twistd: Mapping[str, Any]) -> None:
    """
    @raise ValueError: naming the option, if ``--log-level`` or
        ``--log-format`` is unknown or cannot apply with twistd's options.
    """
    if level not in LOG_LEVELS:
        raise ValueError("--log-level must be debug, info, warn or error")
    if format not in LOG_FORMATS:
        raise ValueError("--log-format must be text or json")
    if twistd.get("logger") and (level != "info" or format != "text"):
        raise ValueError(
            "twistd's --logger installs its own observer: --log-level and "
            "--log-format apply only without it"
        )
    if twistd.get("syslog") and format == "json":
        raise ValueError("--log-format json writes to a file: not with --syslog")
    if twistd.get("logfile") == "-" and not twistd.get("nodaemon"):
        raise ValueError("a daemon cannot log to standard output: give -n")


def daemonObserver(
    level: str, format: str, twistd: Mapping[str, Any], reactor: Any
) -> ILogObserver:
    """
    The observer of ``twistd xenmig``: where twistd's own options say
    (``--syslog``, ``--logfile``, ``-n``: see L{logFile}), in ``format``,
    filtered to ``level``.
    """
    observer: ILogObserver
    if twistd.get("syslog"):
        from twisted.python.syslog import SyslogObserver

        prefix = twistd.get("prefix") or "twisted"
        legacy: Any = SyslogObserver(prefix).emit  # a legacy observer
        observer = LegacyLogObserverWrapper(legacy)
    else:
        out = logFile(twistd, reactor)
        if format == "json":
            observer = JSONLinesObserver(out)
        else:
            observer = textFileLogObserver(out)
    return filtered(observer, LOG_LEVELS[level])


def logFile(twistd: Mapping[str, Any], reactor: Any) -> IO[str]:
    """
    Where twistd would write its log: standard output with ``--logfile -``
    or with ``-n`` and no ``--logfile``; else the ``--logfile`` (default
    ``twistd.log``), rotated past 1 MB and on SIGUSR1.
    """
    name = twistd.get("logfile") or ""
    if name == "-" or (twistd.get("nodaemon") and not name):
        return sys.stdout
    rotating = LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):  # None or SIG_DFL: nobody's
        signal.signal(
            signal.SIGUSR1,
            lambda number, frame: reactor.callFromThread(rotating.rotate),
        )
    return rotating  # type: ignore[return-value]
