"""
Leaf tables: a block's blake3 tree below its root, so that rounds after the first
read, send and hash only the changed pages of a block (the native
``_leafhash``, ``BlockDigests`` with tables, and live rounds from reflink
snapshots on a real XFS through the handler pair).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import blake3
import pytest
import pytest_twisted
from test_disk import (
    FakeSourceContext,
    PipeWriter,
    assertDigestsAreTheModels,
    digestOf,
    makeSpec,
    prepare,
    pwrite,
    treeOf,
)
from twisted.internet.defer import succeed

from xenmig.devices.disk import leaves
from xenmig.devices.disk.imagestaging import BlockDigests, ImageStaging
from xenmig.devices.disk.source import DiskSource
from xenmig.records import EndRecord
from xenmig.source.convergence import FixedRounds

MiB = 1024 * 1024
PAGE = 4096


@pytest.fixture(autouse=True)
def leafhash() -> Any:
    """The native module; its absence skips (fails under CI: the build makes it)."""
    if leaves.leafhash is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("xenmig.devices.disk._leafhash is not built")
        pytest.skip("xenmig.devices.disk._leafhash is not built (pip install -e .)")
    return leaves.leafhash


# -- the tree -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [MiB, 64 * 1024, 16384])
def test_leaves_compose_to_the_blake3_digest(leafhash: Any, size: int) -> None:
    """The root over a block's leaves is its blake3 digest, for any leaf size;
    a leaf hashed alone at its place gives the same value, so a block of which
    one page changed gets its new digest from that page and the table."""
    block = bytearray(os.urandom(size))
    for chunks in (1, 4, 8):
        table = leafhash.leaves(block, 0, chunks)
        assert len(table) == size // (1024 * chunks) * 32
        assert leafhash.root(table) == blake3.blake3(block).digest()
        half = len(table) // 64  # the second half's leaves, alone
        tail = bytes(block[half * 1024 * chunks :])
        assert leafhash.leaves(tail, half * chunks, chunks) == table[half * 32 :]
    table, digest = leaves.blockTable(bytes(block))
    page = size // PAGE - 1  # the last page changes
    block[page * PAGE :] = os.urandom(PAGE)
    table[page * 32 :] = leaves.leafValues(bytes(block[page * PAGE :]), page)
    assert leaves.rootOf(table) == blake3.blake3(block).digest() != digest
    assert leaves.zeroTable(size) == leafhash.leaves(bytes(size), 0, 4)


def test_leafhash_refuses_what_is_not_a_tree(leafhash: Any) -> None:
    """Data that is not whole leaves, a leaf at a misaligned counter, or a root
    over one value or a number that is not a power of two are refused."""
    with pytest.raises(ValueError, match="whole leaves"):
        leafhash.leaves(bytes(5000), 0, 4)
    with pytest.raises(ValueError, match="whole leaves"):
        leafhash.leaves(bytes(4096), 2, 4)
    with pytest.raises(ValueError, match="whole leaves"):
        leafhash.leaves(bytes(3072), 0, 3)
    for count in (1, 3, 6):
        with pytest.raises(ValueError, match="power of two"):
            leafhash.root(bytes(32 * count))


def test_leaf_runs_join_touching_pages() -> None:
    """The leaves a set of byte ranges touches, as runs, inside one block."""
    start = 3 * MiB
    ranges = [(0, 10), (start + 100, start + 5000), (start + 8192, start + 8193)]
    ranges += [(start + MiB - 1, start + 2 * MiB)]
    assert leaves.leafRuns(ranges, start, start + MiB) == [(0, 3), (255, 256)]


# -- the target's block digests -------------------------------------------------------


@pytest.mark.parametrize("seed", range(24))
def test_block_digests_with_leaf_tables(seed: int) -> None:
    """After a round that sends blocks whole, pieces of whole leaves (data or
    zeros) update those blocks' tables and need no reading back, in the final
    round too; any other piece marks its block to be read back; the digests
    are always right."""
    rng = random.Random(seed)
    blockSize = 16 * PAGE
    size = 12 * blockSize + rng.choice([0, 5000])
    count = -(-size // blockSize)
    model = bytearray(size)
    digests = BlockDigests(blockSize)
    irregular = False

    def write(offset: int, length: int, zero: bool) -> None:
        data = None if zero else rng.randbytes(length)
        model[offset : offset + length] = data or bytes(length)
        digests.add(offset, length, data)

    def wholePass(blocks: list[int]) -> None:
        for index in blocks:
            start = index * blockSize
            write(start, min(blockSize, size - start), rng.random() < 0.2)

    wholePass(list(range(count)))
    digests.startRound(1)
    tabled = sorted(rng.sample(range(size // blockSize), 8))
    wholePass(tabled)
    for number in (2, 3):
        digests.startRound(number, final=number == 3)
        for _ in range(rng.randrange(1, 30)):
            index = rng.choice(tabled)
            first = rng.randrange(0, 16)
            stop = rng.randrange(first + 1, 17)
            write(
                index * blockSize + first * PAGE,
                (stop - first) * PAGE,
                rng.random() < 0.3,
            )
        if rng.random() < 0.4:  # not whole leaves, or a block without a table
            irregular = True
            offset = rng.randrange(0, size - 1)
            if rng.random() < 0.5:  # from a tabled block's start
                offset = rng.choice(tabled) * blockSize
            write(offset, rng.randrange(1, min(PAGE, size - offset) + 1), False)
    assertDigestsAreTheModels(digests, model, size, blockSize, irregular)


def test_a_piece_that_is_not_whole_leaves_retires_the_table() -> None:
    """A piece from a tabled block's start that ends inside a leaf cannot go
    into the table: the block is read back, also when whole leaves of it
    follow, and its digest is right."""
    blockSize = 16 * PAGE
    model = bytearray(os.urandom(2 * blockSize))
    digests = BlockDigests(blockSize)
    digests.startRound(1)
    for start in (0, blockSize):
        digests.add(start, blockSize, bytes(model[start : start + blockSize]))
    digests.startRound(2)
    model[:100] = os.urandom(100)  # from the start, not a whole leaf
    digests.add(0, 100, bytes(model[:100]))
    model[5 * PAGE : 6 * PAGE] = os.urandom(PAGE)  # then a whole leaf
    digests.add(5 * PAGE, PAGE, bytes(model[5 * PAGE : 6 * PAGE]))
    model[blockSize + PAGE : blockSize + 2 * PAGE] = bytes(PAGE)  # zeros, block 1
    digests.add(blockSize + PAGE, PAGE)
    table, unknown = digests.table(2 * blockSize)
    assert unknown == [0]
    assert table[32:] == blake3.blake3(model[blockSize:]).digest()


# -- live rounds through the handler pair ---------------------------------------------


class Reads:
    """Counts the bytes ``os.pread`` returns, in any thread."""

    def __init__(self, monkeypatch: Any) -> None:
        self.bytes = 0
        original = os.pread

        def counted(fd: int, length: int, offset: int) -> bytes:
            data = original(fd, length, offset)
            self.bytes += len(data)
            return data

        monkeypatch.setattr(os, "pread", counted)


def scattered(path: Path, rng: random.Random, pages: int, blocks: int) -> int:
    """Write ``pages`` random 4 KiB pages at random places in ``blocks`` blocks."""
    chosen = rng.sample(range(blocks * MiB // PAGE), pages)
    for page in chosen:
        pwrite(str(path), rng.randbytes(PAGE), page * PAGE)
    return len(chosen)


async def liveImage(
    space: Path, tmp_path: Path, offer: bool = True, targetTables: int | None = None
) -> tuple[Path, str, Any]:
    """A dense 32 MiB image on the XFS, prepared (reflink=1) and sent in three
    pre-copy rounds, a page written in every block before round 1, 40 pages
    before round 2.  Without ``offer`` the source does not hear of the target's
    leaf tables (as from an older target); ``targetTables`` caps the target's."""
    rng = random.Random(5)
    image = space / "live.img"
    image.write_bytes(rng.randbytes(32 * MiB))
    destination = str(tmp_path / "dest" / "out.img")
    source = DiskSource(
        makeSpec(str(image), destination, reflink="1"), FakeSourceContext()
    )
    if not offer:
        accepted = source.accepted

        def withoutLeaves(params: dict[str, Any]) -> None:
            accepted({k: v for k, v in params.items() if not k.startswith("leaf_")})

        source.accepted = withoutLeaves  # type: ignore[method-assign]
    migration = await prepare(tmp_path, str(image), destination, source=source)
    assert source._scanner is not None and source._scanner.leafy == offer
    if targetTables is not None:
        migration.target.staged.blocks.tables.most = targetTables

    def between(number: int) -> None:
        if number == 0:  # a little in every block
            for block in range(32):
                pwrite(str(image), rng.randbytes(100), block * MiB + 5 * PAGE)
        else:
            scattered(image, rng, 40, 32)

    if not offer:  # pre-copy rounds send changed blocks whole, as they did
        results = await migration.rounds(FixedRounds(2), between)
        assert [r.bytesSent for r in results] == [32 * MiB, 32 * MiB]
        return image, destination, migration
    results = await migration.rounds(FixedRounds(3), between)
    # Tables from round 0 on, both sides: later rounds send the written pages.
    assert [r.bytesSent for r in results] == [32 * MiB, 32 * PAGE, 40 * PAGE]
    return image, destination, migration


class ReadBacks:
    """The blocks the target reads back from its staged file to hash them."""

    def __init__(self, monkeypatch: Any) -> None:
        self.blocks: list[int] = []
        original = ImageStaging._hashBlocks

        def hashBlocks(
            staging: Any, digests: Any, blocks: list[int], size: int
        ) -> None:
            self.blocks.extend(blocks)
            original(staging, digests, blocks, size)

        monkeypatch.setattr(ImageStaging, "_hashBlocks", hashBlocks)


@pytest_twisted.ensureDeferred
async def test_final_round_costs_the_pages_written(
    space: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """``reflink=1``, scattered 4 KiB writes: with leaf tables on both sides
    from round 0 on, later rounds and the final one read, send and hash only the
    written pages on the source, and the target updates its tables from them
    without reading anything back; the installed image is byte-identical."""
    image, destination, migration = await liveImage(space, tmp_path)
    readBack = ReadBacks(monkeypatch)
    pages = scattered(image, random.Random(9), 60, 32)  # the last writes
    reads = Reads(monkeypatch)
    digest = await migration.final()
    final = migration.source.history[-1]
    assert (final.dataBytes, final.zeroBytes) == (pages * PAGE, 0)
    assert reads.bytes <= pages * PAGE + 64 * 1024  # the pages (and a header)
    assert readBack.blocks == []
    assert digest == await treeOf(str(image))
    assert Path(destination).read_bytes() == image.read_bytes()
    assert await digestOf(destination) == await digestOf(str(image))


@pytest_twisted.ensureDeferred
async def test_a_source_that_keeps_no_tables(
    space: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """A source that did not hear the target's offer (as with an older target)
    sends changed blocks whole before the final round, as before; the target
    keeps tables of the blocks a later round sent whole, so the final round's
    written pages (cut as before) need no reading back there either."""
    image, destination, migration = await liveImage(space, tmp_path, offer=False)
    readBack = ReadBacks(monkeypatch)
    pages = scattered(image, random.Random(9), 60, 32)
    digest = await migration.final()
    assert migration.source.history[-1].dataBytes == pages * PAGE
    assert readBack.blocks == []
    assert digest == await treeOf(str(image))
    assert Path(destination).read_bytes() == image.read_bytes()


@pytest_twisted.ensureDeferred
async def test_pages_for_a_block_without_a_table_are_read_back(
    space: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """A target that keeps fewer tables than the source (out of its memory
    budget) reads the blocks it has none of back from its staged file: the
    digest and the image are still exact."""
    image, destination, migration = await liveImage(space, tmp_path, targetTables=4)
    readBack = ReadBacks(monkeypatch)
    scattered(image, random.Random(9), 60, 32)
    digest = await migration.final()
    assert len(readBack.blocks) > 10
    assert digest == await treeOf(str(image))
    assert Path(destination).read_bytes() == image.read_bytes()


class Tampering(PipeWriter):
    """A pipe that, in the final round, flips a byte of one DATA piece or
    drops one piece (a corrupted or truncated stream)."""

    def __init__(self, target: Any, how: str) -> None:
        super().__init__(target)
        self.how = how
        self.final = False

    def startRound(self, number: int, final: bool) -> None:
        self.final = final
        super().startRound(number, final)

    def writeData(self, offset: int, data: bytes) -> Any:
        if self.final and self.how:
            how, self.how = self.how, ""
            if how == "drop":
                return succeed(None)
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        return super().writeData(offset, data)


@pytest.mark.parametrize("how", ["flip", "drop"])
@pytest_twisted.ensureDeferred
async def test_a_bad_page_in_the_final_round_is_caught(
    space: Path, tmp_path: Path, how: str
) -> None:
    """A page of the final round flipped or lost on the way: the target's
    digest, from its leaf tables, is the digest of what it staged, and it
    differs from the source's (the session fails the device on that)."""
    image, destination, migration = await liveImage(space, tmp_path)
    writer = Tampering(migration.target, how)
    migration.writer = writer
    scattered(image, random.Random(11), 30, 32)
    writer.startRound(3, True)
    digest = await migration.source.sendFinal(writer)
    staged = migration.target.staged
    assert staged is not None
    held = await migration.target.finish(
        EndRecord(digest.size, digest.algorithm, digest.digest)
    )
    assert held != digest and held.size == digest.size
    assert held == await treeOf(staged.path.path)
    await migration.target.abort()
    await migration.source.rollback()
    assert not os.path.exists(destination)
