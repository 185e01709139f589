"""Discovery of device kinds through the Twisted plugin system."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from twisted.logger import Logger

from xenmig.interfaces import IDeviceKind

log = Logger()

#: The built-in kinds: the module and name of each one's plug-in object.
BUILTIN_KINDS = {
    "file": ("xenmig.devices.file", "fileKind"),
    "disk": ("xenmig.devices.disk.kind", "diskKind"),
    "vtpm": ("xenmig.devices.vtpm.kind", "vtpmKind"),
    "devmodel": ("xenmig.devices.devmodel.kind", "devmodelKind"),
}


def deviceKinds() -> dict[str, IDeviceKind]:
    """
    Every installed device kind, by name.

    Built-in kinds and third-party ones alike are dropins under ``twisted/plugins/``
    providing ``IDeviceKind``; the first one found for a name wins.
    """
    from twisted.plugin import getPlugins

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


class LazyKinds(Mapping[str, IDeviceKind]):
    """
    The installed device kinds, by name, found when asked for: a built-in
    kind by importing its own module (a command that migrates a file need not
    import QEMU's or swtpm's code), any other name, or the whole list, through
    the plugin scan of L{deviceKinds} (which imports every dropin and the
    interfaces their cache names).  A built-in name is always the built-in
    kind.
    """

    def __init__(self) -> None:
        self._found: dict[str, IDeviceKind] = {}
        self._all: dict[str, IDeviceKind] | None = None

    def __getitem__(self, name: str) -> IDeviceKind:
        if name in self._found:
            return self._found[name]
        if name in BUILTIN_KINDS:
            module, attribute = BUILTIN_KINDS[name]
            kind: IDeviceKind = getattr(importlib.import_module(module), attribute)
        else:
            kind = self._scanned()[name]
        self._found[name] = kind
        return kind

    def __iter__(self) -> Iterator[str]:
        return iter(self._scanned())

    def __len__(self) -> int:
        return len(self._scanned())

    def _scanned(self) -> dict[str, IDeviceKind]:
        if self._all is None:
            self._all = {**deviceKinds(), **self._builtins()}
        return self._all

    def _builtins(self) -> dict[str, IDeviceKind]:
        return {name: self[name] for name in BUILTIN_KINDS}
