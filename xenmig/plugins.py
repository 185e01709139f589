"""Discovery of device kinds through the Twisted plugin system."""

from __future__ import annotations

from twisted.logger import Logger
from twisted.plugin import getPlugins

from xenmig.interfaces import IDeviceKind

log = Logger()


def deviceKinds() -> dict[str, IDeviceKind]:
    """
    Every installed device kind, by name.

    Built-in kinds and third-party ones alike are dropins under ``twisted/plugins/``
    providing ``IDeviceKind``; the first one found for a name wins.
    """
    import twisted.plugins

    kinds: dict[str, IDeviceKind] = {}
    for kind in getPlugins(IDeviceKind, twisted.plugins):
        if kind.kind in kinds:
            log.warn(
                "device kind {kind} is provided twice; using the first", kind=kind.kind
            )
            continue
        kinds[kind.kind] = kind
    return kinds
