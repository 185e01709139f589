"""Tests for xenmig.tls: loading identities and mutual TLS over real sockets."""

from __future__ import annotations

import datetime
import hashlib
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig import certificates, tls
from xenmig.cli import pki
from xenmig.errors import ConfigurationError, NotAuthorized

DOC = Path(__file__).parent.parent / "doc" / "certificates.md"
DOC_HOST_LINE = "HOST=node1.example IP=192.0.2.10"
PING = b"ping\n"
TIMEOUT = 10


# --- certificates ---------------------------------------------------------------


class Hosts:
    """A CA directory with certificates for a server and a client host."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.authorities = tls.loadAuthority(directory / "ca.pem")

    def identity(self, host: str) -> PrivateCertificate:
        return tls.loadIdentity(
            self.directory / f"{host}.pem", self.directory / f"{host}.key"
        )

    def server(self) -> CertificateOptions:
        return tls.serverOptions(self.identity("server.test"), self.authorities)

    def client(self, hostname: str = "server.test") -> IOpenSSLClientConnectionCreator:
        return tls.clientOptions(
            hostname, self.identity("client.test"), self.authorities
        )


def _pkiHosts(directory: Path) -> Hosts:
    pki.initCA(directory)
    pki.issueHost(directory, "server.test", ["127.0.0.1"])
    pki.issueHost(directory, "client.test", ["127.0.0.2"])
    return Hosts(directory)


@pytest.fixture
def hosts(tmp_path: Path) -> Hosts:
    """A CA made by xenmig.cli.pki, with server.test (127.0.0.1) and client.test."""
    return _pkiHosts(tmp_path / "ca")


@pytest.fixture
def strangers(tmp_path: Path) -> Hosts:
    """Another CA (with the same name), with its own server.test and client.test."""
    return _pkiHosts(tmp_path / "other-ca")


def _docBlock(marker: str) -> str:
    """The shell block that follows C{marker} in doc/certificates.md."""
    found = re.search(rf"<!-- {marker}:.*?-->\n```sh\n(.*?)```", DOC.read_text(), re.S)
    assert found, f"no {marker} block in {DOC}"
    return found.group(1)


def _sh(script: str, directory: Path) -> None:
    """Run a shell script from the doc (test set-up only, outside the reactor)."""
    subprocess.run(
        ["sh", "-eu", "-c", script], cwd=directory, check=True, capture_output=True
    )


@pytest.fixture
def opensslHosts(tmp_path: Path) -> Hosts:
    """A CA and host certificates made by the plain openssl recipe of the doc."""
    directory = tmp_path / "openssl-ca"
    directory.mkdir()
    _sh(_docBlock("openssl-ca"), directory)
    hostBlock = _docBlock("openssl-host")
    assert DOC_HOST_LINE in hostBlock
    for host, ip in [("server.test", "127.0.0.1"), ("client.test", "127.0.0.2")]:
        _sh(hostBlock.replace(DOC_HOST_LINE, f"HOST={host} IP={ip}"), directory)
    return Hosts(directory)


def _writeHost(
    directory: Path,
    host: str,
    notBefore: datetime.datetime,
    notAfter: datetime.datetime,
) -> Path:
    """Write C{host}.pem (certificate and key) signed by the CA in C{directory}."""
    caCert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    caKey = serialization.load_pem_private_key(
        (directory / "ca.key").read_bytes(), None
    )
    assert isinstance(caKey, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore)
        .not_valid_after(notAfter)
        .sign(caKey, hashes.SHA256())
    )
    path = directory / f"{host}.pem"
    path.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


# --- loading --------------------------------------------------------------------


def test_loadIdentityCombinedFile(hosts: Hosts) -> None:
    """loadIdentity reads a combined PEM (certificate then key) without a key path."""
    certPath, keyPath = (
        hosts.directory / f"server.test.{ext}" for ext in ("pem", "key")
    )
    combined = pki.writeIdentity(
        str(certPath), str(keyPath), hosts.directory / "both.pem"
    )
    identity = tls.loadIdentity(combined)
    certificate = identity.original.to_cryptography()
    assert certificate.subject.rfc4514_string() == "CN=server.test"
    key = identity.privateKey.original.to_cryptography_key()
    assert key.public_key() == certificate.public_key()


def test_loadIdentityMissingFile(tmp_path: Path) -> None:
    """loadIdentity names a certificate file that does not exist."""
    missing = tmp_path / "nothere.pem"
    with pytest.raises(ConfigurationError, match=f"{missing} does not exist"):
        tls.loadIdentity(missing)


def test_loadIdentityUnreadableFile(tmp_path: Path) -> None:
    """loadIdentity names a certificate path that cannot be read (a directory)."""
    with pytest.raises(
        ConfigurationError, match=f"cannot read certificate file {tmp_path}"
    ):
        tls.loadIdentity(tmp_path)


def test_loadIdentityGarbageFile(tmp_path: Path) -> None:
    """loadIdentity names a file that holds no PEM certificate."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\x00not a certificate\n")
    with pytest.raises(ConfigurationError, match=f"{garbage} holds no PEM certificate"):
        tls.loadIdentity(garbage)


def test_loadIdentityMalformedPEM(tmp_path: Path) -> None:
    """loadIdentity names a file whose PEM certificate is damaged."""
    broken = tmp_path / "broken.pem"
    broken.write_bytes(
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(ConfigurationError, match=f"{broken} holds a malformed"):
        tls.loadIdentity(broken)


def test_loadIdentityNoKey(hosts: Hosts) -> None:
    """loadIdentity names a certificate file without a key when no key path is given."""
    certPath = hosts.directory / "server.test.pem"
    with pytest.raises(
        ConfigurationError, match=f"{certPath} holds no PEM private key"
    ):
        tls.loadIdentity(certPath)


def test_loadIdentityKeyMismatch(hosts: Hosts) -> None:
    """loadIdentity names both files when the key belongs to another certificate."""
    certPath = hosts.directory / "server.test.pem"
    keyPath = hosts.directory / "client.test.key"
    with pytest.raises(ConfigurationError, match="does not match") as raised:
        tls.loadIdentity(certPath, keyPath)
    assert str(certPath) in str(raised.value) and str(keyPath) in str(raised.value)


def test_loadIdentityEncryptedKey(hosts: Hosts) -> None:
    """loadIdentity names a key file whose key is encrypted."""
    keyPath = hosts.directory / "server.test.key"
    key = serialization.load_pem_private_key(keyPath.read_bytes(), None)
    encrypted = hosts.directory / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigurationError, match=f"{encrypted} is encrypted"):
        tls.loadIdentity(hosts.directory / "server.test.pem", encrypted)


def test_loadIdentityExpired(hosts: Hosts) -> None:
    """loadIdentity names a certificate file whose certificate has expired."""
    now = datetime.datetime.now(datetime.UTC)
    path = _writeHost(
        hosts.directory,
        "old.test",
        now - datetime.timedelta(days=30),
        now - datetime.timedelta(days=1),
    )
    with pytest.raises(ConfigurationError, match=f"in {path} expired on"):
        tls.loadIdentity(path)


def test_loadIdentityNotYetValid(hosts: Hosts) -> None:
    """loadIdentity names a certificate file whose certificate is not valid yet."""
    now = datetime.datetime.now(datetime.UTC)
    path = _writeHost(
        hosts.directory,
        "new.test",
        now + datetime.timedelta(days=1),
        now + datetime.timedelta(days=30),
    )
    with pytest.raises(ConfigurationError, match=f"in {path} is not valid until"):
        tls.loadIdentity(path)


def test_loadAuthorityBundle(hosts: Hosts, strangers: Hosts) -> None:
    """loadAuthority returns every CA certificate of a PEM bundle."""
    bundle = hosts.directory / "bundle.pem"
    bundle.write_bytes(
        (hosts.directory / "ca.pem").read_bytes()
        + (strangers.directory / "ca.pem").read_bytes()
    )
    authorities = tls.loadAuthority(bundle)
    assert [each.dump() for each in authorities] == [
        hosts.authorities[0].dump(),
        strangers.authorities[0].dump(),
    ]


def test_loadAuthorityMissingFile(tmp_path: Path) -> None:
    """loadAuthority names a CA file that does not exist."""
    with pytest.raises(
        ConfigurationError, match=f"CA file {tmp_path / 'ca.pem'} does not"
    ):
        tls.loadAuthority(tmp_path / "ca.pem")


def test_loadAuthorityRefusesHostCertificate(hosts: Hosts) -> None:
    """loadAuthority names a file whose certificate is not a CA."""
    path = hosts.directory / "server.test.pem"
    with pytest.raises(ConfigurationError, match=f"in {path} is not a CA"):
        tls.loadAuthority(path)


def test_loadAuthorityExpired(hosts: Hosts) -> None:
    """loadAuthority names a CA file whose CA has expired (checked at a later time)."""
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3651)
    path = hosts.directory / "ca.pem"
    with pytest.raises(ConfigurationError, match=f"in {path} expired on"):
        tls.loadAuthority(path, now=later)


def test_serverOptionsNeedAuthorities(hosts: Hosts) -> None:
    """serverOptions refuses an empty list of authorities, which would trust no one."""
    with pytest.raises(ConfigurationError, match="no certificate authority"):
        tls.serverOptions(hosts.identity("server.test"), [])


def test_issueHostWithOpensslCA(opensslHosts: Hosts) -> None:
    """pki.issueHost signs with a CA made by the doc's openssl recipe."""
    certPath, _ = pki.issueHost(opensslHosts.directory, "third.test")
    ca = x509.load_pem_x509_certificate(
        (opensslHosts.directory / "ca.pem").read_bytes()
    )
    x509.load_pem_x509_certificate(
        Path(certPath.path).read_bytes()
    ).verify_directly_issued_by(ca)


# --- identities -----------------------------------------------------------------


def test_peerIdentityPlaintext() -> None:
    """peerIdentity names a plaintext peer by its host (not port); no fingerprint."""
    transport = StringTransport()
    assert certificates.peerIdentity(transport) == "plaintext:192.168.1.1"
    assert certificates.peerFingerprint(transport) == ""


def _selfSigned(
    names: list[x509.NameAttribute], san: list[x509.GeneralName]
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(x509.Name(names))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(san), critical=False
        )
    return builder.sign(key, hashes.SHA256())


def test_certificateIdentityPrefersDNSName() -> None:
    """certificateIdentity returns the first DNS subjectAltName, not the CN."""
    cn = [x509.NameAttribute(NameOID.COMMON_NAME, "cn.test")]
    san: list[x509.GeneralName] = [x509.DNSName("dns1.test"), x509.DNSName("dns2.test")]
    assert certificates.certificateIdentity(_selfSigned(cn, san)) == "dns1.test"


def test_certificateIdentityFallsBackToCN() -> None:
    """certificateIdentity returns the CN of a certificate without subjectAltName."""
    cn = [x509.NameAttribute(NameOID.COMMON_NAME, "cn.test")]
    assert certificates.certificateIdentity(_selfSigned(cn, [])) == "cn.test"


def test_certificateIdentityNoName() -> None:
    """certificateIdentity refuses a certificate that names no host."""
    org = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example")]
    with pytest.raises(NotAuthorized, match="names no host"):
        certificates.certificateIdentity(_selfSigned(org, []))


# --- real connections -------------------------------------------------------------


@pytest.fixture(autouse=True)
def cleanReactor() -> Iterator[None]:
    """Fail a test that leaves sockets open in the reactor."""
    yield
    sockets = set(reactor.getReaders()) | set(reactor.getWriters())
    left = [each for each in sockets if isinstance(each, tcp.Port | tcp.Connection)]
    assert not left, f"left in the reactor: {left}"


@implementer(IHandshakeListener)
class Echo(Protocol):
    """The server side: echoes what it receives and notes who its peer is."""

    def __init__(self) -> None:
        self.received = b""
        self.peer: str | None = None
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.peer = certificates.peerIdentity(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


@implementer(IHandshakeListener)
class Probe(Protocol):
    """The client side: sends PING, then waits for the echo or the disconnect."""

    def __init__(self) -> None:
        self.received = b""
        self.peer: str | None = None
        self.fingerprint: str | None = None
        self.version: str | None = None
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(PING)

    def handshakeCompleted(self) -> None:
        self.peer = certificates.peerIdentity(self.transport)
        self.fingerprint = certificates.peerFingerprint(self.transport)
        self.version = self.transport.getHandle().get_protocol_version_name()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == PING:
            self.done.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        if not self.done.called:
            self.done.callback(None)
        self.lost.callback(None)


class EchoFactory(Factory):
    """Builds Echo protocols and remembers them, to wait for their end."""

    def __init__(self) -> None:
        self.built: list[Echo] = []

    def buildProtocol(self, addr: object) -> Echo:
        protocol = Echo()
        self.built.append(protocol)
        return protocol


async def exchange(
    serverOptions: CertificateOptions, clientOptions: IOpenSSLClientConnectionCreator
) -> tuple[Probe, list[Echo]]:
    """Connect over 127.0.0.1, send PING, and close everything once it ends."""
    factory = EchoFactory()
    port = await tls.serverEndpoint(reactor, 0, "127.0.0.1", serverOptions).listen(
        factory
    )
    try:
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client: Probe = await wrapClientTLS(clientOptions, tcp).connect(
            Factory.forProtocol(Probe)
        )
        try:
            await client.done.addTimeout(TIMEOUT, reactor)
        finally:
            client.transport.loseConnection()
            await client.lost.addTimeout(TIMEOUT, reactor)
        await gatherResults([echo.lost for echo in factory.built]).addTimeout(
            TIMEOUT, reactor
        )
    finally:
        await port.stopListening()
    return client, factory.built


def assertRefused(client: Probe, servers: list[Echo]) -> None:
    """The connection ended before any byte reached the server or came back."""
    assert client.received == b""
    assert client.reason is not None
    assert [echo.received for echo in servers] == [b""]
    assert [echo.peer for echo in servers] == [None]


def serverError(servers: list[Echo]) -> str:
    """The TLS error that ended the (only) server connection."""
    [echo] = servers
    assert echo.reason is not None and echo.reason.check(SSL.Error)
    return str(echo.reason.value)


@pytest_twisted.ensureDeferred
async def test_mutualTLSEcho(hosts: Hosts) -> None:
    """A client with a certificate from the same CA gets its echo over TLS 1.3."""
    client, servers = await exchange(hosts.server(), hosts.client())
    assert client.received == PING
    assert [echo.received for echo in servers] == [PING]
    assert client.version == "TLSv1.3"


@pytest_twisted.ensureDeferred
async def test_peerIdentityBothSides(hosts: Hosts) -> None:
    """peerIdentity names the client on the server and the server on the client."""
    client, servers = await exchange(hosts.server(), hosts.client())
    assert client.peer == "server.test"
    assert [echo.peer for echo in servers] == ["client.test"]


@pytest_twisted.ensureDeferred
async def test_peerFingerprint(hosts: Hosts) -> None:
    """peerFingerprint is the SHA-256 of the DER of the peer's certificate."""
    client, _ = await exchange(hosts.server(), hosts.client())
    der = x509.load_pem_x509_certificate(
        (hosts.directory / "server.test.pem").read_bytes()
    ).public_bytes(serialization.Encoding.DER)
    assert client.fingerprint == hashlib.sha256(der).hexdigest()


@pytest_twisted.ensureDeferred
async def test_connectByIPAddress(hosts: Hosts) -> None:
    """A client that asks for 127.0.0.1 accepts a server whose SAN holds that IP."""
    client, _ = await exchange(hosts.server(), hosts.client("127.0.0.1"))
    assert client.received == PING


@pytest_twisted.ensureDeferred
async def test_tls12ClientAccepted(hosts: Hosts) -> None:
    """A client limited to TLS 1.2 still connects (TLS 1.2 is the minimum)."""
    identity = hosts.identity("client.test")
    options = optionsForClientTLS(
        "server.test",
        trustRoot=trustRootFromCertificates(hosts.authorities),
        extraCertificateOptions={
            "lowerMaximumSecurityTo": TLSVersion.TLSv1_2,
            "privateKey": identity.privateKey.original.to_cryptography_key(),
            "certificate": identity.original.to_cryptography(),
        },
    )
    client, servers = await exchange(hosts.server(), options)
    assert client.received == PING
    assert client.version == "TLSv1.2"
    assert [echo.peer for echo in servers] == ["client.test"]


@pytest_twisted.ensureDeferred
async def test_clientFromAnotherCARefused(hosts: Hosts, strangers: Hosts) -> None:
    """The server refuses a client whose certificate comes from another CA."""
    options = tls.clientOptions(
        "server.test", strangers.identity("client.test"), hosts.authorities
    )
    client, servers = await exchange(hosts.server(), options)
    assertRefused(client, servers)
    assert client.reason.check(SSL.Error)
    assert "certificate verify failed" in serverError(servers)


@pytest_twisted.ensureDeferred
async def test_clientWithoutCertificateRefused(hosts: Hosts) -> None:
    """The server refuses a client that presents no certificate."""
    options = optionsForClientTLS(
        "server.test", trustRoot=trustRootFromCertificates(hosts.authorities)
    )
    client, servers = await exchange(hosts.server(), options)
    assertRefused(client, servers)
    assert client.reason.check(SSL.Error)
    assert "peer did not return a certificate" in serverError(servers)


@pytest_twisted.ensureDeferred
async def test_serverNameMismatchRefused(hosts: Hosts) -> None:
    """The client refuses a server whose subjectAltName lacks the name it asked for."""
    client, servers = await exchange(hosts.server(), hosts.client("other.test"))
    assertRefused(client, servers)
    assert client.reason.check(VerificationError)
    assert client.peer is None


@pytest_twisted.ensureDeferred
async def test_serverAddressMismatchRefused(hosts: Hosts) -> None:
    """The client refuses a server whose subjectAltName lacks the IP it asked for."""
    client, servers = await exchange(hosts.server(), hosts.client("127.0.0.3"))
    assertRefused(client, servers)
    assert client.reason.check(VerificationError)


@pytest_twisted.ensureDeferred
async def test_serverFromAnotherCARefused(hosts: Hosts, strangers: Hosts) -> None:
    """The client refuses a server whose certificate comes from another CA."""
    client, servers = await exchange(strangers.server(), hosts.client())
    assertRefused(client, servers)
    assert client.reason.check(SSL.Error)


@pytest_twisted.ensureDeferred
async def test_opensslCertificatesConnect(opensslHosts: Hosts) -> None:
    """Certificates made by the doc's openssl recipe load and connect both ways."""
    client, servers = await exchange(opensslHosts.server(), opensslHosts.client())
    assert client.received == PING
    assert client.peer == "server.test"
    assert [echo.peer for echo in servers] == ["client.test"]


def test_opensslRecipeKeysPrivate(opensslHosts: Hosts) -> None:
    """The doc's openssl recipe leaves every private key with mode 0600."""
    keys = sorted(opensslHosts.directory.glob("*.key"))
    assert [key.name for key in keys] == [
        "ca.key",
        "client.test.key",
        "server.test.key",
    ]
    assert {stat.S_IMODE(key.stat().st_mode) for key in keys} == {0o600}


@pytest_twisted.ensureDeferred
async def test_opensslAndPkiInterwork(opensslHosts: Hosts, tmp_path: Path) -> None:
    """A host issued by xenmig.cli.pki from an openssl-made CA talks to openssl."""
    pki.issueHost(opensslHosts.directory, "pki.test", ["127.0.0.1"])
    server = tls.serverOptions(
        opensslHosts.identity("pki.test"), opensslHosts.authorities
    )
    client, servers = await exchange(server, opensslHosts.client("pki.test"))
    assert client.received == PING
    assert [echo.peer for echo in servers] == ["client.test"]
