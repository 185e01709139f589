"""The built-in xenmig device kinds, registered as plugins providing IDeviceKind."""

from xenmig.devices.disk import diskKind
from xenmig.devices.file import fileKind
from xenmig.devices.vtpm import vtpmKind

__all__ = ["diskKind", "fileKind", "vtpmKind"]
