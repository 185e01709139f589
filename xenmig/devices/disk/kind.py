"""The ``disk`` device kind, the plug-in: raw and qcow2 images with live pre-copy."""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from xenmig.devices.disk.params import KIND
from xenmig.devices.disk.source import DiskSource
from xenmig.devices.disk.target import DiskTarget
from xenmig.interfaces import IDeviceKind, ISourceContext, ITargetContext
from xenmig.model import DeviceDescription, DeviceSpec


@implementer(IPlugin, IDeviceKind)
class DiskKind:
    """
    Raw and qcow2 images, live:
    ``disk:NAME:path=SRC,target=DST[,format=raw|qcow2][,target-overwrite=yes]``.
    """

    kind = KIND
    summary = (
        "raw and qcow2 disk images, sparse, with live pre-copy rounds "
        "(changed blocks from QEMU's dirty bitmaps or reflink snapshots)"
    )

    def source(self, spec: DeviceSpec, context: ISourceContext) -> DiskSource:
        return DiskSource(spec, context)

    def target(
        self, description: DeviceDescription, context: ITargetContext
    ) -> DiskTarget:
        return DiskTarget(description, context)


diskKind = DiskKind()
