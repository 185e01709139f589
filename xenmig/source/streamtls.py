"""
The TLS of the threaded stream senders: OpenSSL through pyOpenSSL, on a blocking socket.

The senders encrypt with the OpenSSL that ``cryptography`` bundles (the daemon's,
faster at AES-GCM here than the system's that the standard library's ``ssl``
links), and OpenSSL writes each record straight to the socket: no copy through
a memory BIO.  The checks are L{xenmig.tls.clientOptions}' own: the chain, the
name in the subjectAltName, the pins, and the reasons for a refusal.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence
from typing import NoReturn

from OpenSSL import SSL
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
    per socket.
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
        Blocking: a TLS connection on the connected ``sock``, handshake done
        and the target checked as the name ``serverName``.

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
        connection = SSL.Connection(self.context, sock)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            checks._callback(verification),
        )
        if not _isAddress(serverName):
            connection.set_tlsext_host_name(serverName.encode("idna"))
        connection.set_connect_state()
        self.sessions.offer(connection)
        try:
            connection.do_handshake()
        except (SSL.WantReadError, SSL.WantWriteError):
            raise TimeoutError("the TLS handshake timed out") from None
        except SSL.SysCallError as e:
            raiseSysCall(e)
        except SSL.Error:
            if verification.problem is not None:
                verification.problem.raiseException()
            raise
        return connection


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
