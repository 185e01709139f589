"""The built-in ``disk`` device kind, as a plugin providing IDeviceKind."""

from xenmig.devices.disk import diskKind

__all__ = ["diskKind"]
