"""The built-in ``file`` device kind, as a plugin providing IDeviceKind."""

from xenmig.devices.file import fileKind

__all__ = ["fileKind"]
