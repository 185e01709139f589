"""
What a scan of a block sends: pieces (data at an offset, or a zero range), the
block's split into its data extents and holes, and its cut to written ranges.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

#: The unit in which a hole written during a scan is split into data and zeros.
PAGE = 4096
_ZEROS = bytes(1024 * 1024)
_ZERO_PAGE = bytes(PAGE)


@dataclass(frozen=True)
class Piece:
    """A range to send: ``data`` at ``offset``, or ``length`` zeros when it is None."""

    offset: int
    length: int
    data: bytes | None = None


@dataclass(frozen=True)
class BlockScan:
    """
    One block as a scan saw it.

    ``pieces`` is empty when the block did not change since its digest was recorded.
    """

    index: int
    offset: int
    length: int
    pieces: tuple[Piece, ...]


def cutTo(
    pieces: tuple[Piece, ...], ranges: list[tuple[int, int]], start: int, end: int
) -> tuple[Piece, ...]:
    """The parts of ``pieces`` (of the block ``[start, end)``) inside ``ranges``."""
    first = bisect.bisect_right(ranges, (start, start)) - 1
    inside = clip(ranges, max(first, 0), start, end)
    cut = []
    for piece in pieces:
        pieceEnd = piece.offset + piece.length
        for rangeStart, rangeEnd in inside:
            lo, hi = max(piece.offset, rangeStart), min(pieceEnd, rangeEnd)
            if lo >= hi:
                continue
            if piece.data is None:
                cut.append(Piece(lo, hi - lo))
            else:
                skip = lo - piece.offset
                cut.append(Piece(lo, hi - lo, piece.data[skip : skip + hi - lo]))
    return tuple(cut)


def clip(
    extents: list[tuple[int, int]], cursor: int, start: int, end: int
) -> list[tuple[int, int]]:
    """The parts of ``extents`` (sorted, from ``cursor``) inside ``[start, end)``."""
    inside = []
    for extentStart, extentEnd in extents[cursor:]:
        if extentStart >= end:
            break
        if extentEnd > start:
            inside.append((max(extentStart, start), min(extentEnd, end)))
    return inside


def blockPieces(
    start: int, data: bytes, extents: list[tuple[int, int]]
) -> tuple[Piece, ...]:
    """
    Split a block read whole into DATA pieces (its data extents) and zero pieces
    (its holes), so the target allocates what the source allocates.

    A hole that does not read as zeros (written between the extent walk and the
    read) is sent as the pages that hold data: what is sent is always exactly
    what was read, and the target allocates no more than the guest wrote.
    """
    pieces: list[Piece] = []
    position = start
    end = start + len(data)
    for extentStart, extentEnd in [*extents, (end, end)]:
        if extentStart > position:
            pieces += holePieces(position, data[position - start : extentStart - start])
        if extentEnd > extentStart:
            pieces.append(
                piece(extentStart, data[extentStart - start : extentEnd - start])
            )
        position = max(position, extentEnd)
    return tuple(pieces)


def holePieces(offset: int, chunk: bytes) -> list[Piece]:
    """A hole as read: one zero piece, or, if written meanwhile, its pages."""
    if len(chunk) == PAGE:  # one page (a leaf): no copies
        zero = chunk == _ZERO_PAGE
        return [Piece(offset, PAGE) if zero else Piece(offset, PAGE, chunk)]
    if chunk == bytes(len(chunk)):
        return [Piece(offset, len(chunk))]
    pieces: list[Piece] = []
    runStart, runZero = 0, chunk[:PAGE] == _ZERO_PAGE
    for page in range(PAGE, len(chunk) + PAGE, PAGE):
        zero = page < len(chunk) and chunk[page : page + PAGE] == _ZERO_PAGE
        if page < len(chunk) and zero == runZero:
            continue
        stop = min(page, len(chunk))
        if runZero:
            pieces.append(Piece(offset + runStart, stop - runStart))
        else:
            pieces.append(
                Piece(offset + runStart, stop - runStart, chunk[runStart:stop])
            )
        runStart, runZero = stop, zero
    return pieces


def piece(offset: int, chunk: bytes) -> Piece:
    """A zero piece if ``chunk`` is all zeros (one memcmp), else a DATA piece."""
    if chunk == (_ZEROS if len(chunk) == len(_ZEROS) else bytes(len(chunk))):
        return Piece(offset, len(chunk))
    return Piece(offset, len(chunk), chunk)
