"""
Leaf tables: the blake3 tree of a block below its root, so that a block of which
a few pages changed costs those pages, not the whole block.

blake3 hashes a block as a binary tree of 1 KiB chunks; a 1 MiB block is 256
aligned subtrees of 4 KiB (its *leaves*), and its blake3 digest is the root over
their chaining values (``xenmig.devices.disk._leafhash``, a small native module:
Python's blake3 binding does not give chaining values).  A side that keeps a
block's leaf table (32 bytes per leaf, 8 KiB per block) gets the block's new
digest from its changed leaves alone: the digest is exactly blake3's, so the
content digest (``blake3-blocks-1024k``) means what it always meant.

Tables are kept for blocks that a round after the first sent whole, by both
sides alike (the source as it reads such a block, the target as it receives
it), up to a budget of memory; the native module missing, nothing changes.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

from xenmig.errors import DeviceError

leafhash: ModuleType | None
try:
    leafhash = importlib.import_module("xenmig.devices.disk._leafhash")
except ImportError:  # not built: blocks are hashed whole, as before
    leafhash = None

#: The leaf: the page of a reflink snapshot's difference; QEMU's 64 KiB
#: granules are 16 of them.
LEAF_SIZE = 4096
CHUNK = 1024
VALUE_SIZE = 32
#: Memory for leaf tables, each side: 8 KiB per 1 MiB block, so 64 MiB covers
#: 8 GiB of blocks written during pre-copy; blocks beyond it are hashed whole.
TABLE_BUDGET = 64 * 1024 * 1024


def available() -> bool:
    """Whether leaf tables can be used here (the native module is built)."""
    return leafhash is not None


def blockTable(data: bytes | bytearray | memoryview) -> tuple[bytearray, bytes]:
    """A whole block's leaf table and its blake3 digest."""
    assert leafhash is not None
    table = leafhash.leaves(data, 0, LEAF_SIZE // CHUNK)
    return bytearray(table), leafhash.root(table)


def leafValues(data: bytes | memoryview, leaf: int) -> bytes:
    """The chaining values of whole leaves ``data``, the first being ``leaf``."""
    assert leafhash is not None
    return leafhash.leaves(data, leaf * (LEAF_SIZE // CHUNK), LEAF_SIZE // CHUNK)


def rootOf(table: bytes | bytearray) -> bytes:
    """The blake3 digest of a block from its leaf table."""
    assert leafhash is not None
    return leafhash.root(table)


@cache
def zeroTable(blockSize: int) -> bytes:
    """The leaf table of an all-zero block (the same for every block)."""
    assert leafhash is not None
    return leafhash.leaves(bytes(blockSize), 0, LEAF_SIZE // CHUNK)


def leafRuns(
    ranges: list[tuple[int, int]], start: int, end: int
) -> list[tuple[int, int]]:
    """
    The leaves of the block ``[start, end)`` that ``ranges`` (sorted byte ranges,
    possibly beyond the block) touch, as runs ``(first, stop)`` of leaf indices.
    """
    runs: list[tuple[int, int]] = []
    for lo, hi in ranges:
        lo, hi = max(lo, start), min(hi, end)
        if lo >= hi:
            continue
        first = (lo - start) // LEAF_SIZE
        stop = -(-(hi - start) // LEAF_SIZE)
        if runs and first <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(stop, runs[-1][1]))
        else:
            runs.append((first, stop))
    return runs


class LeafTables:
    """
    The leaf tables of some blocks, up to ``budget`` bytes; for threads that
    work on disjoint blocks.
    """

    def __init__(self, blockSize: int, budget: int = TABLE_BUDGET) -> None:
        self.blockSize = blockSize
        self.tableSize = blockSize // LEAF_SIZE * VALUE_SIZE
        leaves = blockSize // LEAF_SIZE
        fits = blockSize % LEAF_SIZE == 0 and leaves >= 2 and not leaves & (leaves - 1)
        self.most = budget // self.tableSize if available() and fits else 0
        self._tables: dict[int, bytearray] = {}

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, index: int) -> bytearray | None:
        return self._tables.get(index)

    def put(self, index: int, table: bytearray) -> bool:
        """Keep ``table`` for block ``index`` if it has one or there is room."""
        if index in self._tables or len(self._tables) < self.most:
            self._tables[index] = table
            return True
        return False

    def room(self, index: int) -> bool:
        """Whether a table for block ``index`` would be kept."""
        return index in self._tables or len(self._tables) < self.most

    def drop(self, index: int) -> None:
        self._tables.pop(index, None)

    def limit(self, most: int) -> None:
        """Keep at most ``most`` tables from now on (the peer's budget)."""
        self.most = min(self.most, most)


def readLeaves(
    fd: int, start: int, runs: list[tuple[int, int]], describe: str
) -> list[tuple[int, int, bytes]]:
    """Blocking: read the leaf runs of the block at ``start``; ``(lo, hi, data)``."""
    found = []
    for first, stop in runs:
        length = (stop - first) * LEAF_SIZE
        offset = start + first * LEAF_SIZE
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise DeviceError(
                f"{describe} ended at {offset + len(data)} bytes, inside the pages "
                f"read at {offset}: it was truncated under the sender"
            )
        found.append((first, stop, data))
    return found
