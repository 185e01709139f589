"""
StreamReceiver: a device's raw stream after StartStream, handed to its session;
and the bulk path its TLS is read through.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from xenmig.errors import InternalError, StreamError, StreamStalled, XenmigError
from xenmig.interfaces import IReceivingSession
from xenmig.model import hostPort
from xenmig.pump import TokenBucket
from xenmig.records import EndRecord, Record, RecordParser, RoundRecord, encodeKeepalive
from xenmig.tls import ALTERED, ALTERED_IN_TRANSIT, describeTLSError

log = Logger()

#: How much a stream connection reads per system call.
READ_SIZE = 1024 * 1024
#: What a TLS receive buffer may hold beyond the bytes just read: the rest of
#: a record that arrived in part (a record's payload and its overhead).
_RECORD_SLACK = 16384 + 512
#: The most one receive buffer holds.  A megabyte DATA record then spans
#: several buffers, which the parser joins into a block of the record's own
#: size: what waits to be written holds no more memory than its bytes (a
#: record viewing a larger buffer would keep all of it).
_MOST = 256 * 1024
_allocate = _ffi.new_allocator(should_clear_after_alloc=False)
#: The alignment of the blocks DATA records are assembled in: a page, what
#: direct I/O asks of memory (L{xenmig.devices.staging.StagedFile}).
_ALIGN = 4096
#: After a DATA record read straight into its block, the next plain read is
#: this small: it holds the next record's header, and little of its data is
#: then copied into that record's block.
_AFTER_BLOCK = 4096


def alignedBlock(size: int) -> memoryview:
    """A writable, page-aligned buffer of ``size`` bytes (not cleared)."""
    raw = _allocate("char[]", size + _ALIGN)
    skip = -int(_ffi.cast("uintptr_t", raw)) % _ALIGN
    return memoryview(_ffi.buffer(raw, size + _ALIGN))[skip : skip + size]  # type: ignore[arg-type]


#: A KEEPALIVE record as it arrives: the source says it has nothing to send.
_KEEPALIVE = b"".join(encodeKeepalive())
#: More bytes than this at once are not KEEPALIVE records only (they come alone).
_KEEPALIVES_AT_ONCE = 64 * len(_KEEPALIVE)


class StreamReceiver(Protocol, TimeoutMixin):
    """
    The raw stream of one device, after StartStream.  It parses records and hands
    them to the session; when the device asks to wait, it pauses the transport.
    Idle for longer than ``idleTimeout`` (reset on every chunk), it aborts.
    With a ``bandwidth`` (the daemon's L{TokenBucket}, which every incoming
    stream shares), it takes each chunk it reads from it and, in debt, pauses
    the transport and holds the chunk until a timer says the debt is paid (the
    idle time-out waits meanwhile): nothing is parsed before it is paid for.

    Without progress for longer than ``stallTimeout`` (0: never) while progress
    is expected, it aborts with L{StreamStalled} naming the device and the phase.
    Progress is any byte but a KEEPALIVE record; it is expected from the
    stream's start, except after a KEEPALIVE (the source has nothing to send:
    between pre-copy and the final round, while the VM is paused) until the
    next record, while the device holds the stream paused, and while the
    ``bandwidth`` limit holds it.
    """

    def __init__(
        self,
        session: IReceivingSession,
        device: str,
        idleTimeout: float,
        charge: Callable[[int], None] | None = None,
        bandwidth: TokenBucket | None = None,
        stallTimeout: float = 0.0,
    ) -> None:
        self.session = session
        self.bandwidth = bandwidth
        self._throttled: Any = None  # the IDelayedCall that resumes reading
        self._held: list[bytes] = []  # read while in debt, not yet paid for
        self._broken = False  # failed or timed out: nothing more is parsed
        self.charge = charge
        self.device = device
        self.idleTimeout = idleTimeout
        self.parser = RecordParser(allocate=alignedBlock)
        self.ended = False
        self.transport: Any = None
        self.callLater = session.clock.callLater  # type: ignore[method-assign,assignment]
        self._records: deque[Record] = deque()
        self._waiting: Deferred[None] | None = None
        self._received = 0
        self._gone: Failure | None = None  # the connection closed, records may wait
        self.stallTimeout = stallTimeout
        self._stall: Any = None  # the progress timer, while progress is expected
        #: What the stream is in, for the stall message.
        self.during = "the start of the stream"

    def connectionMade(self) -> None:
        self.setTimeout(self.idleTimeout)
        self._expectProgress()
        # Bulk: read up to a megabyte per system call, not Twisted's 64 KiB.
        tcp = getattr(self.transport, "transport", self.transport)
        if hasattr(tcp, "bufferSize"):
            tcp.bufferSize = READ_SIZE
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            BulkTLSReader(self.transport, self).install()

    def dataReceived(self, data: bytes) -> None:
        if self.bandwidth is not None and not self.ended:
            delay = self.bandwidth.take(len(data))
            if delay > 0 or self._throttled is not None:
                self._held.append(data)
                self._throttle(delay)
                return
        self._consume(data)

    def _consume(self, data: bytes) -> None:
        self.resetTimeout()
        self._received += len(data)
        if self.ended:
            self._fail(StreamError(f"device {self.device}: data after the END record"))
            return
        try:
            if self.charge is not None:
                self.charge(len(data))
            records = self.parser.feed(data)
        except XenmigError as e:
            self._fail(e)
            return
        self._progressed(data, records)
        self._records.extend(records)
        self._drain()

    def blockSpace(self) -> memoryview | None:
        """
        Where the bulk reader may write the rest of the DATA record being
        assembled (then calling L{blockFilled}), or None: hand bytes to
        L{dataReceived}.  Not while a bandwidth limit counts each read.
        """
        if self.bandwidth is not None or self.ended:
            return None
        return self.parser.blockSpace()

    def blockFilled(self, count: int) -> None:
        """``count`` bytes of the stream were written at the start of L{blockSpace}."""
        self.resetTimeout()
        self._received += count
        try:
            if self.charge is not None:
                self.charge(count)
        except XenmigError as e:
            self._fail(e)
            return
        records = self.parser.blockFilled(count)
        if self._waiting is None and self._throttled is None:
            self._expectProgress()
        if records:
            self._records.extend(records)
            self._drain()

    def _throttle(self, delay: float) -> None:
        """In debt: stop reading for ``delay`` seconds (until all held is paid)."""
        if self._throttled is not None:
            if delay > 0:
                self._throttled.reset(delay)
            return
        if self._gone is None:
            self.transport.pauseProducing()
        self.setTimeout(None)
        self._stopStall()  # held by this host's limit, not by the network
        self._throttled = self.callLater(max(delay, 0.0), self._unthrottle)

    def _unthrottle(self) -> None:
        """The debt is paid: parse what was held; read again (unless in debt)."""
        self._throttled = None
        while self._held and not self._broken:
            self._consume(self._held.pop(0))
        assert self.bandwidth is not None
        debt = self.bandwidth.take(0)
        if debt > 0 and not self.ended:
            self._throttle(debt)
            return
        if self._waiting is None and self._gone is None and not self.ended:
            self.setTimeout(self.idleTimeout)
            self._expectProgress()
            self.transport.resumeProducing()
        self._checkGone()

    def _stopThrottle(self) -> None:
        self._held = []
        if self._throttled is not None:
            if self._throttled.active():
                self._throttled.cancel()
            self._throttled = None

    # -- progress ----------------------------------------------------------------------

    def _progressed(self, data: bytes, records: list[Record]) -> None:
        for record in records:
            if isinstance(record, RoundRecord):
                self.during = (
                    "the final transfer"
                    if record.final
                    else f"pre-copy round {record.round}"
                )
        if len(data) <= _KEEPALIVES_AT_ONCE and data == _KEEPALIVE * (
            len(data) // len(_KEEPALIVE)
        ):
            self._stopStall()  # nothing to send, says the source
        elif self._waiting is None and self._throttled is None:
            self._expectProgress()

    def _expectProgress(self) -> None:
        if self.stallTimeout <= 0 or self.ended:
            return
        if self._stall is not None and self._stall.active():
            self._stall.reset(self.stallTimeout)
        else:
            self._stall = self.callLater(self.stallTimeout, self._stalled)

    def _stopStall(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        if self.ended:
            return
        peer = self.transport.getPeer()
        where = hostPort(str(getattr(peer, "host", peer)), getattr(peer, "port", "?"))
        self._fail(
            StreamStalled(
                f"device {self.device}: no progress for {self.stallTimeout:g} s"
                f" during {self.during} (stream from source {where})"
            )
        )

    def holding(self) -> str:
        """What keeps this stream from ending now, for a message ("": nothing)."""
        if self._waiting is not None:
            return "its device has not finished taking a record"
        if self._held or self._throttled is not None:
            return "it waits out the daemon's bandwidth limit"
        if self._gone is None:
            return "its connection has not closed"
        return ""

    # -- records -----------------------------------------------------------------------

    def _drain(self) -> None:
        while self._records and self._waiting is None and not self.ended:
            record = self._records.popleft()
            try:
                if isinstance(record, EndRecord):
                    if self._records or self.parser.buffered:
                        raise StreamError(
                            f"device {self.device}: data after the END record"
                        )
                    self._end(record)
                    return
                waiting = self.session.recordReceived(self.device, record)
            except XenmigError as e:
                self._fail(e)
                return
            except Exception as e:
                log.failure(
                    "migration {migration_id}: device {device} failed on a record",
                    migration_id=self.session.migrationId,
                    device=self.device,
                )
                self._fail(InternalError(f"the handler failed: {e!r}"))
                return
            if waiting is not None:
                self._pause(waiting)

    def _pause(self, waiting: Deferred[None]) -> None:
        self._waiting = waiting
        self.transport.pauseProducing()
        # While paused we wait on the device, not the network: no idle time-out.
        self.setTimeout(None)
        self._stopStall()
        waiting.addCallbacks(self._resume, self._deviceFailed)

    def _resume(self, _: None) -> None:
        self._waiting = None
        if self._gone is None and self._throttled is None:
            self.setTimeout(self.idleTimeout)
            self._expectProgress()
            self.transport.resumeProducing()
        self._drain()
        self._checkGone()

    def _deviceFailed(self, failure: Failure) -> None:
        self._waiting = None
        self._fail(failure.value or StreamError("device failed"))

    def _end(self, end: EndRecord) -> None:
        self.ended = True
        self.setTimeout(None)
        self._stopStall()
        self.session.streamEnded(self.device, end)
        if self._gone is None:
            self.transport.loseConnection()

    def _fail(self, error: BaseException) -> None:
        self.setTimeout(None)
        self._stopStall()
        self._broken = True
        self._stopThrottle()
        self.ended = True
        log.warn(
            "migration {migration_id}: stream of {device} failed: {error}",
            migration_id=self.session.migrationId,
            device=self.device,
            error=str(error),
        )
        self.session.deviceFailed(self.device, error)
        if self._gone is None:
            self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        self.ended = True
        self._stopStall()
        self._broken = True
        self._stopThrottle()
        self.session.streamLost(
            self.device, f"was idle for more than {self.idleTimeout:g} seconds"
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        # Records may still wait for a paused device: the END among them, if the
        # sender closed right after it.  Decide once they are handed over.
        self.setTimeout(None)
        self._stopStall()
        self._gone = reason
        if not self._held:
            self._stopThrottle()
        self._checkGone()

    def _checkGone(self) -> None:
        if self._gone is None or self.ended or self._waiting is not None:
            return
        if self._held:  # what was read before the close is parsed first
            return
        self.ended = True
        why = self._gone.getErrorMessage()
        if self._gone.check(SSL.Error) and self._gone.value is not None:
            why = f"TLS detected: {describeTLSError(self._gone.value)}"
            if any(clue in why for clue in ALTERED_IN_TRANSIT):
                why += f": {ALTERED}"
        self.session.streamLost(
            self.device, f"was cut off after {self._received} bytes ({why})"
        )


class BulkTLSReader:
    """
    Reads a TLS connection's plaintext in large buffers (a socket read's
    worth, up to 256 KiB each), not Twisted's string per 16 KiB record:
    OpenSSL copies each record's plaintext straight into the buffer (no new
    string), and the protocol gets one call per buffer instead of one per
    record.  While the protocol assembles a large DATA record in a block of
    its own (its C{blockSpace}), the rest of that record is read straight
    into the block (C{blockFilled}): its data is copied once, by OpenSSL.  It
    replaces the receiving half of a L{TLSMemoryBIOProtocol} whose handshake
    is done; the errors are handled as Twisted's own loop handles them.

    The protocol gets a C{memoryview} of a buffer that is never reused: it
    may keep views of it (the parser's zero-copy DATA records).
    """

    def __init__(self, tls: TLSMemoryBIOProtocol, blocks: Any = None) -> None:
        self.tls: Any = tls
        #: What assembles DATA records in blocks (C{blockSpace}), if anything:
        #: the protocol the plaintext reaches, possibly through another.
        self.blocks = blocks
        self.connection: SSL.Connection = tls._tlsConnection
        self._arrived = 0
        self._original = tls.dataReceived

    def install(self) -> None:
        """Take over the TLS protocol's receiving half (if it has the one known)."""
        if not hasattr(self.connection, "_ssl") or not hasattr(
            self.tls, "_flushReceiveBIO"
        ):
            return
        self.tls.dataReceived = self.dataReceived
        self.tls._flushReceiveBIO = self.flush

    def dataReceived(self, data: bytes) -> None:
        self._arrived = len(data)
        self._original(data)  # into the BIO, then L{flush}

    def flush(self) -> None:
        """Deliver every record the BIO holds, then send what TLS has to say."""
        tls, ssl = self.tls, self.connection._ssl
        protocol, blocks = tls.wrappedProtocol, self.blocks
        blockSpace = blocks.blockSpace if blocks is not None else None
        small = False  # the last read went into a block
        while not tls._lostTLSConnection:
            space = blockSpace() if blockSpace is not None else None
            if space is not None and not tls._aborted:
                result, filled = self._readInto(ssl, space)
                if filled:
                    blocks.blockFilled(filled)
                small = True
            else:
                size = min(self._arrived + _RECORD_SLACK + _lib.SSL_pending(ssl), _MOST)
                if small:
                    size = min(size, _AFTER_BLOCK)
                small = False
                self._arrived = max(0, self._arrived - size)
                buffer = _allocate("char[]", size)
                result, filled = self._read(ssl, buffer, size)
                if filled and not tls._aborted:
                    protocol.dataReceived(
                        memoryview(_ffi.buffer(buffer, filled))  # type: ignore[arg-type]
                    )
            if result > 0:
                continue  # the buffer filled up: read on
            self._stopped(result)
            break
        tls._flushSendBIO()

    def _readInto(self, ssl: Any, space: memoryview) -> tuple[int, int]:
        """SSL_read into ``space``, a block's free part."""
        self._arrived = max(0, self._arrived - len(space))
        with _ffi.from_buffer(space, require_writable=True) as pointer:
            return self._read(ssl, pointer, len(space))

    @staticmethod
    def _read(ssl: Any, buffer: Any, size: int) -> tuple[int, int]:
        """SSL_read into ``buffer`` until ``size`` bytes or a stop: (result, filled)."""
        filled, result = 0, 1
        while filled < size:
            result = _lib.SSL_read(ssl, buffer + filled, size - filled)
            if result <= 0:
                break
            filled += result
        return result, filled

    def _stopped(self, result: int) -> None:
        """Handle what stopped SSL_read (its ``result``), as Twisted does."""
        tls = self.tls
        try:
            self.connection._raise_ssl_error(self.connection._ssl, result)
        except SSL.WantReadError:
            pass  # no whole record left
        except SSL.ZeroReturnError:
            tls._shutdownTLS()
            tls._tlsShutdownFinished(None)
        except SSL.Error:
            tls._tlsShutdownFinished(Failure())
