"""The ``vtpm`` device kind: a running swtpm's state, both halves."""
