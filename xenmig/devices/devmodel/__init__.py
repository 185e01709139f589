"""The ``devmodel`` device kind: QEMU's device state over QMP, both halves."""
