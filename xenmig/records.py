"""
The framing of a device state stream: a header, then typed records padded to 8 bytes.

After libxl's migration stream v2.  A stream opens with a 16-byte header::

    magic "XENMIGST" | version u32 | options u32

and then carries records, each a 16-byte header and a body padded with zeros to a
multiple of 8 bytes::

    type u32 | flags u32 | length u64 | body[length] | padding

The high bit of ``type`` marks a record as *optional*: a receiver that does not know
it skips it.  An unknown *mandatory* record fails the stream.  All integers are
big-endian.  See ``doc/stream-format.md``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xenmig.errors import StreamError, VersionMismatch

MAGIC = b"XENMIGST"
STREAM_VERSION = 1
#: Versions a receiver accepts: its own (and the previous one, once there is one).
ACCEPTED_STREAM_VERSIONS = frozenset({STREAM_VERSION})

OPTIONAL = 0x8000_0000
TYPE_DATA = 0x0000_0001
TYPE_ZERO = 0x0000_0002
TYPE_METADATA = 0x0000_0003
TYPE_END = 0x0000_0004
TYPE_ROUND = OPTIONAL | 0x0000_0005
TYPE_KEEPALIVE = OPTIONAL | 0x0000_0006

_STREAM_HEADER = struct.Struct(">8sII")
_RECORD_HEADER = struct.Struct(">IIQ")
_U64 = struct.Struct(">Q")
_ZERO_BODY = struct.Struct(">QQ")
_ROUND_BODY = struct.Struct(">II")
_END_FIXED = struct.Struct(">QB")

HEADER_SIZE = _STREAM_HEADER.size
RECORD_HEADER_SIZE = _RECORD_HEADER.size
#: The default largest record body a receiver accepts.
DEFAULT_MAX_BODY = 8 * 1024 * 1024 + 8
#: A DATA record whose data is at least this large is assembled in a block of
#: its own when the parser is given an allocator (L{RecordParser}).
BLOCK_MINIMUM = 64 * 1024
#: The largest metadata record, which a receiver must hold and parse at once.
MAX_METADATA = 60 * 1024

_PADDING = bytes(8)


def _padding(length: int) -> bytes:
    return _PADDING[: -length % 8]


@dataclass(frozen=True)
class DataRecord:
    """State bytes that belong at ``offset`` of the device's logical content."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class ZeroRecord:
    """A range of the logical content that is all zeros (a hole)."""

    offset: int
    length: int


@dataclass(frozen=True)
class MetadataRecord:
    """Handler-defined metadata: a small JSON object."""

    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundRecord:
    """The start of a transfer round (pre-copy rounds, then the final round)."""

    round: int
    final: bool


@dataclass(frozen=True)
class EndRecord:
    """The end of the device's state: its logical size and content digest."""

    size: int
    algorithm: str
    digest: bytes


Record = DataRecord | ZeroRecord | MetadataRecord | RoundRecord | EndRecord


# -- encoding -----------------------------------------------------------------------


def encodeStreamHeader(version: int = STREAM_VERSION, options: int = 0) -> bytes:
    """The 16 bytes that open a stream."""
    return _STREAM_HEADER.pack(MAGIC, version, options)


def _frame(recordType: int, body: list[bytes], flags: int = 0) -> list[bytes]:
    length = sum(len(part) for part in body)
    return [_RECORD_HEADER.pack(recordType, flags, length), *body, _padding(length)]


def encodeData(offset: int, data: bytes) -> list[bytes]:
    """A DATA record as a list of byte strings (the data itself is not copied)."""
    return _frame(TYPE_DATA, [_U64.pack(offset), data])


def encodeZero(offset: int, length: int) -> list[bytes]:
    """A ZERO record for ``length`` bytes at ``offset``."""
    return _frame(TYPE_ZERO, [_ZERO_BODY.pack(offset, length)])


def encodeMetadata(metadata: dict[str, Any]) -> list[bytes]:
    """A METADATA record; ``metadata`` must serialise to at most ``MAX_METADATA``."""
    body = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_METADATA:
        raise ValueError(f"metadata of {len(body)} bytes exceeds {MAX_METADATA}")
    return _frame(TYPE_METADATA, [body])


def encodeRound(round: int, final: bool) -> list[bytes]:
    """An optional ROUND marker."""
    return _frame(TYPE_ROUND, [_ROUND_BODY.pack(round, int(final))])


def encodeKeepalive() -> list[bytes]:
    """An optional, empty KEEPALIVE record that resets the receiver's idle timer."""
    return _frame(TYPE_KEEPALIVE, [])


def encodeEnd(size: int, algorithm: str, digest: bytes) -> list[bytes]:
    """The END record that closes a device's state."""
    name = algorithm.encode("ascii")
    body = _END_FIXED.pack(size, len(name)) + name + bytes([len(digest)]) + digest
    return _frame(TYPE_END, [body])


def encodeRecord(record: Record) -> list[bytes]:
    """Any record value as a list of byte strings."""
    match record:
        case DataRecord(offset, data):
            return encodeData(offset, data)
        case ZeroRecord(offset, length):
            return encodeZero(offset, length)
        case MetadataRecord(metadata):
            return encodeMetadata(metadata)
        case RoundRecord(number, final):
            return encodeRound(number, final)
        case EndRecord(size, algorithm, digest):
            return encodeEnd(size, algorithm, digest)
    raise TypeError(f"not a record: {record!r}")


# -- decoding -----------------------------------------------------------------------


def _decodeBody(recordType: int, view: memoryview) -> Record | None:
    if recordType == TYPE_DATA:
        if len(view) < 8:
            raise StreamError(f"DATA record of {len(view)} bytes has no offset")
        # The data stays a view of the received buffer: no copy on the hot path.
        return DataRecord(_U64.unpack_from(view)[0], view[8:])  # type: ignore[arg-type]
    body = bytes(view)
    if recordType == TYPE_ZERO:
        if len(body) != _ZERO_BODY.size:
            raise StreamError(f"ZERO record has {len(body)} bytes, expected 16")
        return ZeroRecord(*_ZERO_BODY.unpack(body))
    if recordType == TYPE_METADATA:
        return MetadataRecord(_decodeMetadata(body))
    if recordType == TYPE_END:
        return _decodeEnd(body)
    if recordType == TYPE_ROUND:
        if len(body) != _ROUND_BODY.size:
            raise StreamError(f"ROUND record has {len(body)} bytes, expected 8")
        number, final = _ROUND_BODY.unpack(body)
        return RoundRecord(number, bool(final))
    if recordType & OPTIONAL:
        return None  # KEEPALIVE, or an optional type from a newer sender
    raise StreamError(f"unknown mandatory record type 0x{recordType:08x}")


def _decodeMetadata(body: bytes) -> dict[str, Any]:
    try:
        metadata = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise StreamError(f"METADATA record is not JSON: {e}")
    if not isinstance(metadata, dict):
        raise StreamError("METADATA record is not a JSON object")
    return metadata


def _decodeEnd(body: bytes) -> EndRecord:
    try:
        size, nameLength = _END_FIXED.unpack_from(body)
        cursor = _END_FIXED.size
        name = body[cursor : cursor + nameLength].decode("ascii")
        cursor += nameLength
        digestLength = body[cursor]
        digest = body[cursor + 1 : cursor + 1 + digestLength]
    except (struct.error, IndexError, UnicodeDecodeError):
        raise StreamError("END record is malformed")
    if len(digest) != digestLength or cursor + 1 + digestLength != len(body):
        raise StreamError("END record is malformed")
    return EndRecord(size, name, digest)


class RecordParser:
    """
    Incremental parser: feed it bytes as they arrive, take out whole records.

    It holds at most one record (``maxBody`` bytes) beyond what it was fed, whatever
    the length of the stream.  Chunks are kept as they arrive and joined once per
    completed record, so a large record costs one copy, not one per chunk.

    Given ``allocate`` (a function returning a writable buffer of a given
    size, e.g. page-aligned for direct I/O), the data of a large DATA record
    (at least L{BLOCK_MINIMUM} bytes) is instead assembled in a block of its
    own, once its header and offset are parsed: L{feed} copies what arrives
    into it, or the caller reads straight into L{blockSpace} and says how much
    with L{blockFilled} (no copy at all).
    """

    def __init__(
        self,
        maxBody: int = DEFAULT_MAX_BODY,
        allocate: Callable[[int], memoryview] | None = None,
    ) -> None:
        self.maxBody = maxBody
        self.allocate = allocate
        self.version: int | None = None
        self.options = 0
        self.bytesParsed = 0
        self._chunks: list[bytes | memoryview] = []
        self._size = 0
        self._needed = HEADER_SIZE  # bytes required before parsing can progress
        # The DATA record being assembled in a block: its data (and padding),
        # the bytes of it filled so far, its offset, the length of its data.
        self._block: memoryview | None = None
        self._filled = 0
        self._blockOffset = 0
        self._blockData = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed into a record."""
        return self._size + (self._filled if self._block is not None else 0)

    def blockSpace(self) -> memoryview | None:
        """
        Where the rest of the DATA record being assembled goes (write into it,
        then call L{blockFilled}), or None when no record is being assembled.
        """
        if self._block is None:
            return None
        return self._block[self._filled :]

    def blockFilled(self, count: int) -> list[Record]:
        """
        ``count`` more bytes were written at the start of L{blockSpace}; the
        record they complete, if they do.
        """
        assert self._block is not None and count <= len(self._block) - self._filled
        self._filled += count
        self.bytesParsed += count
        if self._filled < len(self._block):
            return []
        return [self._takeBlock()]

    def _takeBlock(self) -> DataRecord:
        assert self._block is not None
        record = DataRecord(self._blockOffset, self._block[: self._blockData])  # type: ignore[arg-type]
        self._block = None
        return record

    def feed(self, data: bytes | memoryview) -> list[Record]:
        """
        Add ``data`` and return the records it completes.

        @raise StreamError: for a malformed header or record.
        @raise VersionMismatch: for a stream version this side does not accept.
        """
        if self._block is None:
            return self._feed(data)
        space = self.blockSpace()
        assert space is not None
        count = min(len(space), len(data))
        space[:count] = data[:count]
        records = self.blockFilled(count)
        if count < len(data):
            records.extend(self._feed(memoryview(data)[count:]))
        return records

    def _feed(self, data: bytes | memoryview) -> list[Record]:
        if self.version is None and self._size + len(data) < HEADER_SIZE:
            prefix = b"".join(self._chunks) + data
            if not MAGIC.startswith(prefix[: len(MAGIC)]):
                raise StreamError("stream does not start with the xenmig magic")
        self._chunks.append(data)
        self._size += len(data)
        if self._size < self._needed:
            return []
        buffer = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        view = memoryview(buffer)
        cursor = 0
        if self.version is None:
            self._parseHeader(buffer)
            cursor = HEADER_SIZE
        records: list[Record] = []
        while True:
            available = len(buffer) - cursor
            if available < RECORD_HEADER_SIZE:
                self._needed = RECORD_HEADER_SIZE
                break
            recordType, _flags, length = _RECORD_HEADER.unpack_from(buffer, cursor)
            self._checkLength(recordType, length)
            total = RECORD_HEADER_SIZE + length + (-length % 8)
            if available < total:
                if self._startBlock(recordType, length, view[cursor:]):
                    cursor = len(buffer)
                    self._needed = RECORD_HEADER_SIZE
                else:
                    self._needed = total
                break
            start = cursor + RECORD_HEADER_SIZE
            record = _decodeBody(recordType, view[start : start + length])
            cursor += total
            if record is not None:
                records.append(record)
        self.bytesParsed += cursor
        # What is left starts the next record: a view, not a copy.
        rest = view[cursor:] if cursor < len(buffer) else b""
        self._chunks = [rest] if rest else []
        self._size = len(rest)
        return records

    def _startBlock(self, recordType: int, length: int, part: memoryview) -> bool:
        """
        Assemble the DATA record that ``part`` (what arrived of it) starts in a
        block of its own, if it is large and its offset has arrived.
        """
        head = RECORD_HEADER_SIZE + 8
        if (
            self.allocate is None
            or recordType != TYPE_DATA
            or length - 8 < BLOCK_MINIMUM
            or len(part) < head
        ):
            return False
        self._blockOffset = _U64.unpack_from(part, RECORD_HEADER_SIZE)[0]
        self._blockData = length - 8
        self._block = self.allocate(length - 8 + (-length % 8))
        self._filled = len(part) - head
        self._block[: self._filled] = part[head:]
        return True

    def _checkLength(self, recordType: int, length: int) -> None:
        if length > self.maxBody:
            raise StreamError(
                f"record type 0x{recordType:08x} of {length} bytes exceeds the "
                f"limit of {self.maxBody} bytes"
            )
        if recordType == TYPE_METADATA and length > MAX_METADATA:
            raise StreamError(f"METADATA record of {length} bytes is too large")

    def _parseHeader(self, buffer: bytes | memoryview) -> None:
        magic, version, options = _STREAM_HEADER.unpack_from(buffer)
        if magic != MAGIC:
            raise StreamError("stream does not start with the xenmig magic")
        if version not in ACCEPTED_STREAM_VERSIONS:
            accepted = ", ".join(str(v) for v in sorted(ACCEPTED_STREAM_VERSIONS))
            raise VersionMismatch(
                f"stream version {version} is not supported (this host accepts "
                f"{accepted})"
            )
        self.version, self.options = version, options
