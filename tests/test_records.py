"""Tests for the stream framing: encoding, incremental parsing, and its errors."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenmig.errors import StreamError, VersionMismatch
from xenmig.records import (
    MAGIC,
    OPTIONAL,
    DataRecord,
    EndRecord,
    MetadataRecord,
    RecordParser,
    RoundRecord,
    ZeroRecord,
    encodeKeepalive,
    encodeRecord,
    encodeStreamHeader,
)

SAMPLE = [
    MetadataRecord({"blob": "permanent", "flags": 1}),
    RoundRecord(0, False),
    DataRecord(0, b"abc"),
    ZeroRecord(3, 4096),
    DataRecord(4099, b"x" * 17),
    EndRecord(4116, "blake3", bytes(range(32))),
]


def encoded(records, header=True):
    data = encodeStreamHeader() if header else b""
    return data + b"".join(b"".join(encodeRecord(r)) for r in records)


def test_roundTrip():
    """Records encoded and parsed in one piece come back equal."""
    assert RecordParser().feed(encoded(SAMPLE)) == SAMPLE


def test_byteByByte():
    """Records fed one byte at a time come back equal and in order."""
    parser = RecordParser()
    out = []
    for byte in encoded(SAMPLE):
        out.extend(parser.feed(bytes([byte])))
    assert out == SAMPLE
    assert parser.buffered == 0


def test_padding():
    """Every record occupies a multiple of 8 bytes on the wire."""
    for record in SAMPLE:
        assert len(b"".join(encodeRecord(record))) % 8 == 0


def test_badMagic():
    """A stream that does not start with the magic fails at once."""
    with pytest.raises(StreamError, match="magic"):
        RecordParser().feed(b"GET / HTTP/1.1\r\n")


def test_badMagicEarly():
    """A wrong first byte fails before the whole header has arrived."""
    with pytest.raises(StreamError, match="magic"):
        RecordParser().feed(b"XQ")


def test_unsupportedVersion():
    """A newer stream version is refused with the versions this side accepts."""
    header = struct.pack(">8sII", MAGIC, 99, 0)
    with pytest.raises(VersionMismatch, match="version 99 is not supported"):
        RecordParser().feed(header)


def test_unknownOptionalSkipped():
    """An unknown optional record is skipped; a keepalive yields nothing."""
    unknown = struct.pack(">IIQ", OPTIONAL | 0x77, 0, 3) + b"abc" + bytes(5)
    data = encodeStreamHeader() + unknown + b"".join(encodeKeepalive())
    data += b"".join(encodeRecord(DataRecord(0, b"z")))
    assert RecordParser().feed(data) == [DataRecord(0, b"z")]


def test_unknownMandatoryFails():
    """An unknown mandatory record type fails the stream, naming the type."""
    unknown = struct.pack(">IIQ", 0x77, 0, 0)
    with pytest.raises(StreamError, match="0x00000077"):
        RecordParser().feed(encodeStreamHeader() + unknown)


def test_oversizedRecord():
    """A record longer than the limit fails before its body is buffered."""
    parser = RecordParser(maxBody=1024)
    header = struct.pack(">IIQ", 1, 0, 1 << 40)
    with pytest.raises(StreamError, match="exceeds the limit"):
        parser.feed(encodeStreamHeader() + header)
    assert parser.buffered < 64


def test_malformedBodies():
    """Short DATA, wrong-sized ZERO, non-JSON METADATA and bad END bodies fail."""
    cases = [
        (1, b"abc"),
        (2, b"\0" * 8),
        (3, b"not json"),
        (3, b"[1, 2]"),
        (4, b"\0" * 9 + b"\x10"),
    ]
    for recordType, body in cases:
        frame = struct.pack(">IIQ", recordType, 0, len(body)) + body
        frame += bytes(-len(body) % 8)
        with pytest.raises(StreamError):
            RecordParser().feed(encodeStreamHeader() + frame)


@given(st.binary(max_size=256))
def test_garbageNeverCrashes(garbage):
    """Arbitrary bytes after the header either parse or raise StreamError."""
    try:
        RecordParser(maxBody=4096).feed(encodeStreamHeader() + garbage)
    except StreamError:
        pass


@given(
    st.lists(
        st.one_of(
            st.builds(DataRecord, st.integers(0, 2**63), st.binary(max_size=64)),
            st.builds(ZeroRecord, st.integers(0, 2**63), st.integers(0, 2**63)),
            st.builds(RoundRecord, st.integers(0, 2**31), st.booleans()),
        ),
        max_size=20,
    ),
    st.integers(1, 50),
)
def test_anySplit(records, step):
    """Any records, fed in chunks of any size, come back equal."""
    data = encoded(records)
    parser = RecordParser()
    out = []
    for i in range(0, len(data), step):
        out.extend(parser.feed(data[i : i + step]))
    assert out == records
