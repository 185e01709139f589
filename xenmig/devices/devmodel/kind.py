"""The ``devmodel`` device kind, the plug-in: QEMU's device state through QMP."""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from xenmig.devices.devmodel.params import KIND
from xenmig.devices.devmodel.source import DevmodelSource
from xenmig.devices.devmodel.target import DevmodelTarget
from xenmig.interfaces import IDeviceKind, ISourceContext, ITargetContext
from xenmig.model import DeviceDescription, DeviceSpec


@implementer(IPlugin, IDeviceKind)
class DevmodelKind:
    """
    QEMU's state through QMP: ``devmodel:NAME:qmp=PATH,target-qmp=PATH`` or
    ``devmodel:NAME:qmp=PATH,target-statefile=PATH`` (``xen=1``: device state
    only, for a Xen device model).
    """

    kind = KIND
    summary = "QEMU's device state, saved through QMP and loaded into a waiting QEMU"

    def source(self, spec: DeviceSpec, context: ISourceContext) -> DevmodelSource:
        return DevmodelSource(spec, context)

    def target(
        self, description: DeviceDescription, context: ITargetContext
    ) -> DevmodelTarget:
        return DevmodelTarget(description, context)


devmodelKind = DevmodelKind()
