"""Mutual TLS for daemon and client: identities, authorities, options, refusals."""

from __future__ import annotations

import datetime
import ipaddress
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from OpenSSL.crypto import X509
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorSSL
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig.certificates import (
    AnyPath,
    asFilePath,
    certificateFingerprint,
    certificateNames,
    certificatePEM,
    checkAuthority,
    checkValidity,
    keyMatches,
    parseCertificates,
    parsePrivateKey,
    privateKeyPEM,
    readFile,
)
from xenmig.errors import ConfigurationError, NotAuthorized

# Loading reads files with blocking calls: do it at start-up, before the reactor
# runs (as makeService and the CLI do), never from inside a callback.

log = Logger()

#: Below this, no connection is made; the highest version both sides know
#: (TLS 1.3) is negotiated.
MINIMUM_TLS = TLSVersion.TLSv1_2
#: The TLS 1.2 cipher suites allowed: forward secret key exchange and AEAD only.
#: (OpenSSL's TLS 1.3 suites are all of that kind and stay as they are.)
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
#: The last certificate refusals this process saw, newest last (for the CLI).
recentRefusals: deque[str] = deque(maxlen=8)

_X509_V_ERR_CERT_NOT_YET_VALID = 9
_X509_V_ERR_CERT_HAS_EXPIRED = 10
#: The chain ends at (or names as issuer) a CA that is not trusted here: unable
#: to get the issuer (locally), self-signed (in the chain), unable to verify
#: the first certificate.
_UNTRUSTED_ISSUER = frozenset({2, 18, 19, 20, 21})
#: Why the peer's certificate of a failed server-side handshake was refused.
_refusals: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def loadIdentity(
    certPath: AnyPath,
    keyPath: AnyPath | None = None,
    now: datetime.datetime | None = None,
) -> PrivateCertificate:
    """
    Read this host's certificate and private key.

    @param certPath: a PEM file whose first certificate is this host's; it also
        holds the private key unless C{keyPath} is given.
    @param keyPath: a PEM file holding the private key, or L{None}.
    @param now: the time to check validity against (default: the current time).
    @raise ConfigurationError: naming the file, if a file is missing or
        unreadable, holds no PEM certificate or key, if the key does not match
        the certificate, or the certificate is expired or not yet valid.
    """
    certFile = asFilePath(certPath)
    certData = readFile(certFile, "certificate")
    certificate = parseCertificates(certData, certFile)[0]
    keyFile = certFile if keyPath is None else asFilePath(keyPath)
    keyData = certData if keyPath is None else readFile(keyFile, "key")
    key = parsePrivateKey(keyData, keyFile)
    if not keyMatches(key, certificate):
        raise ConfigurationError(
            f"the private key in {keyFile.path} does not match the certificate"
            f" in {certFile.path}"
        )
    checkValidity(certificate, certFile, now)
    return PrivateCertificate.loadPEM(certificatePEM(certificate) + privateKeyPEM(key))


def loadAuthority(
    caPath: AnyPath, now: datetime.datetime | None = None
) -> list[Certificate]:
    """
    Read the certificate authorities that peers' certificates must chain to.

    @param caPath: a PEM file holding one or more CA certificates.
    @param now: the time to check validity against (default: the current time).
    @raise ConfigurationError: naming the file, if it is missing or unreadable,
        holds no PEM certificate, a certificate that is not a CA, or one that is
        expired or not yet valid.
    """
    caFile = asFilePath(caPath)
    authorities = parseCertificates(readFile(caFile, "CA"), caFile)
    for authority in authorities:
        checkAuthority(authority, caFile)
        checkValidity(authority, caFile, now)
    return [Certificate.loadPEM(certificatePEM(each)) for each in authorities]


def serverOptions(
    identity: PrivateCertificate,
    authorities: Sequence[Certificate],
    minimum: TLSVersion = MINIMUM_TLS,
) -> CertificateOptions:
    """
    TLS settings for the daemon: a client certificate chaining to one of
    C{authorities} is required; TLS 1.2 at least (or C{minimum}), TLS 1.3
    when both can; forward-secret AEAD cipher suites only.  Why a peer's
    certificate was refused is kept for L{handshakeRefusal}.
    """
    options = _ServerOptions(
        trustRoot=_trustRoot(authorities),
        raiseMinimumTo=minimum,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
        enableSessionTickets=True,  # see SessionKeeper
        **_ownCertificate(identity),
    )
    options.getContext().set_timeout(SESSION_LIFETIME)
    return options


def clientOptions(
    hostname: str,
    identity: PrivateCertificate,
    authorities: Sequence[Certificate],
    pins: Sequence[str] = (),
) -> IOpenSSLClientConnectionCreator:
    """
    TLS settings for connecting to the daemon at C{hostname}.

    The daemon's certificate must chain to one of C{authorities} and name
    C{hostname} (a DNS name or an IP address) in its subjectAltName; if
    C{pins} are given (SHA-256 fingerprints, hex), it must also be one of
    them.  This side presents C{identity}.  A certificate that does not
    chain (expired, not yet valid, another CA) fails the handshake with
    C{SSL.Error}, its reason logged and kept in L{recentRefusals}; a name
    that does not match fails it with L{NameMismatch} (a
    C{VerificationError}), a pin that does not match with L{NotAuthorized}.
    """
    # Not clientCertificate=identity: see _ownCertificate.
    inner = optionsForClientTLS(
        hostname,
        trustRoot=_trustRoot(authorities),
        extraCertificateOptions={
            "raiseMinimumTo": MINIMUM_TLS,
            "acceptableCiphers": AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
            **_ownCertificate(identity),
        },
    )
    trusted = describeAuthorities(authorities)
    return _CheckedClientOptions(inner, hostname, [parsePin(p) for p in pins], trusted)


def parsePin(text: str) -> str:
    """
    A SHA-256 certificate fingerprint given as hex (colons allowed), as
    lowercase hex.

    @raise ConfigurationError: if it is not one.
    """
    pin = text.replace(":", "").strip().lower()
    if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
        raise ConfigurationError(
            f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons "
            f"allowed: openssl x509 -noout -fingerprint -sha256 -in CERT)"
        )
    return pin


def describeAuthorities(authorities: Sequence[Certificate]) -> str:
    """The CAs of a bundle as a refusal names them: subject and short fingerprint."""
    return ", ".join(
        _describeCA(authority.original.to_cryptography()) for authority in authorities
    )


def _describeCA(certificate: x509.Certificate) -> str:
    subject = certificate.subject.rfc4514_string()
    return f"{subject} (sha256 {certificateFingerprint(certificate)[:16]}...)"


#: OpenSSL's reasons when a record or handshake message failed TLS's checks:
#: the bytes were altered on the way.
ALTERED_IN_TRANSIT = (
    "bad record mac",
    "decryption failed",
    "bad signature",
    "digest check failed",
    "invalid session id",
    "decode error",
    "illegal parameter",
    "unexpected message",
    "length mismatch",
    "record layer failure",
)
#: What L{ALTERED_IN_TRANSIT} means, for the operator.
ALTERED = (
    "the bytes were altered on the way (a faulty link, or a proxy or middlebox "
    "between the hosts)"
)


def describeTLSError(error: BaseException) -> str:
    """
    What OpenSSL detected, as one phrase: the reasons of a pyOpenSSL
    C{SSL.Error} (its list of triples), or of an C{ssl.SSLError}; else the
    error's text.
    """
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        reasons = [str(part[-1]) for part in error.args[0] if part]
        return "; ".join(reason for reason in reasons if reason) or "unknown error"
    text = str(getattr(error, "verify_message", "") or "")
    if not text:
        text = str(error)
        # "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption ... (_ssl.c:1006)"
        if text.startswith("[") and "] " in text:
            text = text.split("] ", 1)[1]
        text = text.rsplit(" (_ssl.c:", 1)[0]
    return text or type(error).__name__


class NameMismatch(VerificationError):
    """
    The target's certificate does not carry the name or address it was asked
    for; the error says which names it does carry (C{names}), so that the
    operator can pick one or reissue the certificate.
    """

    def __init__(
        self, errors: Any, asked: str, names: Sequence[str], subject: str
    ) -> None:
        super().__init__(errors)
        self.asked = asked
        self.names = list(names)
        self.subject = subject

    def __str__(self) -> str:
        held = ", ".join(self.names) or "no DNS name or IP address"
        return (
            f"the target's certificate ({self.subject}) names {held}, not {self.asked}"
        )


def handshakeRefusal(transport: Any) -> str | None:
    """
    Why the daemon refused the peer certificate of a connection whose TLS
    handshake failed (C{transport} is its TLS transport), if it did.
    """
    return _refusals.get(transport)


#: Seconds a session ticket resumes: within them a peer is known by the
#: certificate it proved at its full handshake (see L{SessionKeeper}).
SESSION_LIFETIME = 600


class SessionKeeper:
    """
    The TLS 1.3 session a client resumes on its next connections to a daemon:
    why that keeps mutual authentication is in doc/security.md.
    """

    def __init__(self) -> None:
        self.session: SSL.Session | None = None
        #: Connections that resumed (for tests and figures).
        self.resumed = 0

    def offer(self, connection: SSL.Connection) -> None:
        """Before ``connection``'s handshake: resume the kept session, if any."""
        if self.session is not None:
            connection.set_session(self.session)

    def keep(self, connection: SSL.Connection) -> None:
        """After an answer on ``connection`` (its tickets read): keep its session."""
        if _lib.SSL_session_reused(connection._ssl):  # type: ignore[attr-defined]
            self.resumed += 1
        else:
            self.session = connection.get_session()


class _ServerOptions(CertificateOptions):
    """CertificateOptions that remember why a peer's certificate was refused."""

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        connection = super().serverConnectionForTLS(protocol)
        mode = connection.get_context().get_verify_mode()
        connection.set_verify(mode, _serverCallback(protocol))
        return connection


def _serverCallback(protocol: Any) -> Callable[..., bool]:
    reference = weakref.ref(protocol)

    def verify(conn: Any, cert: X509, error: int, depth: int, ok: int) -> bool:
        if not ok:
            transport = reference()
            why = _describeRefusal("the peer's", cert, error, depth)
            if transport is not None:
                _refusals[transport] = why
        return bool(ok)

    return verify


@implementer(IOpenSSLClientConnectionCreator)
class _CheckedClientOptions:
    """
    The client's connection creator: Twisted's, with a verify callback that
    checks the name (as Twisted's does), the pins, and says why a certificate
    was refused.
    """

    def __init__(
        self,
        inner: IOpenSSLClientConnectionCreator,
        hostname: str,
        pins: list[str],
        trusted: str = "",
    ) -> None:
        self.inner = inner
        self.sessions = SessionKeeper()
        self.hostname = hostname
        self.pins = frozenset(pins)
        self.trusted = trusted
        try:
            self._address: Any = ipaddress.ip_address(hostname)
        except ValueError:
            self._address = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self.inner.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            self._callback(tlsProtocol),
        )
        self.sessions.offer(connection)
        return connection

    def _callback(self, tlsProtocol: Any) -> Callable[..., bool]:
        reference = weakref.ref(tlsProtocol)

        def verify(conn: Any, cert: X509, error: int, depth: int, ok: int) -> bool:
            try:
                if not ok:
                    whose = "the target's"
                    _remember(_describeRefusal(whose, cert, error, depth, self.trusted))
                    return False
                if depth != 0:
                    return True
                problem = self._checkLeaf(cert.to_cryptography())
            except Exception:
                log.failure("while verifying the target's certificate")
                return False
            if problem is not None:
                _remember(str(problem.value))
                protocol = reference()
                if protocol is not None:
                    protocol.failVerification(problem)
                return False
            return True

        return verify

    def _checkLeaf(self, certificate: x509.Certificate) -> Failure | None:
        try:
            if self._address is not None:
                verify_certificate_ip_address(certificate, str(self._address))
            else:
                verify_certificate_hostname(certificate, self.hostname)
        except VerificationError as e:
            subject = certificate.subject.rfc4514_string()
            names = certificateNames(certificate)
            return Failure(NameMismatch(e.errors, self.hostname, names, subject))
        fingerprint = certificateFingerprint(certificate)
        if self.pins and fingerprint not in self.pins:
            return Failure(
                NotAuthorized(
                    f"the target's certificate "
                    f"({certificate.subject.rfc4514_string()}, sha256 {fingerprint}) "
                    f"is not the one pinned with --pin-sha256"
                )
            )
        return None


def _remember(why: str) -> None:
    recentRefusals.append(why)
    log.warn("TLS: {why}", why=why)


def _describeRefusal(
    whose: str, cert: X509, error: int, depth: int, trusted: str = ""
) -> str:
    """
    A sentence saying why OpenSSL refused a certificate of a chain (C{trusted}:
    the CAs this host trusts, named when the chain ends at another one).
    """
    certificate = cert.to_cryptography()
    subject = certificate.subject.rfc4514_string()
    if error == _X509_V_ERR_CERT_HAS_EXPIRED:
        return (
            f"{whose} certificate {subject} expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC; "
            f"it must be renewed"
        )
    if error == _X509_V_ERR_CERT_NOT_YET_VALID:
        return (
            f"{whose} certificate {subject} is not valid until "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC; check "
            f"the clocks of both hosts"
        )
    if error in _UNTRUSTED_ISSUER:
        issuer = (
            _describeCA(certificate)
            if certificate.issuer == certificate.subject
            else certificate.issuer.rfc4514_string()
        )
        leaf = f" {subject}" if depth == 0 else ""
        return (
            f"this host does not trust {whose} certificate{leaf}: its chain ends "
            f"at {issuer}, not at a CA of this host's --ca"
            + (f", which holds {trusted}" if trusted else "")
        )
    return (
        f"{whose} certificate {subject} (depth {depth} of its chain) was refused: "
        f"{_verifyErrorString(error)}"
    )


def _verifyErrorString(error: int) -> str:
    """OpenSSL's text for an X509_V_ERR code."""
    try:
        from OpenSSL._util import ffi, lib

        return ffi.string(lib.X509_verify_cert_error_string(error)).decode()
    except Exception:
        return f"X509 verify error {error}"


def _ownCertificate(identity: PrivateCertificate) -> dict[str, Any]:
    """
    C{CertificateOptions} arguments presenting C{identity}.

    They are C{cryptography} objects, which pyOpenSSL takes as they are: the
    pyOpenSSL objects Twisted would pass make pyOpenSSL 26 warn ("Passing
    pyOpenSSL X509 objects is deprecated") on every new TLS context.
    """
    return {
        "privateKey": identity.privateKey.original.to_cryptography_key(),
        "certificate": identity.original.to_cryptography(),
    }


def serverEndpoint(
    reactor: IReactorSSL, port: int, interface: str, options: CertificateOptions
) -> SSL4ServerEndpoint:
    """
    The daemon's listening endpoint (an endpoint string cannot require client
    certificates, so it is built here).
    """
    return SSL4ServerEndpoint(reactor, port, options, interface=interface)


def _trustRoot(authorities: Sequence[Certificate]) -> IOpenSSLTrustRoot:
    """Trust exactly C{authorities}; refuse an empty list, which trusts no one."""
    if not authorities:
        raise ConfigurationError(
            "no certificate authority given: every peer would be refused;"
            " give the CA certificate file (--ca)"
        )
    return trustRootFromCertificates(authorities)
