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

import hashlib
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
    NotAuthorized,
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
from xenmig.source.streamtls import StreamTLS, raiseSysCall

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


#: The largest payload of a TLS record: the sender writes whole records.
RECORD = 16384
_TCP_CORK = getattr(socket, "TCP_CORK", None)  # Linux


class _Channel:
    """
    A blocking byte channel on a connected socket: plain TCP, OpenSSL's TLS
    writing its records straight to the socket, or the standard library's.

    What is sent is cut into writes of whole TLS records: small parts (a
    record's header, its padding) travel with the start or the end of the
    large ones, and a partial record is carried to the next L{send} unless
    told to flush.
    """

    def __init__(
        self, sock: socket.socket, tls: SSL.Connection | ssl.SSLSocket | None = None
    ) -> None:
        self.sock: socket.socket = tls if isinstance(tls, ssl.SSLSocket) else sock
        self.tls = tls
        self._carry: list[bytes | memoryview] = []
        self._carried = 0
        self._corked = False

    @classmethod
    def open(cls, sock: socket.socket, endpoint: StreamEndpoint) -> _Channel:
        """Wrap ``sock``; for TLS, run the handshake (blocking)."""
        context = endpoint.context
        if context is None:
            return cls(sock)
        if isinstance(context, StreamTLS):
            return cls(sock, context.handshake(sock, endpoint.serverName))
        try:
            tls = context.wrap_socket(sock, server_hostname=endpoint.serverName)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            raise TimeoutError("the TLS handshake timed out") from None
        channel = cls(sock, tls)
        channel._checkPin(getattr(context, "pins", frozenset()))
        return channel

    def _checkPin(self, pins: frozenset[str]) -> None:
        """Refuse a target whose certificate is not pinned (stdlib contexts)."""
        if not pins or not isinstance(self.tls, ssl.SSLSocket):
            return
        der = self.tls.getpeercert(binary_form=True) or b""
        fingerprint = hashlib.sha256(der).hexdigest()
        if fingerprint not in pins:
            raise NotAuthorized(
                f"the target's certificate (sha256 {fingerprint}) is not the one "
                f"pinned with --pin-sha256"
            )

    def send(self, parts: Sequence[bytes], flush: bool = True) -> None:
        """
        Send ``parts`` in writes of whole TLS records (blocking); keep a last
        partial record for the next call unless ``flush``.
        """
        self._cork(True)
        pending, size = self._carry, self._carried
        for part in parts:
            if len(part) < RECORD:
                pending.append(part)
                size += len(part)
                continue
            view = memoryview(part)
            if pending:
                cut = -size % RECORD
                pending.append(view[:cut])
                self._write(b"".join(pending))
                view = view[cut:]
            whole = len(view) - len(view) % RECORD
            if whole:
                self._write(view[:whole])
            pending = [view[whole:]] if whole < len(view) else []
            size = len(view) - whole
        if flush and pending:
            self._write(b"".join(pending))
            pending, size = [], 0
        self._carry, self._carried = pending, size
        if flush:
            self._cork(False)

    def _cork(self, on: bool) -> None:
        """
        Hold partial segments in the kernel while the records of a batch are
        written (OpenSSL writes each 16 KiB record on its own), send them when
        the batch ends: full-size segments, as one large write would make.
        """
        if self._corked != on and _TCP_CORK is not None:
            self.sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, int(on))
            self._corked = on

    def _write(self, data: bytes | memoryview) -> None:
        if isinstance(self.tls, SSL.Connection):
            try:
                self.tls.sendall(data)
            except SSL.SysCallError as e:
                raiseSysCall(e)
        else:
            self.sock.sendall(data)

    def recv(self, length: int) -> bytes:
        """Blocking: up to ``length`` bytes; b"" at the end of the stream."""
        try:
            if isinstance(self.tls, SSL.Connection):
                return self.tls.recv(length)
            return self.sock.recv(length)
        except (SSL.WantReadError, SSL.WantWriteError, ssl.SSLWantReadError):
            raise TimeoutError("the target did not answer in time") from None
        except BlockingIOError:
            raise TimeoutError("the target did not answer in time") from None
        except SSL.ZeroReturnError:
            return b""
        except SSL.SysCallError as e:
            if e.args and e.args[0] == -1:
                return b""
            raiseSysCall(e)

    def close(self) -> None:
        """
        Close cleanly: flush, then TLS close_notify and the end of the sending
        side.  Once everything is flushed, a failure to close is no loss (the
        target may have closed first, having read the END record): the
        target's answer says whether the stream arrived.
        """
        self.send([], flush=True)
        try:
            if isinstance(self.tls, SSL.Connection):
                self.tls.shutdown()  # the peer's close_notify is not waited for
            elif isinstance(self.tls, ssl.SSLSocket):
                self.tls.setblocking(False)
                try:
                    self.tls.unwrap()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            self.sock.shutdown(socket.SHUT_WR)
        except (OSError, SSL.Error):
            pass
        finally:
            self.sock.close()

    def abort(self) -> None:
        """Unblock any system call on the socket at once (from another thread)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _setTimeout(sock: socket.socket, seconds: float) -> None:
    """
    Bound each blocking receive and send on ``sock`` to ``seconds`` (0: no
    bound), in the kernel: OpenSSL then sees the socket as blocking.
    """
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


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
                _setTimeout(raw, self.timeout)
            try:
                channel = _Channel.open(raw, self)
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
        if kernelTimeout:
            _setTimeout(sock, 0)
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
            if self._room.remove(sum(len(part) for part in item)):
                self.reactor.callFromThread(self._room.release)

    def _pace(self, channel: _Channel, count: int) -> None:
        """Wait (in the sender thread) until the bandwidth allows ``count`` bytes."""
        assert self.bandwidth is not None
        delay = self.bandwidth.take(count)
        while delay > 0:
            step = min(delay, self.keepaliveInterval)
            if self._aborted.wait(step):
                raise StreamError("the stream was aborted")
            delay -= step
            if delay > 0:
                channel.send(encodeKeepalive())

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
