"""
A test-only device kind, ``held-file``: the ``file`` kind whose target commit
installs the file, then creates a marker and never returns.

A daemon learns it from a dropin on its plugin path (L{writeDropin}); a test
waits for the marker and kills the daemon there: between one device's install
and the journal's next write.  Spec: ``held-file:NAME:path=SRC,target=DST,
target-held=MARKER`` (MARKER: an absolute path the daemon may create).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin
from zope.interface import implementer

from xenmig.devices.file import FileSource, FileTarget
from xenmig.interfaces import IDeviceKind, ISourceContext, ITargetContext
from xenmig.model import DeviceDescription, DeviceSpec

KIND = "held-file"
HELD = "target-held"


class HeldFileSource(FileSource):
    """The ``file`` kind's source, describing itself as ``held-file``."""

    def __init__(self, spec: DeviceSpec, context: ISourceContext) -> None:
        target = {k: v for k, v in spec.targetParams.items() if k != HELD}
        super().__init__(replace(spec, targetParams=target), context)

    def describe(self) -> Deferred[DeviceDescription]:
        d = super().describe()
        return d.addCallback(lambda description: replace(description, kind=KIND))


class HeldFileTarget(FileTarget):
    """The ``file`` kind's target, whose commit holds after installing."""

    def __init__(self, description: DeviceDescription, context: ITargetContext):
        params = {k: v for k, v in description.params.items() if k != HELD}
        super().__init__(replace(description, kind="file", params=params), context)
        self.description = description
        self.marker = str(description.params[HELD])

    def commit(self) -> Deferred[list[str]]:
        return Deferred.fromCoroutine(self._held())

    async def _held(self) -> list[str]:
        await self._commit()  # installed at the destination
        await self.context.runInThread(Path(self.marker).write_text, "installed")
        await Deferred()  # and held here until the daemon is killed
        raise AssertionError("never reached")


@implementer(IPlugin, IDeviceKind)
class HeldFileKind:
    kind = KIND
    summary = "the file kind, held after its install (tests only)"

    def source(self, spec: DeviceSpec, context: Any) -> HeldFileSource:
        return HeldFileSource(spec, context)

    def target(self, description: DeviceDescription, context: Any) -> HeldFileTarget:
        return HeldFileTarget(description, context)


heldFileKind = HeldFileKind()


def writeDropin(root: Path) -> str:
    """
    Make ``root/twisted/plugins`` hold a dropin of this kind; the directory to
    put on a daemon's PYTHONPATH.
    """
    plugins = root / "twisted" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    (plugins / "xenmig_heldfile.py").write_text(
        f"import sys\nsys.path.insert(0, {here!r})\n"
        "from heldfile import heldFileKind  # noqa: E402,F401\n"
    )
    return str(root)
