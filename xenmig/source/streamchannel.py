"""
The byte channel of a threaded stream: a blocking socket, plain or TLS, that
sends in writes of whole TLS records and says what the kernel still holds.
"""

from __future__ import annotations

import fcntl
import hashlib
import socket
import ssl
import struct
import termios
from collections.abc import Sequence

from OpenSSL import SSL

from xenmig.errors import NotAuthorized
from xenmig.source.streamtls import StreamTLS, fill, flushTo, raiseSysCall

#: The largest payload of a TLS record: the sender writes whole records.
RECORD = 16384
_TCP_CORK = getattr(socket, "TCP_CORK", None)  # Linux


#: TCP_ESTABLISHED and TCP_CLOSE_WAIT (Linux's ``tcp_states.h``).
_OPEN_STATES = (1, 8)


class StreamChannel:
    """
    A blocking byte channel on a connected socket: plain TCP, OpenSSL's TLS
    on memory BIOs (what it encrypts is sent after each write, in writes of
    up to about a megabyte: L{flushTo}), or the standard library's.

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
    def open(
        cls,
        sock: socket.socket,
        context: StreamTLS | ssl.SSLContext | None,
        serverName: str,
    ) -> StreamChannel:
        """Wrap ``sock``; for TLS, run the handshake (blocking)."""
        if context is None:
            return cls(sock)
        if isinstance(context, StreamTLS):
            return cls(sock, context.handshake(sock, serverName))
        try:
            tls = context.wrap_socket(sock, server_hostname=serverName)
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
                self.tls.sendall(data)  # into the memory BIO: encrypted there
            except SSL.SysCallError as e:
                raiseSysCall(e)
            self._flushTLS()
        else:
            self.sock.sendall(data)

    def _flushTLS(self) -> None:
        assert isinstance(self.tls, SSL.Connection)
        try:
            flushTo(self.tls, self.sock)
        except BlockingIOError:
            raise TimeoutError("the target did not take the stream in time") from None

    def recv(self, length: int) -> bytes:
        """Blocking: up to ``length`` bytes; b"" at the end of the stream."""
        try:
            if isinstance(self.tls, SSL.Connection):
                return self._recvTLS(self.tls, length)
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

    def _recvTLS(self, tls: SSL.Connection, length: int) -> bytes:
        while True:
            try:
                return tls.recv(length)
            except SSL.WantReadError:
                self._flushTLS()  # what OpenSSL has to say first (key updates)
                if not fill(tls, self.sock):
                    return b""

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
                flushTo(self.tls, self.sock)
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

    def unacknowledged(self) -> int:
        """
        Bytes handed to the kernel that the peer has not acknowledged yet
        (``SIOCOUTQ``; 0 once the socket is closed).  Safe from any thread.
        """
        try:
            queued = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
        except (OSError, ValueError):
            return 0
        return int(struct.unpack("i", queued)[0])

    def connected(self) -> bool:
        """Whether the TCP connection is still open (established, or half-closed)."""
        try:
            state = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        except OSError:
            return False
        return state in _OPEN_STATES

    def abort(self) -> None:
        """Unblock any system call on the socket at once (from another thread)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def setSocketTimeout(sock: socket.socket, seconds: float) -> None:
    """
    Bound each blocking receive and send on ``sock`` to ``seconds`` (0: no
    bound), in the kernel: OpenSSL then sees the socket as blocking.
    """
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
