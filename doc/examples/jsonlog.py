"""
A log observer factory for ``twistd --logger``: one JSON object per event.

Put this module on the daemon's ``PYTHONPATH`` and start it with
``twistd --logger=jsonlog.observer -n xenmig ...``.  Events keep their fields
(``migration_id``, ``device``, ``reason``, ...), so a log processor can select one
migration.  ``XENMIG_JSON_LOG`` names the file (default: standard output).
"""

from __future__ import annotations

import os
import sys
from typing import IO

from twisted.logger import ILogObserver, jsonFileLogObserver


def observerTo(out: IO[str]) -> ILogObserver:
    """Write every event to ``out`` as JSON (record separator, object, newline)."""
    return jsonFileLogObserver(out)


def observer() -> ILogObserver:
    """What ``twistd --logger=jsonlog.observer`` calls, once, at start-up."""
    path = os.environ.get("XENMIG_JSON_LOG")
    return observerTo(open(path, "a", encoding="utf-8") if path else sys.stdout)
