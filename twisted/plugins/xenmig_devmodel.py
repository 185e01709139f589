"""The built-in ``devmodel`` device kind, as a plugin providing IDeviceKind."""

from xenmig.devices.devmodel.kind import devmodelKind

__all__ = ["devmodelKind"]
