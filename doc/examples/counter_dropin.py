"""
The dropin that registers the ``counter`` kind: copy it into ``twisted/plugins/``
of the package that holds the kind (no ``__init__.py`` there), and import the
kind from that package instead of ``example_kind``.
"""

from example_kind import counterKind

__all__ = ["counterKind"]
