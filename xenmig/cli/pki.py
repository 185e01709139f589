"""A small certificate authority that issues the hosts' mutual-TLS certificates."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.python.filepath import FilePath

from xenmig.certificates import (
    AnyPath,
    asFilePath,
    certificatePEM,
    keyMatches,
    privateKeyPEM,
)
from xenmig.cli.pkiargs import IDENTITY_SUFFIX, addCommands
from xenmig.errors import ConfigurationError

# These functions do blocking file I/O: they are for the ``xenmig pki`` command
# line and for test set-up, never for code running inside the reactor.

CA_CERTIFICATE = "ca.pem"
CA_KEY = "ca.key"

#: New certificates are valid from a little before now, so that a peer whose
#: clock is slightly behind accepts them at once.
BACKDATE = datetime.timedelta(minutes=5)

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def initCA(directory: AnyPath, name: str = "xenmig CA", days: int = 3650) -> None:
    """
    Create a certificate authority: ``ca.pem`` and ``ca.key`` in C{directory}.

    @raise ConfigurationError: if a CA already exists there, or the name, the
        lifetime or the directory cannot be used.
    """
    where = asFilePath(directory)
    if not 1 <= len(name) <= 64:
        raise ConfigurationError(f"CA name {name!r} must be 1 to 64 characters long")
    _checkDays(days)
    _refuseExisting(
        [where.child(CA_CERTIFICATE), where.child(CA_KEY)],
        f"a CA already exists in {where.path}; use it, or pick another directory",
    )
    _makePrivateDirectory(where)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    notBefore = _now() - BACKDATE
    certificate = (
        _builder(subject, subject, key.public_key(), notBefore, notBefore + _days(days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_keyUsage(keyCertSign=True), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    _writeFile(where.child(CA_KEY), privateKeyPEM(key), 0o600)
    _writeFile(where.child(CA_CERTIFICATE), certificatePEM(certificate), 0o644)


def issueHost(
    directory: AnyPath, host: str, ips: Sequence[str] = (), days: int = 825
) -> tuple[FilePath[str], FilePath[str]]:
    """
    Issue a certificate for C{host} (and C{ips}), signed by the CA in C{directory}.

    Writes ``<host>.pem`` (the certificate alone) and ``<host>.key`` (mode 0600).

    @return: the paths of the certificate and of its key.
    @raise ConfigurationError: if the name, an address or the lifetime is not
        valid, if the CA cannot be read, or if the files exist already.
    """
    where = asFilePath(directory)
    checkHostName(host)
    addresses = [_parseAddress(ip) for ip in ips]
    _checkDays(days)
    caCertificate, caKey = _loadCA(where)
    certPath, keyPath = where.child(host + ".pem"), where.child(host + ".key")
    _refuseExisting(
        [certPath, keyPath],
        f"files for {host} already exist in {where.path}; remove them to reissue",
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _hostCertificate(caCertificate, caKey, key, host, addresses, days)
    _writeFile(keyPath, privateKeyPEM(key), 0o600)
    _writeFile(certPath, certificatePEM(certificate), 0o644)
    return certPath, keyPath


def writeIdentity(
    certPath: AnyPath, keyPath: AnyPath, destination: AnyPath
) -> FilePath[str]:
    """
    Write one PEM holding a certificate followed by its key (mode 0600).

    That combined file is what ``--cert`` accepts when ``--key`` is not given.

    @return: the path written.
    @raise ConfigurationError: if an input cannot be read or C{destination} exists.
    """
    certFile, keyFile, target = map(asFilePath, (certPath, keyPath, destination))
    _refuseExisting([target], f"{target.path} already exists; remove it first")
    _writeFile(target, _read(certFile) + _read(keyFile), 0o600)
    return target


def checkHostName(host: str) -> None:
    """
    Check that C{host} is a DNS name (letters, digits and hyphens in labels).

    @raise ConfigurationError: if it is not.
    """
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ConfigurationError(
            f"{host!r} is not a valid host name: use letters, digits and hyphens"
            " in dot-separated labels (e.g. node1.example.org)"
        )
    if labels[-1].isdigit():
        raise ConfigurationError(
            f"{host!r} looks like an IP address: give a DNS name as the host and"
            " the address with --ip"
        )


def _hostCertificate(
    caCertificate: x509.Certificate,
    caKey: CAKey,
    key: ec.EllipticCurvePrivateKey,
    host: str,
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    days: int,
) -> x509.Certificate:
    """Build and sign the certificate of one host."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    names: list[x509.GeneralName] = [x509.DNSName(host)]
    names += [x509.IPAddress(address) for address in addresses]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    notBefore = _now() - BACKDATE
    notAfter = min(notBefore + _days(days), caCertificate.not_valid_after_utc)
    return (
        _builder(subject, caCertificate.subject, key.public_key(), notBefore, notAfter)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_keyUsage(keyCertSign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(_authorityKeyIdentifier(caCertificate, caKey), critical=False)
        .sign(caKey, hashes.SHA256())
    )


def _authorityKeyIdentifier(
    caCertificate: x509.Certificate, caKey: CAKey
) -> x509.AuthorityKeyIdentifier:
    """Name the CA's key as the CA itself does (or from its public key)."""
    try:
        extension = caCertificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        )
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        extension.value
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    publicKey: ec.EllipticCurvePublicKey,
    notBefore: datetime.datetime,
    notAfter: datetime.datetime,
) -> x509.CertificateBuilder:
    """Start a certificate with the fields every xenmig certificate has."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(publicKey)
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore)
        .not_valid_after(notAfter)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(publicKey), critical=False
        )
    )


def _keyUsage(keyCertSign: bool) -> x509.KeyUsage:
    """A CA signs certificates; a host signs handshakes and agrees on keys."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not keyCertSign,
        key_cert_sign=keyCertSign,
        crl_sign=keyCertSign,
        encipher_only=False,
        decipher_only=False,
    )


def _loadCA(
    where: FilePath[str],
) -> tuple[x509.Certificate, CAKey]:
    """Read the CA certificate and key from C{where}."""
    certFile, keyFile = where.child(CA_CERTIFICATE), where.child(CA_KEY)
    if not (certFile.exists() and keyFile.exists()):
        raise ConfigurationError(
            f"no CA in {where.path} (ca.pem and ca.key are needed);"
            f" create one with: xenmig pki init-ca --dir {where.path}"
        )
    try:
        certificate = x509.load_pem_x509_certificate(_read(certFile))
    except ValueError:
        raise ConfigurationError(f"{certFile.path} is not a PEM certificate")
    try:
        key = serialization.load_pem_private_key(_read(keyFile), password=None)
    except (ValueError, TypeError) as e:
        raise ConfigurationError(f"cannot use the CA key {keyFile.path}: {e}")
    if not isinstance(key, CAKey):
        raise ConfigurationError(f"the CA key {keyFile.path} is not an EC or RSA key")
    if not keyMatches(key, certificate):
        raise ConfigurationError(
            f"the CA key {keyFile.path} does not match {certFile.path}"
        )
    return certificate, key


def _parseAddress(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse one IP address given with ``--ip``."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ConfigurationError(f"{text!r} is not an IPv4 or IPv6 address")


def _checkDays(days: int) -> None:
    """Refuse a lifetime that is not a positive number of days."""
    if days < 1:
        raise ConfigurationError(f"the lifetime must be at least 1 day, not {days}")


def _days(days: int) -> datetime.timedelta:
    return datetime.timedelta(days=days)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _refuseExisting(paths: list[FilePath[str]], message: str) -> None:
    if any(path.exists() for path in paths):
        raise ConfigurationError(message)


def _makePrivateDirectory(where: FilePath[str]) -> None:
    """Create C{where} with mode 0700 unless it exists."""
    if where.isdir():
        return
    try:
        os.makedirs(where.path, mode=0o700)
    except OSError as e:
        raise ConfigurationError(f"cannot create directory {where.path}: {e.strerror}")
    os.chmod(where.path, 0o700)


def _read(path: FilePath[str]) -> bytes:
    try:
        return path.getContent()
    except OSError as e:
        raise ConfigurationError(f"cannot read {path.path}: {e.strerror}")


def _writeFile(path: FilePath[str], data: bytes, mode: int) -> None:
    """Create C{path} (never overwrite it) with C{mode}, whatever the umask."""
    try:
        fd = os.open(path.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise ConfigurationError(f"cannot create {path.path}: {e.strerror}")
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, mode)
        f.write(data)


class _UsageError(Exception):
    """The command line could not be parsed."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports errors to L{main} instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xenmig pki", description="Make xenmig's TLS certificates.")
    addCommands(parser)
    return parser


def _run(args: argparse.Namespace) -> list[str]:
    """Do what the parsed command line asks; return the paths written."""
    if args.pki_command == "init-ca":
        initCA(args.dir, args.name, args.days)
        where = asFilePath(args.dir)
        return [where.child(CA_CERTIFICATE).path, where.child(CA_KEY).path]
    certPath, keyPath = issueHost(args.dir, args.host, args.ip, args.days)
    written = [certPath.path, keyPath.path]
    if args.combined:
        combined = certPath.sibling(args.host + IDENTITY_SUFFIX)
        written.append(writeIdentity(certPath, keyPath, combined).path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run ``xenmig pki init-ca ...`` or ``xenmig pki issue ...``.

    @return: the exit status: 0 on success, 2 after printing one error line.
    """
    try:
        written = _run(_parser().parse_args(argv))
    except (_UsageError, ConfigurationError) as e:
        print(f"xenmig pki: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    for path in written:
        print(path)
    return 0
