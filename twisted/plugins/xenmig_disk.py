"""The built-in ``disk`` device kind, as a plugin providing IDeviceKind."""

from xenmig.devices.disk.kind import diskKind

__all__ = ["diskKind"]
