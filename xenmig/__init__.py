"""xenmig: migrates a VM's external device state between hosts; and its version."""

from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    """
    xenmig's version, read once: from the installed distribution's metadata,
    else (a source checkout on ``sys.path``, not installed) from the
    ``setup.cfg`` beside the package, marked ``+checkout``; else ``unknown``.
    """
    from importlib import metadata

    try:
        return metadata.version("xenmig")
    except metadata.PackageNotFoundError:
        return _checkoutVersion() or "unknown"


def _checkoutVersion() -> str | None:
    """The ``[metadata] version`` of the checkout's ``setup.cfg``, if there is one."""
    import configparser
    import os

    setup = os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup.cfg")
    config = configparser.ConfigParser()
    if not config.read(setup):
        return None
    found = config.get("metadata", "version", fallback=None)
    return f"{found}+checkout" if found else None
