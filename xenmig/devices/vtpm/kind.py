"""The ``vtpm`` device kind, the plug-in: a running swtpm's state."""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from xenmig.devices.vtpm.source import VTPMSource
from xenmig.devices.vtpm.target import VTPMTarget
from xenmig.interfaces import IDeviceKind, ISourceContext, ITargetContext
from xenmig.model import DeviceDescription, DeviceSpec


@implementer(IPlugin, IDeviceKind)
class VTPMKind:
    """
    A running swtpm vTPM: ``vtpm:NAME:ctrl=PATH,target-ctrl=PATH`` or
    ``vtpm:NAME:ctrl=PATH,target-statedir=DIR[,target-key=FILE]``.
    """

    kind = "vtpm"
    summary = "a swtpm virtual TPM, moved through its control channel and resumed"

    def source(self, spec: DeviceSpec, context: ISourceContext) -> VTPMSource:
        return VTPMSource(spec, context)

    def target(
        self, description: DeviceDescription, context: ITargetContext
    ) -> VTPMTarget:
        return VTPMTarget(description, context)


vtpmKind = VTPMKind()
