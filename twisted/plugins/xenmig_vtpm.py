"""The built-in ``vtpm`` device kind, as a plugin providing IDeviceKind."""

from xenmig.devices.vtpm.kind import vtpmKind

__all__ = ["vtpmKind"]
