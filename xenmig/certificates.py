"""X.509 certificates and keys: PEM in and out, checks, and what a certificate names."""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL.crypto import X509
from twisted.internet.interfaces import IAddress, ISSLTransport, ITransport
from twisted.internet.ssl import PrivateCertificate
from twisted.python.filepath import FilePath

from xenmig.errors import ConfigurationError, NotAuthorized
from xenmig.model import hostPort

# Reading files blocks: do it at start-up or in the CLI, never inside a callback.

#: How long before its certificate expires the daemon starts warning.
EXPIRY_WARNING = datetime.timedelta(days=30)

AnyPath = FilePath[str] | str | os.PathLike[str]


# -- PEM and paths -------------------------------------------------------------------


def certificatePEM(certificate: x509.Certificate) -> bytes:
    """A certificate in PEM."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def privateKeyPEM(key: PrivateKeyTypes) -> bytes:
    """A private key in unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def keyMatches(key: PrivateKeyTypes, certificate: x509.Certificate) -> bool:
    """Whether C{key} is the private key of C{certificate}."""
    return _subjectPublicKeyInfo(key.public_key()) == _subjectPublicKeyInfo(
        certificate.public_key()
    )


def _subjectPublicKeyInfo(publicKey: PublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key, to compare keys."""
    return publicKey.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def asFilePath(path: AnyPath) -> FilePath[str]:
    """A FilePath for a FilePath, a str or a path-like object."""
    return path if isinstance(path, FilePath) else FilePath(os.fspath(path))


# -- reading and checking ------------------------------------------------------------


def readFile(path: FilePath[str], what: str) -> bytes:
    """The bytes of C{path}, or a ConfigurationError naming it as a C{what} file."""
    try:
        return path.getContent()
    except FileNotFoundError:
        raise ConfigurationError(f"{what} file {path.path} does not exist")
    except OSError as e:
        raise ConfigurationError(f"cannot read {what} file {path.path}: {e.strerror}")


def parseCertificates(data: bytes, path: FilePath[str]) -> list[x509.Certificate]:
    """
    Every PEM certificate in C{data}, read from C{path}.

    @raise ConfigurationError: naming C{path}, if there is none or one is malformed.
    """
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigurationError(f"{path.path} holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigurationError(f"{path.path} holds a malformed PEM certificate")


def parsePrivateKey(data: bytes, path: FilePath[str]) -> PrivateKeyTypes:
    """
    The first PEM private key in C{data}, read from C{path}.

    @raise ConfigurationError: naming C{path}, if there is none, or it is
        encrypted or malformed.
    """
    if b"PRIVATE KEY-----" not in data:
        raise ConfigurationError(
            f"{path.path} holds no PEM private key; add the key to it or give"
            " the key file separately (--key)"
        )
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigurationError(
            f"the private key in {path.path} is encrypted; xenmig needs it"
            " unencrypted (protect the file with mode 0600)"
        )
    except ValueError:
        raise ConfigurationError(f"{path.path} holds a malformed PEM private key")


def checkValidity(
    certificate: x509.Certificate, path: FilePath[str], now: datetime.datetime | None
) -> None:
    """Refuse a certificate that is expired or not yet valid at C{now}."""
    now = now or datetime.datetime.now(datetime.UTC)
    subject = certificate.subject.rfc4514_string()
    if now < certificate.not_valid_before_utc:
        raise ConfigurationError(
            f"the certificate {subject} in {path.path} is not valid until"
            f" {certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC;"
            " check this host's clock"
        )
    if now > certificate.not_valid_after_utc:
        raise ConfigurationError(
            f"the certificate {subject} in {path.path} expired on"
            f" {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC;"
            " issue a new one"
        )


def checkAuthority(certificate: x509.Certificate, path: FilePath[str]) -> None:
    """Refuse a certificate that is not marked as a certificate authority."""
    try:
        isCA = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value.ca
    except x509.ExtensionNotFound:
        isCA = False
    if not isCA:
        raise ConfigurationError(
            f"the certificate {certificate.subject.rfc4514_string()} in {path.path}"
            " is not a CA certificate; give the CA's ca.pem"
        )


def expiryWarning(
    identity: PrivateCertificate, now: datetime.datetime | None = None
) -> str | None:
    """A warning if C{identity}'s certificate expires within L{EXPIRY_WARNING}."""
    certificate = identity.original.to_cryptography()
    now = now or datetime.datetime.now(datetime.UTC)
    left = certificate.not_valid_after_utc - now
    if left > EXPIRY_WARNING:
        return None
    return (
        f"this host's certificate {certificate.subject.rfc4514_string()} expires "
        f"on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC (in "
        f"{max(left.days, 0)} days): issue a new one (xenmig pki issue) and restart"
    )


# -- what a certificate names --------------------------------------------------------


def certificateFingerprint(certificate: x509.Certificate) -> str:
    """The SHA-256 of a certificate's DER form, in lowercase hex."""
    return hashlib.sha256(
        certificate.public_bytes(serialization.Encoding.DER)
    ).hexdigest()


def certificateIdentity(certificate: x509.Certificate) -> str:
    """
    The host a certificate names: its first DNS subjectAltName, else its CN.

    @raise NotAuthorized: if it names neither.
    """
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    names += [
        str(attribute.value)
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    if not names:
        raise NotAuthorized(
            f"the peer certificate ({certificate.subject.rfc4514_string()}) names"
            " no host: it has neither a DNS subjectAltName nor a common name"
        )
    return names[0]


def certificateNames(certificate: x509.Certificate) -> list[str]:
    """
    The names a client may check a certificate against: its subjectAltName's
    DNS names and IP addresses (``DNS:a.example``, ``IP:192.0.2.1``).
    """
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return []
    return [f"DNS:{name}" for name in names.get_values_for_type(x509.DNSName)] + [
        f"IP:{address}" for address in names.get_values_for_type(x509.IPAddress)
    ]


def peerIdentity(transport: ITransport) -> str:
    """
    Name the peer of a connection whose TLS handshake is complete.

    @return: the first DNS subjectAltName of the peer's certificate, else its
        common name; ``plaintext:<host>`` (the peer's address without its
        port, the same for all of one peer's connections) if it is not TLS.
    @raise NotAuthorized: if the peer presented no certificate (or the
        handshake is not complete), or the certificate names no host.
    """
    if not ISSLTransport.providedBy(transport):
        # The host alone: a peer's control and stream connections differ in port.
        address = transport.getPeer()
        return "plaintext:" + str(getattr(address, "host", None) or repr(address))
    return _identityOf(_peerCertificateDER(ISSLTransport(transport)))


def peerFingerprint(transport: ITransport) -> str:
    """
    The SHA-256 of the peer certificate's DER form, in lowercase hex.

    @return: the fingerprint; the empty string if the transport is not TLS.
    @raise NotAuthorized: if the peer presented no certificate (or the
        handshake is not complete).
    """
    if not ISSLTransport.providedBy(transport):
        return ""
    return hashlib.sha256(_peerCertificateDER(ISSLTransport(transport))).hexdigest()


def _peerCertificateDER(transport: ISSLTransport) -> bytes:
    """The DER form of the peer's certificate."""
    certificate = cast("X509 | None", transport.getPeerCertificate())
    if certificate is None:
        raise NotAuthorized(
            f"the peer at {_describeAddress(transport.getPeer())} presented no"
            " certificate (or the TLS handshake is not complete)"
        )
    return certificate.to_cryptography().public_bytes(serialization.Encoding.DER)


@functools.lru_cache(maxsize=256)
def _identityOf(der: bytes) -> str:
    """
    L{certificateIdentity} of the certificate whose DER form is C{der}.

    Remembered for the few peers a daemon sees (a pure function of the bytes,
    so every connection still gets the same answer; a certificate that names
    no host raises every time, as a raised error is not remembered): parsing
    the extensions on every connection costs CPU under many migrations.
    """
    return certificateIdentity(x509.load_der_x509_certificate(der))


def _describeAddress(address: IAddress) -> str:
    """C{host:port} for an IP address, C{[host]:port} for IPv6, else the repr."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return repr(address)
    return hostPort(host, port)


# -- addresses as they are written ----------------------------------------------------


def clientUseProblem(certificate: x509.Certificate) -> str | None:
    """
    Why ``certificate`` cannot authenticate a TLS client (its extended key
    usage leaves out clientAuth, or its key usage digital signatures), or None.
    """
    extensions = certificate.extensions
    try:
        purposes = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        purposes = None
    allowed = {
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    }
    if purposes is not None and not allowed.intersection(purposes):
        return (
            "its extended key usage leaves out TLS client authentication (clientAuth)"
        )
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not usage.digital_signature:
        return "its key usage leaves out digital signatures"
    return None
