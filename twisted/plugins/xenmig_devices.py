"""The built-in xenmig device kinds, registered as plugins providing IDeviceKind."""

from xenmig.devices.file import fileKind

__all__ = ["fileKind"]
