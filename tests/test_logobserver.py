"""The daemon's log observer: level, chatter, JSON lines, and how twistd gets it."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.application import service
from twisted.internet import task
from twisted.logger import ILogFilterPredicate, ILogObserver, Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from xenmig import tap
from xenmig.target.logobserver import (
    ConnectionChatter,
    JSONLinesObserver,
    ReadyLine,
    checkLogging,
    daemonObserver,
    eventAsJSON,
    filtered,
    isChatter,
    logFile,
)
from xenmig.target.service import READY_LINE


def event(namespace: str, level: Any = LogLevel.info, **fields: Any) -> dict:
    """A log event as a Logger of ``namespace`` would emit it."""
    fields.setdefault("log_format", "something happened")
    return {
        "log_namespace": namespace,
        "log_level": level,
        "log_time": 1700000000.25,
        **fields,
    }


def passes(level: Any, e: dict) -> bool:
    seen: list[dict] = []
    filtered(seen.append, level)(e)
    return seen == [e]


CHATTER = [
    event("twisted.protocols.amp", log_format="{cls} connection established"),
    event("twisted.protocols.tls"),
    event("log_legacy", log_format="{log_text}", log_text="Factory starting on 8002"),
    event("xenmig.factories.ControlFactory", log_format="Starting factory {factory!r}"),
    event("twisted.web.server"),
]


@pytest.mark.parametrize("chatter", CHATTER)
def test_connectionChatterIsDebug(chatter: dict) -> None:
    """Twisted's lines about connections and ports show only at debug."""
    assert isChatter(chatter)
    assert not passes(LogLevel.info, chatter)
    assert passes(LogLevel.debug, chatter)


def test_whatIsNotChatter() -> None:
    """A migration's event, a warning, or xenmig's own lines are not chatter."""
    amp = "twisted.protocols.amp"
    assert not isChatter(event(amp, migration_id="m-1"))
    assert not isChatter(event(amp, LogLevel.warn))
    assert not isChatter(event("xenmig.target.session", migration_id="m-1"))
    assert not isChatter(event("twisted.internet.base"))  # "Received SIGTERM"
    assert not isChatter(event("twisted.protocols.ampere"))


def test_theLevelFilters() -> None:
    """Events below --log-level are dropped; the ready line never is."""
    info = event("xenmig.target.core")
    assert passes(LogLevel.info, info)
    assert not passes(LogLevel.warn, info)
    assert passes(LogLevel.warn, event("xenmig.target.core", LogLevel.error))
    ready = event("xenmig.target.service", log_format=READY_LINE + ": on {address}")
    assert passes(LogLevel.error, ready)


def test_aJSONLineHasTheEventsFields() -> None:
    """One JSON object: time, level, namespace, text, then every field."""
    e = event(
        "xenmig.target.session",
        log_format="migration {migration_id}: {old} -> {new}",
        migration_id="m-1",
        old="PREPARED",
        new="RECEIVING",
        devices=[{"kind": "file", "name": "blob", "bytes": 3}],
        where=Path("/srv/vms"),
        log_logger=object(),
    )
    line = eventAsJSON(e)
    assert "\n" not in line
    decoded = json.loads(line)
    assert list(decoded)[:4] == ["time", "level", "namespace", "text"]
    assert decoded["time"] == "2023-11-14T22:13:20.250000+00:00"
    assert decoded["level"] == "info"
    assert decoded["namespace"] == "xenmig.target.session"
    assert decoded["text"] == "migration m-1: PREPARED -> RECEIVING"
    assert decoded["migration_id"] == "m-1"
    assert decoded["devices"] == [{"kind": "file", "name": "blob", "bytes": 3}]
    assert decoded["where"] == "/srv/vms"
    assert not any(key.startswith("log_") for key in decoded)


def test_aJSONLineCarriesTheFailure() -> None:
    """A failure's traceback is in ``failure``; odd values become text."""
    failure = Failure(ZeroDivisionError("division by zero"))
    e = event(
        "xenmig.target.commit",
        LogLevel.critical,
        log_format="migration {migration_id}: the commit failed",
        log_failure=failure,
        migration_id="m-2",
        odd={1: {2, 3}, (4, 5): "tuple keys"},
    )
    decoded = json.loads(eventAsJSON(e))
    assert decoded["level"] == "critical"
    assert "ZeroDivisionError" in decoded["failure"]
    assert decoded["migration_id"] == "m-2"
    assert isinstance(decoded["odd"], str)


def test_theJSONObserverWritesLines() -> None:
    """Each event is one line, flushed."""
    out = io.StringIO()
    observer = JSONLinesObserver(out)
    Logger(namespace="xenmig.test", observer=observer).info(
        "migration {migration_id} ended", migration_id="m-3"
    )
    [line] = out.getvalue().splitlines()
    assert json.loads(line)["text"] == "migration m-3 ended"


def test_theDaemonObserverWritesToTheLogfile(tmp_path: Path) -> None:
    """With twistd's --logfile, the JSON lines go there, filtered."""
    path = tmp_path / "xenmig.log"
    observer = daemonObserver("info", "json", {"logfile": str(path)}, task.Clock())
    logger = Logger(namespace="xenmig.test", observer=observer)
    logger.debug("hidden")
    logger.info("shown {migration_id}", migration_id="m-4")
    Logger(namespace="twisted.protocols.amp", observer=observer).info("chatter")
    [line] = path.read_text().splitlines()
    assert json.loads(line)["migration_id"] == "m-4"


def test_whereTheLogGoes(tmp_path: Path) -> None:
    """Standard output with -n or --logfile -, else the file (twistd.log)."""
    clock = task.Clock()
    assert logFile({"nodaemon": True}, clock) is sys.stdout
    assert logFile({"nodaemon": True, "logfile": "-"}, clock) is sys.stdout
    named = logFile({"logfile": str(tmp_path / "x.log")}, clock)
    assert Path(named.path) == tmp_path / "x.log"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("level", "form", "twistd", "complaint"),
    [
        ("loud", "text", {}, "--log-level"),
        ("info", "xml", {}, "--log-format"),
        ("debug", "text", {"logger": print}, "--logger"),
        ("info", "json", {"syslog": True}, "--syslog"),
        ("info", "text", {"logfile": "-"}, "-n"),
    ],
)
def test_loggingOptionsThatCannotApply(
    level: str, form: str, twistd: dict, complaint: str
) -> None:
    """An unknown level or format, or one twistd's options override, is refused."""
    with pytest.raises(ValueError, match=complaint):
        checkLogging(level, form, twistd)
    options = tap.Options()
    options.parent = twistd  # type: ignore[attr-defined]
    with pytest.raises(usage.UsageError, match=complaint):
        options.parseOptions(
            ["--insecure-plaintext", "--log-level", level, "--log-format", form]
        )


def test_twistdInstallsTheDaemonsObserver(tmp_path: Path) -> None:
    """makeService under twistd hands the application its observer component."""
    options = tap.Options()
    options.parent = {"logfile": str(tmp_path / "twistd.log")}  # type: ignore
    options.parseOptions(
        ["--insecure-plaintext", "--state-dir", str(tmp_path), "--log-level", "warn"]
    )
    top = tap.makeService(options)
    application = service.Application("xenmig")
    top.setServiceParent(application)
    observer = application.getComponent(ILogObserver)
    assert observer is not None and observer is top.observer  # type: ignore
    Logger(namespace="xenmig.test", observer=observer).info("hidden")
    Logger(namespace="xenmig.test", observer=observer).warn("shown")
    assert "shown" in (tmp_path / "twistd.log").read_text()
    assert "hidden" not in (tmp_path / "twistd.log").read_text()


def test_noObserverWithoutTwistd(tmp_path: Path) -> None:
    """Assembled outside twistd (tests, embedding), the daemon installs nothing."""
    options = tap.Options()
    options.parseOptions(["--insecure-plaintext", "--state-dir", str(tmp_path)])
    top = tap.makeService(options)
    application = service.Application("xenmig")
    top.setServiceParent(application)
    assert application.getComponent(ILogObserver) is None


def test_twistdsLoggerWins(tmp_path: Path) -> None:
    """With twistd's --logger the daemon makes no observer (nor opens a file)."""
    options = tap.Options()
    logfile = tmp_path / "twistd.log"
    options.parent = {"logger": print, "logfile": str(logfile)}  # type: ignore
    options.parseOptions(["--insecure-plaintext", "--state-dir", str(tmp_path)])
    top = tap.makeService(options)
    assert top.observer is None  # type: ignore[attr-defined]
    assert not logfile.exists()


def test_theObserverAndItsPredicatesProvideTheirInterfaces() -> None:
    """The JSON observer and the two predicates are what twisted.logger expects."""
    verifyObject(ILogObserver, JSONLinesObserver(io.StringIO()))
    verifyObject(ILogFilterPredicate, ConnectionChatter(LogLevel.info))
    verifyObject(ILogFilterPredicate, ReadyLine())
