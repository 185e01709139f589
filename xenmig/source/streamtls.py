"""
The TLS of the threaded stream senders: OpenSSL through pyOpenSSL, on memory BIOs.

The senders encrypt with the OpenSSL that ``cryptography`` bundles (the daemon's,
faster at AES-GCM here than the system's that the standard library's ``ssl``
links), into memory BIOs that the channel empties into the socket in large
writes (L{xenmig.source.streamchannel.StreamChannel}): OpenSSL writing to the
socket itself made a system call per 16 KiB record, which cost the sender
more (the kernel's work per call, on both sides of a loopback) than the copy
out of the BIO.  The checks are L{xenmig.tls.clientOptions}' own: the chain,
the name in the subjectAltName, the pins, and the reasons for a refusal.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    PrivateCertificate,
)
from twisted.python.failure import Failure

from xenmig.errors import StreamError
from xenmig.tls import (
    CIPHERS,
    MINIMUM_TLS,
    SessionKeeper,
    _CheckedClientOptions,
    _ownCertificate,
    _trustRoot,
    describeAuthorities,
    parsePin,
)


class _Verification:
    """What the verify callback found wrong with the target's leaf, if anything."""

    def __init__(self) -> None:
        self.problem: Failure | None = None

    def failVerification(self, failure: Failure) -> None:
        self.problem = failure


class StreamTLS:
    """
    Client TLS settings for streams sent from threads: this host presents
    ``identity``; the daemon must chain to ``authorities``, carry the name it
    is reached by, and be one of ``pins`` (SHA-256 fingerprints) if any.  TLS
    1.2 at least, forward-secret AEAD suites only.

    One OpenSSL context serves every stream; L{handshake} makes a connection
    per socket, on memory BIOs.
    """

    def __init__(
        self,
        identity: PrivateCertificate,
        authorities: Sequence[Certificate],
        pins: Sequence[str] = (),
    ) -> None:
        options = CertificateOptions(
            trustRoot=_trustRoot(authorities),
            raiseMinimumTo=MINIMUM_TLS,
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
            **_ownCertificate(identity),
        )
        self.context = options.getContext()
        # A stream keeps its buffers: freeing them after every record costs an
        # allocation per 16 KiB.
        self.context.clear_mode(SSL.MODE_RELEASE_BUFFERS)
        self.pins = frozenset(parsePin(pin) for pin in pins)
        self.trusted = describeAuthorities(authorities)
        #: The session the next streams resume (kept after a StartStream answer).
        self.sessions = SessionKeeper()

    def handshake(self, sock: socket.socket, serverName: str) -> SSL.Connection:
        """
        Blocking: a TLS connection for the connected ``sock`` (on memory BIOs:
        what it writes is taken out with L{flushTo}), handshake done and the
        target checked as the name ``serverName``.

        @raise NameMismatch: the certificate does not carry ``serverName``.
        @raise NotAuthorized: it is not one of the pins.
        @raise SSL.Error: the chain was refused, or another TLS failure.
        @raise TimeoutError: the socket's receive or send time-out passed.
        """
        # The name and pin checks of clientOptions, without its Twisted half.
        checks = _CheckedClientOptions(
            None,  # type: ignore[arg-type]
            serverName,
            list(self.pins),
            self.trusted,
        )
        verification = _Verification()
        connection = SSL.Connection(self.context, None)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            checks._callback(verification),
        )
        if not _isAddress(serverName):
            connection.set_tlsext_host_name(serverName.encode("idna"))
        connection.set_connect_state()
        self.sessions.offer(connection)
        try:
            while True:
                try:
                    connection.do_handshake()
                    break
                except SSL.WantReadError:
                    flushTo(connection, sock)
                    if not fill(connection, sock):
                        raise StreamError(
                            "the target closed the stream connection"
                        ) from None
            flushTo(connection, sock)  # the client's last flight
        except BlockingIOError:
            raise TimeoutError("the TLS handshake timed out") from None
        except SSL.SysCallError as e:
            raiseSysCall(e)
        except SSL.Error:
            if verification.problem is not None:
                verification.problem.raiseException()
            raise
        return connection


#: The most a channel takes out of a connection's memory BIO at once.
FLUSH_SIZE = 1024 * 1024 + 64 * 1024


class _Outgoing:
    """A buffer of its own per thread, into which encrypted bytes are taken out."""

    def __init__(self) -> None:
        self.local = threading.local()

    def buffer(self) -> tuple[Any, memoryview]:
        found = getattr(self.local, "buffer", None)
        if found is None:
            raw = _ffi.new("char[]", FLUSH_SIZE)
            found = self.local.buffer = (raw, memoryview(_ffi.buffer(raw)))
        return found


_outgoing = _Outgoing()


def flushTo(connection: SSL.Connection, sock: socket.socket) -> None:
    """
    Blocking: send everything ``connection`` (on memory BIOs) has written so
    far to ``sock``, in writes of up to L{FLUSH_SIZE} bytes.
    """
    raw, view = _outgoing.buffer()
    bio = connection._from_ssl  # type: ignore[attr-defined]
    while True:
        count = _lib.BIO_read(bio, raw, FLUSH_SIZE)
        if count <= 0:
            return
        sock.sendall(view[:count])


def fill(connection: SSL.Connection, sock: socket.socket) -> bool:
    """
    Blocking: hand what ``sock`` has (waiting for some) to ``connection``;
    False at the end of the stream.
    """
    data = sock.recv(65536)
    if not data:
        connection.bio_shutdown()
        return False
    connection.bio_write(data)
    return True


def _isAddress(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def raiseSysCall(error: SSL.SysCallError) -> NoReturn:
    """
    Raise pyOpenSSL's failed system call as the socket would have (a reset:
    C{ConnectionResetError}); an end of file as L{StreamError}.
    """
    code = error.args[0] if error.args else -1
    if isinstance(code, int) and code > 0:
        raise OSError(code, os.strerror(code)) from error
    raise StreamError("the target closed the stream connection") from error
