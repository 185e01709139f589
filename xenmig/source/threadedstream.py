"""
A state stream sent from its own thread, over the standard library's TLS.

Twisted's TLS runs in Python on the reactor thread, one 16 KiB record at a time;
measured here, that capped a sender at a quarter of a plain socket copy.  A
stream is one-way bulk, so the source sends it from a dedicated thread with a
blocking ``ssl`` socket instead: encryption and ``send`` run in C with the GIL
released, and the reactor only frames records and queues them.  The target is
unchanged: it sees the same mutual-TLS connection, the same ``StartStream``
command, the same records.
"""

from __future__ import annotations

import queue
import socket
import ssl
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, succeed
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig.amp_commands import StartStream
from xenmig.errors import (
    WIRE_ERRORS,
    PeerError,
    StreamError,
)
from xenmig.interfaces import IRecordWriter
from xenmig.model import ContentDigest
from xenmig.pump import Backpressure, TokenBucket
from xenmig.records import (
    encodeEnd,
    encodeKeepalive,
    encodeStreamHeader,
)
from xenmig.source.backoff import NotConnected
from xenmig.source.framing import RecordFraming
from xenmig.source.streamchannel import StreamChannel, setSocketTimeout
from xenmig.source.streamtls import StreamTLS

_FINISH = object()
_CODES = {code: error for error, code in WIRE_ERRORS.items()}
_MAX_ANSWER = 65536


def sslContext(
    identity: PrivateCertificate,
    authorities: Sequence[Certificate],
    pins: Sequence[str] = (),
) -> StreamTLS:
    """
    The TLS settings of threaded streams, equivalent to
    L{xenmig.tls.clientOptions}: the daemon must chain to ``authorities``, name
    the host in its subjectAltName, and be one of ``pins`` (SHA-256
    fingerprints) if any; this host presents ``identity``.  TLS 1.2 at least,
    forward-secret AEAD suites only.  (An C{ssl.SSLContext} is accepted in its
    place, with the standard library's slower TLS.)
    """
    return StreamTLS(identity, authorities, pins)


_Channel = StreamChannel  # the name it had here


@dataclass(frozen=True)
class StreamEndpoint:
    """Where and how a threaded stream connects: the daemon's address and TLS."""

    host: str
    port: int
    context: StreamTLS | ssl.SSLContext | None  # None: the development plaintext mode
    serverName: str
    timeout: float = 30.0

    def connect(self, token: bytes) -> _Channel:
        """
        Blocking: connect, handshake, present ``token`` with StartStream, and
        return the channel, now carrying the raw stream.

        @raise XenmigError: the class the target answered (BadToken, Busy, ...).
        @raise NotConnected: the connection was refused or reset before its
            handshake completed (the target may be at its handshake limits).
        @raise OSError: for another connection or TLS failure.
        """
        try:
            raw = socket.create_connection((self.host, self.port), self.timeout)
        except ConnectionError as e:
            raise NotConnected(e) from e
        # OpenSSL on the socket needs it blocking: the kernel bounds each call.
        kernelTimeout = not isinstance(self.context, ssl.SSLContext)
        sock = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if kernelTimeout:
                raw.settimeout(None)
                setSocketTimeout(raw, self.timeout)
            try:
                channel = StreamChannel.open(raw, self.context, self.serverName)
            except ConnectionError as e:
                raise NotConnected(e) from e
            sock = channel.sock  # the standard library's TLS took over ``raw``
            box = amp.AmpBox(_command=StartStream.commandName, _ask=b"1", token=token)
            channel.send([box.serialize()])
            answer = _readBox(channel)
        except BaseException:
            sock.close()
            raise
        if b"_error" in answer:
            sock.close()
            code = answer.get(b"_error_code", b"")
            text = answer.get(b"_error_description", b"").decode("utf-8", "replace")
            raise _CODES.get(code, PeerError)(text or code.decode("ascii", "replace"))
        tls = channel.tls  # its session tickets came before the answer
        if isinstance(self.context, StreamTLS) and isinstance(tls, SSL.Connection):
            self.context.sessions.keep(tls)
        if kernelTimeout:
            setSocketTimeout(sock, 0)
        else:
            sock.settimeout(None)
        return channel


def _readBox(channel: _Channel) -> dict[bytes, bytes]:
    """Blocking: read one AMP box (the answer to StartStream)."""
    box: dict[bytes, bytes] = {}
    total = 0
    while True:
        (keyLength,) = struct.unpack(">H", _readExactly(channel, 2))
        if keyLength == 0:
            return box
        key = _readExactly(channel, keyLength)
        (valueLength,) = struct.unpack(">H", _readExactly(channel, 2))
        box[key] = _readExactly(channel, valueLength)
        total += keyLength + valueLength
        if total > _MAX_ANSWER:
            raise StreamError("the answer to StartStream is too long")


def _readExactly(channel: _Channel, length: int) -> bytes:
    data = b""
    while len(data) < length:
        more = channel.recv(length - len(data))
        if not more:
            raise StreamError("the target closed the stream connection")
        data += more
    return data


@implementer(IRecordWriter)
class ThreadedStreamSender(RecordFraming):
    """
    An L{IRecordWriter} whose records a dedicated thread sends.

    Writes are queued (each record's parts as they are, no copy); once more than
    ``highWater`` bytes wait, writes return Deferreds that fire when the thread
    has sent the queue down to ``lowWater``.  When nothing is written for
    ``keepalive`` seconds, the thread sends a KEEPALIVE record.  With a
    ``bandwidth`` (a L{TokenBucket} its migration's streams share), the thread
    waits before each record until the bucket allows it, sending KEEPALIVEs
    meanwhile.
    """

    def __init__(
        self,
        reactor: Any,
        device: str,
        keepalive: float = 10.0,
        highWater: int = 16 * 1024 * 1024,
        lowWater: int = 8 * 1024 * 1024,
        bandwidth: TokenBucket | None = None,
    ) -> None:
        super().__init__(device)
        self.bandwidth = bandwidth
        self._aborted = threading.Event()
        self.reactor = reactor
        self.keepaliveInterval = keepalive
        self.highWater = highWater
        self.lowWater = lowWater
        self._queue: queue.Queue[Any] = queue.Queue()
        self._room = Backpressure(highWater, lowWater)
        self._channel: _Channel | None = None
        self._thread: threading.Thread | None = None
        self._finished: Deferred[None] = Deferred()
        #: Bytes of records this thread handed to the kernel (KEEPALIVE excepted).
        self.bytesSent = 0
        self._pacing = False

    @property
    def unsent(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        return self._room.queued

    def open(self, endpoint: StreamEndpoint, token: bytes) -> Deferred[None]:
        """Connect in the sender thread; a Deferred firing once the stream is open."""
        opened: Deferred[None] = Deferred()
        self._thread = threading.Thread(
            target=self._run,
            args=(endpoint, token, opened),
            name=f"xenmig-stream-{self.device}",
            daemon=True,
        )
        self._thread.start()
        return opened

    # -- the sender thread ----------------------------------------------------------

    def _run(self, endpoint: StreamEndpoint, token: bytes, opened: Deferred) -> None:
        try:
            self._channel = endpoint.connect(token)
        except BaseException as e:
            self.reactor.callFromThread(self._opened, opened, Failure(e))
            return
        self.reactor.callFromThread(self._opened, opened, None)
        try:
            self._channel.send([encodeStreamHeader()], flush=False)
            self._sendQueue(self._channel)
            self._channel.send([], flush=True)  # the END record: out of the cork
            self._awaitAcknowledged(self._channel)
            self._channel.close()
            self.reactor.callFromThread(self._finished.callback, None)
        except BaseException as e:
            self.reactor.callFromThread(self._connectionLost, e)

    def _sendQueue(self, channel: _Channel) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.keepaliveInterval)
            except queue.Empty:
                channel.send(encodeKeepalive())
                continue
            if item is _FINISH:
                return
            if item is None:  # aborted
                raise StreamError("the stream was aborted")
            if self.bandwidth is not None:
                self._pace(channel, sum(len(part) for part in item))
            channel.send(item, flush=self._queue.empty())
            size = sum(len(part) for part in item)
            self.bytesSent += size  # read by the reactor's progress watch
            if self._room.remove(size):
                self.reactor.callFromThread(self._room.release)

    def _awaitAcknowledged(self, channel: _Channel) -> None:
        """
        Wait until the target acknowledged every byte (the kernel's send queue
        is empty), so that the stream's progress is watched to its real end;
        the migration's progress watch aborts a stream that stops here.
        """
        pause = 0.001
        while not self._aborted.is_set() and channel.unacknowledged() > 0:
            if not channel.connected():
                raise ConnectionResetError(
                    f"the connection closed with {channel.unacknowledged()} bytes"
                    " not acknowledged by the target"
                )
            self._aborted.wait(pause)
            pause = min(pause * 2, 0.02)

    def progress(self) -> tuple[int, int, int]:
        """
        What moves while this stream makes progress: bytes framed, bytes handed
        to the kernel, bytes the target has not acknowledged yet.
        """
        channel = self._channel
        unacknowledged = channel.unacknowledged() if channel is not None else 0
        return (self.framedBytes, self.bytesSent, unacknowledged)

    @property
    def pacing(self) -> bool:
        """Whether the thread waits out the bandwidth limit (not a stall)."""
        return self._pacing

    def _pace(self, channel: _Channel, count: int) -> None:
        """Wait (in the sender thread) until the bandwidth allows ``count`` bytes."""
        assert self.bandwidth is not None
        delay = self.bandwidth.take(count)
        self._pacing = delay > 0
        if self._pacing:
            channel.send([], flush=True)  # nothing held back while waiting
        try:
            while delay > 0:
                step = min(delay, self.keepaliveInterval)
                if self._aborted.wait(step):
                    raise StreamError("the stream was aborted")
                delay -= step
                if delay > 0:
                    channel.send(encodeKeepalive())
        finally:
            self._pacing = False

    # -- the reactor thread ---------------------------------------------------------

    def _opened(self, opened: Deferred[None], failure: Failure | None) -> None:
        if opened.called:  # given up on (a time-out): do not send
            self.abort()
        elif failure is not None:
            opened.errback(failure)
        else:
            opened.callback(None)

    def _connectionLost(self, error: BaseException) -> None:
        # Even once every record is queued (``_done``), a broken connection is a
        # lost stream: the migration then asks the target why (it usually cut
        # the stream itself, e.g. on a record that failed TLS's check).
        lost = self._lose(str(error))
        if not self._finished.called:
            self._finished.errback(lost)

    def _failWaiting(self, failure: Failure) -> None:
        self._room.fail(failure)

    def _send(self, parts: list[bytes]) -> Deferred[None]:
        self._room.add(sum(len(part) for part in parts))
        self._queue.put(parts)
        return self._room.wait() or succeed(None)

    def finish(self, digest: ContentDigest) -> Deferred[None]:
        """
        Queue the END record; a Deferred firing once everything was handed to the
        kernel and the sending side closed.  The target's DeviceReady answer says
        whether it arrived intact.
        """
        written = self._write(encodeEnd(digest.size, digest.algorithm, digest.digest))
        self._done = True
        self._queue.put(_FINISH)
        return written.addCallback(lambda _: self._finished)

    def abort(self) -> None:
        """Stop sending at once and close the connection (the migration aborts)."""
        self._done = True
        self._finished.addErrback(lambda _: None)  # nobody waits for it now
        self._aborted.set()
        self._queue.put(None)
        if self._channel is not None:
            self._channel.abort()
