"""A small NBD client for one question: which ranges of an export a context marks.

It asks with ``NBD_CMD_BLOCK_STATUS`` in one metadata context.  The disk kind
uses it to read a QEMU dirty bitmap (context ``qemu:dirty-bitmap:NAME``) from
QEMU's own NBD server on a unix socket; see L{xenmig.devices.disk.qemudirty}.
The protocol is the fixed-newstyle handshake with structured replies, as in the
NBD protocol document (``doc/proto.md`` of the NBD project); only what the
question needs is spoken: no data is read or written.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from xenmig.errors import DeviceError
from xenmig.limits import withDeadline

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31

INFO_EXPORT = 0

CMD_DISC = 2
CMD_BLOCK_STATUS = 7

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15

#: The longest range asked about at once (the length field has 32 bits).
MAX_QUERY = 1 << 31
#: No reply to the questions asked here is anywhere near this long.
MAX_PAYLOAD = 16 * 1024 * 1024

_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_CHUNK = struct.Struct(">IHHQI")
_EXTENT = struct.Struct(">II")


class NBDError(DeviceError):
    """The NBD server refused, answered with an error, or broke the protocol."""


class _Reader(Protocol):
    """Bytes in, exact reads out: ``read(n)`` fires once ``n`` bytes have come."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._want: tuple[int, Deferred[bytes]] | None = None
        self._lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > 2 * MAX_PAYLOAD:  # nothing asked for is this long
            self._buffer.clear()
            transport = self.transport
            assert transport is not None
            getattr(transport, "abortConnection", transport.loseConnection)()
            return
        self._deliver()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = reason
        if self._want is not None:
            _, d = self._want
            self._want = None
            d.errback(NBDError("the NBD server closed the connection mid-answer"))

    def read(self, count: int) -> Deferred[bytes]:
        assert self._want is None, "one read at a time"
        if len(self._buffer) < count and self._lost is not None:
            return fail(NBDError("the NBD server closed the connection mid-answer"))
        d: Deferred[bytes] = Deferred()
        self._want = (count, d)
        self._deliver()
        return d

    def _deliver(self) -> None:
        if self._want is None or len(self._buffer) < self._want[0]:
            return
        count, d = self._want
        self._want = None
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        d.callback(data)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and self._lost is None:
            self.transport.loseConnection()


class BlockStatusClient:
    """
    One connection to one export, negotiated for one metadata context.

    Built by L{connectBlockStatus}; ask with L{marked}, then L{close}.
    """

    def __init__(self, reader: _Reader, size: int, contextId: int) -> None:
        self._reader = reader
        self.size = size
        self._contextId = contextId
        self._cookies = 0

    def marked(
        self, flag: int, onRange: Callable[[int, int], object]
    ) -> Deferred[None]:
        """
        Walk the whole export; call ``onRange(start, stop)`` for every range whose
        status has ``flag`` set (adjacent ranges are joined).
        """
        return Deferred.fromCoroutine(self._marked(flag, onRange))

    async def _marked(self, flag: int, onRange: Callable[[int, int], object]) -> None:
        offset = 0
        markedFrom: int | None = None
        while offset < self.size:
            length = min(self.size - offset, MAX_QUERY)
            extents = await self._blockStatus(offset, length)
            before = offset
            for extentLength, status in extents:
                if extentLength == 0 or offset >= self.size:
                    break
                extentLength = min(extentLength, self.size - offset)
                if status & flag:
                    if markedFrom is None:
                        markedFrom = offset
                elif markedFrom is not None:
                    onRange(markedFrom, offset)
                    markedFrom = None
                offset += extentLength
            if offset == before:
                raise NBDError(f"the NBD server described nothing at offset {offset}")
        if markedFrom is not None:
            onRange(markedFrom, offset)

    async def _blockStatus(self, offset: int, length: int) -> list[tuple[int, int]]:
        self._cookies += 1
        cookie = self._cookies
        self._reader.write(
            _REQUEST.pack(REQUEST_MAGIC, 0, CMD_BLOCK_STATUS, cookie, offset, length)
        )
        extents: list[tuple[int, int]] = []
        while True:
            header = await self._reader.read(4)
            (magic,) = struct.unpack(">I", header)
            if magic == SIMPLE_REPLY_MAGIC:
                rest = await self._reader.read(12)
                error, _ = struct.unpack(">IQ", rest)
                raise NBDError(f"the NBD server refused BLOCK_STATUS (error {error})")
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NBDError(f"unexpected reply magic {magic:#x} from the NBD server")
            _, flags, kind, handle, size = _CHUNK.unpack(
                header + await self._reader.read(_CHUNK.size - 4)
            )
            if size > MAX_PAYLOAD:
                raise NBDError(f"an NBD reply of {size} bytes is not believable")
            payload = await self._reader.read(size) if size else b""
            if handle != cookie:
                raise NBDError(
                    f"the NBD server answered request {handle}, not {cookie}"
                )
            if kind & REPLY_TYPE_ERROR_BIT:
                raise NBDError(f"the NBD server failed BLOCK_STATUS: {_error(payload)}")
            if kind == REPLY_TYPE_BLOCK_STATUS and size >= 4:
                (contextId,) = struct.unpack_from(">I", payload)
                if contextId == self._contextId:
                    extents += _EXTENT.iter_unpack(payload[4 : 4 + (size - 4) // 8 * 8])
            elif kind != REPLY_TYPE_NONE:
                raise NBDError(f"unexpected NBD reply chunk type {kind}")
            if flags & REPLY_FLAG_DONE:
                return extents

    def close(self) -> None:
        """Say goodbye (``NBD_CMD_DISC``) and close."""
        self._cookies += 1
        self._reader.write(
            _REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, self._cookies, 0, 0)
        )
        self._reader.close()


def connectBlockStatus(
    reactor: object, socketPath: str, export: str, context: str, timeout: float
) -> Deferred[BlockStatusClient]:
    """
    Connect to the NBD server on the unix socket ``socketPath``, and negotiate
    structured replies, the metadata ``context`` and the ``export``.

    @return: a Deferred firing with a L{BlockStatusClient}, or failing with
        L{NBDError} (or a time-out after ``timeout`` seconds, naming the socket).
    """

    async def connect() -> BlockStatusClient:
        reader = _Reader()
        try:
            await connectProtocol(UNIXClientEndpoint(reactor, socketPath), reader)
        except ConnectError as e:
            raise NBDError(f"cannot connect to the NBD server at {socketPath}: {e}")
        try:
            return await _negotiate(reader, export, context)
        except BaseException:
            reader.close()
            raise

    return withDeadline(
        Deferred.fromCoroutine(connect()),
        timeout,
        reactor,  # type: ignore[arg-type]
        f"the NBD server at {socketPath} did not answer within {timeout:g} s",
    )


async def _negotiate(reader: _Reader, export: str, context: str) -> BlockStatusClient:
    greeting = await reader.read(18)
    magic, option, flags = struct.unpack(">8sQH", greeting)
    if magic != NBDMAGIC or option != IHAVEOPT:
        raise NBDError("the peer is not a newstyle NBD server")
    if not flags & FLAG_FIXED_NEWSTYLE:
        raise NBDError("the NBD server does not speak fixed newstyle")
    reader.write(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))

    name = export.encode()
    await _option(reader, OPT_STRUCTURED_REPLY, b"")
    query = context.encode()
    replies = await _option(
        reader,
        OPT_SET_META_CONTEXT,
        struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query)) + query,
    )
    contexts = {
        data[4:].decode(errors="replace"): struct.unpack_from(">I", data)[0]
        for kind, data in replies
        if kind == REP_META_CONTEXT and len(data) >= 4
    }
    if context not in contexts:
        raise NBDError(f"the NBD export {export!r} has no metadata context {context!r}")
    replies = await _option(
        reader, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    )
    size = None
    for kind, data in replies:
        if kind == REP_INFO and len(data) >= 12:
            (info,) = struct.unpack_from(">H", data)
            if info == INFO_EXPORT:
                size = struct.unpack_from(">Q", data, 2)[0]
    if size is None:
        raise NBDError(f"the NBD server did not give the size of export {export!r}")
    return BlockStatusClient(reader, size, contexts[context])


async def _option(reader: _Reader, option: int, data: bytes) -> list[tuple[int, bytes]]:
    """Send one option; its replies up to the final ACK, as ``(type, data)``."""
    reader.write(_OPTION.pack(IHAVEOPT, option, len(data)) + data)
    replies: list[tuple[int, bytes]] = []
    while True:
        magic, replyOption, kind, length = _OPTION_REPLY.unpack(
            await reader.read(_OPTION_REPLY.size)
        )
        if magic != OPTION_REPLY_MAGIC or replyOption != option:
            raise NBDError(f"the NBD server's reply to option {option} is malformed")
        if length > MAX_PAYLOAD:
            raise NBDError(f"an NBD option reply of {length} bytes is not believable")
        payload = await reader.read(length) if length else b""
        if kind & REP_FLAG_ERROR:
            message = payload.decode(errors="replace") or f"error {kind & 0xFFFF}"
            raise NBDError(f"the NBD server refused option {option}: {message}")
        if kind == REP_ACK:
            return replies
        replies.append((kind, payload))


def _error(payload: bytes) -> str:
    if len(payload) < 6:
        return "no details"
    error, length = struct.unpack_from(">IH", payload)
    message = payload[6 : 6 + length].decode(errors="replace")
    return f"{message} (error {error})" if message else f"error {error}"
