"""Clients of the external programs xenmig drives: swtpm, QMP, NBD, processes."""
