"""The ``disk`` device kind: images with live pre-copy, both halves, their helpers."""
