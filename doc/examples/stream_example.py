"""
Print a small device state stream, byte by byte, with what each field means.

``doc/stream-format.md`` quotes the output; ``tests/test_docs.py`` checks that the
quote matches and that xenmig's own parser reads the stream back.  Run it with
``python doc/examples/stream_example.py``.
"""

from __future__ import annotations

import struct

from xenmig.digest import hashBytes
from xenmig.records import (
    HEADER_SIZE,
    RECORD_HEADER_SIZE,
    DataRecord,
    EndRecord,
    MetadataRecord,
    Record,
    RoundRecord,
    ZeroRecord,
    encodeRecord,
    encodeStreamHeader,
)

#: The device's logical content: 15 bytes of data, then a 17-byte hole.
CONTENT = b"hello, xenmig!\n" + bytes(17)


def exampleRecords() -> list[Record]:
    """What a source sends for a device without pre-copy (one final round)."""
    digest = hashBytes(CONTENT)
    return [
        RoundRecord(0, True),
        MetadataRecord({"format": 1}),
        DataRecord(0, CONTENT[:15]),
        ZeroRecord(15, 17),
        EndRecord(digest.size, digest.algorithm, digest.digest),
    ]


def exampleStream() -> bytes:
    """The whole stream: header, then every record."""
    parts = [encodeStreamHeader()]
    for record in exampleRecords():
        parts.extend(encodeRecord(record))
    return b"".join(parts)


def _bodyFields(record: Record, body: bytes) -> list[tuple[int, str]]:
    """(length, meaning) of each field of a record's body, in order."""
    match record:
        case RoundRecord(number, final):
            return [(4, f"round {number}"), (4, f"final {int(final)}")]
        case MetadataRecord():
            return [(len(body), f"JSON {body.decode()}")]
        case DataRecord(offset, data):
            return [(8, f"offset {offset}"), (len(data), f"data {data!r}")]
        case ZeroRecord(offset, length):
            return [(8, f"offset {offset}"), (8, f"length {length}")]
        case EndRecord(size, algorithm, digest):
            return [
                (8, f"logical size {size}"),
                (1, f"algorithm name length {len(algorithm)}"),
                (len(algorithm), f"algorithm {algorithm!r}"),
                (1, f"digest length {len(digest)}"),
                (len(digest), "digest (blake3 of the logical content)"),
            ]
    raise TypeError(record)


_NAMES = {
    RoundRecord: "ROUND 0x80000005 (optional)",
    MetadataRecord: "METADATA 0x00000003",
    DataRecord: "DATA 0x00000001",
    ZeroRecord: "ZERO 0x00000002",
    EndRecord: "END 0x00000004",
}


def annotate() -> str:
    """The stream as lines of ``offset  hex  meaning``, 8 bytes a line at most."""
    stream = exampleStream()
    fields: list[tuple[int, str]] = [(8, "magic 'XENMIGST'"), (4, "version 1")]
    fields.append((4, "options 0"))
    position = HEADER_SIZE
    for record in exampleRecords():
        length = len(b"".join(encodeRecord(record)))
        (bodyLength,) = struct.unpack_from(">Q", stream, position + 8)
        start = position + RECORD_HEADER_SIZE
        body = stream[start : start + bodyLength]
        fields += [
            (4, f"type {_NAMES[type(record)]}"),
            (4, "flags 0"),
        ]
        fields.append((8, f"body length {bodyLength}"))
        fields += _bodyFields(record, body)
        padding = length - RECORD_HEADER_SIZE - bodyLength
        if padding:
            fields.append((padding, f"padding to 8 bytes: {padding} zero byte(s)"))
        position += length
    return "\n".join(_lines(stream, fields))


def _lines(stream: bytes, fields: list[tuple[int, str]]) -> list[str]:
    lines = []
    offset = 0
    for size, meaning in fields:
        for start in range(offset, offset + size, 8):
            chunk = stream[start : min(start + 8, offset + size)]
            label = meaning if start == offset else "..."
            lines.append(f"{start:04x}  {chunk.hex(' '):<23}  {label}")
        offset += size
    assert offset == len(stream), "every byte is described"
    return lines


if __name__ == "__main__":
    print(annotate())
