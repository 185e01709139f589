"""Content digests of device state: blake3 over the logical bytes, holes included."""

from __future__ import annotations

import blake3

from xenmig.model import ContentDigest

ALGORITHM = "blake3"
_ZEROS = bytes(1024 * 1024)


class ContentHasher:
    """
    Hashes a device's logical content fed in offset order: data and zero ranges.

    The digest of a sparse image equals the digest of its dense copy.  Feeding out of
    order is allowed but marks the hasher as ``sequential = False``: the owner must
    then hash the staged content again (see L{hashFile}).
    """

    algorithm = ALGORITHM

    def __init__(self) -> None:
        self._hash = blake3.blake3()
        self.position = 0
        self.sequential = True

    def update(self, offset: int, data: bytes | memoryview) -> None:
        """Hash ``data`` that belongs at ``offset``; safe to call from a thread."""
        if offset != self.position:
            self._gap(offset)
        if self.sequential:
            self._hash.update(data)
            self.position += len(data)

    def zeros(self, offset: int, length: int) -> None:
        """Hash ``length`` zero bytes at ``offset``."""
        if offset != self.position:
            self._gap(offset)
        if not self.sequential:
            return
        remaining = length
        while remaining:
            chunk = min(remaining, len(_ZEROS))
            self._hash.update(memoryview(_ZEROS)[:chunk])
            remaining -= chunk
        self.position += length

    def _gap(self, offset: int) -> None:
        if offset > self.position:
            self.zeros(self.position, offset - self.position)
        else:
            self.sequential = False

    def result(self, size: int | None = None) -> ContentDigest:
        """The digest of everything fed, padded with zeros up to ``size``."""
        if size is not None and size > self.position and self.sequential:
            self.zeros(self.position, size - self.position)
        return ContentDigest(self.position, ALGORITHM, self._hash.digest())


def hashFile(path: str, size: int | None = None, block: int = 4 << 20) -> ContentDigest:
    """
    Blocking: the content digest of the file at ``path`` (holes read as zeros).

    Run it in the thread pool.  ``size`` limits (or zero-pads) the hashed length.
    """
    content = ContentHasher()
    with open(path, "rb", buffering=0) as f:
        while size is None or content.position < size:
            want = block if size is None else min(block, size - content.position)
            data = f.read(want)
            if not data:
                break
            content.update(content.position, data)
    return content.result(size)


def hashBytes(data: bytes) -> ContentDigest:
    """The content digest of a small in-memory state blob."""
    return ContentDigest(len(data), ALGORITHM, blake3.blake3(data).digest())
