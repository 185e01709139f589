"""Host pairs: the peers file, the target's checks, and real daemons refusing peers."""

from __future__ import annotations

import datetime
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import reactor, task
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.python.filepath import FilePath

sys.path.insert(0, os.path.dirname(__file__))

from daemons import (  # noqa: E402
    PKI,
    Daemon,
    MiB,
    denseFile,
    disconnect,
    eventually,
    settled,
)

from xenmig import amp_commands as commands  # noqa: E402
from xenmig import certificates, tls  # noqa: E402
from xenmig.cli import pki  # noqa: E402
from xenmig.devices.file import fileKind  # noqa: E402
from xenmig.digest import hashFile  # noqa: E402
from xenmig.errors import (  # noqa: E402
    BadToken,
    Busy,
    ConfigurationError,
    DeviceRefused,
    NotAuthorized,
    UnknownMigration,
)
from xenmig.model import DeviceSpec  # noqa: E402
from xenmig.source.connection import ClientTimeouts  # noqa: E402
from xenmig.source.streamsender import StreamSender  # noqa: E402
from xenmig.target.authz import PeerPolicy, PolicySource, loadPolicy  # noqa: E402
from xenmig.target.config import TargetConfig  # noqa: E402
from xenmig.target.core import MigrationTarget  # noqa: E402

ROOT = Path(__file__).parent.parent
FP = "ab" * 32


# -- the peers file ----------------------------------------------------------------


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def roots(tmp_path: Path) -> list[FilePath]:
    for name in ("vms/a", "vms/b", "other"):
        (tmp_path / name).mkdir(parents=True)
    return [FilePath(str(tmp_path / "vms"))]


def test_exampleLoads(tmp_path: Path, roots: list[FilePath]) -> None:
    """The peers file of security.md loads, with its grants as documented."""
    text = (ROOT / "doc/examples/peers.toml").read_text()
    text = text.replace("/srv/vms/tenant-a", roots[0].path + "/a")
    policy = loadPolicy(write(tmp_path / "peers.toml", text), roots, ["file"])
    one = policy.authorize("NODE1.example.org", FP)
    assert one.kinds == {"file", "vtpm", "disk"}
    assert [r.path for r in one.roots or ()] == [roots[0].path + "/a"]
    assert (one.maxSessions, one.maxBytes) == (4, 2 * 1024**4)
    pinned = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    three = policy.authorize("node3.example.org", pinned)
    assert three.kinds == {"vtpm"} and three.roots is None
    with pytest.raises(NotAuthorized, match="not the one pinned"):
        policy.authorize("node3.example.org", FP)
    with pytest.raises(NotAuthorized, match="not listed in .*peers.toml"):
        policy.authorize("node2.example.org", FP)


def test_openPolicy() -> None:
    """Without a peers file every peer is granted everything."""
    grant = PeerPolicy.open().authorize("anyone.test")
    assert grant.kinds is None and grant.roots is None and grant.maxBytes is None
    assert not PeerPolicy.open().restricted


def test_fingerprintOnly(tmp_path: Path, roots: list[FilePath]) -> None:
    """An entry with only sha256 matches any name with that certificate."""
    text = f'[[peer]]\nsha256 = "{FP.upper()}"\nmax-bytes = 10\n'
    policy = loadPolicy(write(tmp_path / "p.toml", text), roots)
    assert policy.authorize("whoever.test", FP).maxBytes == 10
    with pytest.raises(NotAuthorized, match="not listed"):
        policy.authorize("whoever.test", "cd" * 32)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[peer]]\nidentity = 'a.test'\ncolour = 1\n", "unknown key.*colour"),
        ("[[peer]]\nsha256 = 'xyz'\n", "not a SHA-256 fingerprint"),
        ("[[peer]]\nkinds = ['file']\n", "give identity"),
        ("[[peer]]\nidentity = 'a.test'\nroots = ['OTHER']\n", "not inside"),
        ("[[peer]]\nidentity = 'a.test'\nroots = ['rel']\n", "not an absolute"),
        ("[[peer]]\nidentity = 'a.test'\nmax-bytes = '5 parsecs'\n", "not a size"),
        ("[[peer]]\nidentity = 'a.test'\nmax-sessions = 0\n", "1 or more"),
        ("[[peer]]\nidentity = 'a.test'\nkinds = ['../x']\n", "invalid"),
        ("[[peer]]\nidentity = 'a.test'\n[[peer]]\nidentity = 'A.test'\n", "repeats"),
        ("peer = 'x'\n", "must be"),
        ("[peers]\n", "unknown top-level"),
        ("[[peer]\n", "not valid TOML"),
    ],
)
def test_badFiles(
    tmp_path: Path, roots: list[FilePath], text: str, message: str
) -> None:
    """A malformed peers file is refused with the file, the entry and the rule."""
    text = text.replace("OTHER", str(tmp_path / "other"))
    with pytest.raises(ConfigurationError, match=message):
        loadPolicy(write(tmp_path / "p.toml", text), roots)


def test_sizes(tmp_path: Path, roots: list[FilePath]) -> None:
    """max-bytes takes a number or a size with a binary unit."""
    for value, expected in [("1024", 1024), ('"4K"', 4096), ('"3GiB"', 3 << 30)]:
        text = f"[[peer]]\nidentity = 'a.test'\nmax-bytes = {value}\n"
        policy = loadPolicy(write(tmp_path / "p.toml", text), roots)
        assert policy.authorize("a.test").maxBytes == expected


def test_reloadKeepsPolicyOnError(tmp_path: Path, roots: list[FilePath]) -> None:
    """A file that no longer loads leaves the previous policy in force."""
    path = tmp_path / "p.toml"
    write(path, "[[peer]]\nidentity = 'a.test'\n")
    source = PolicySource(str(path), roots)
    source.load()
    assert not source.changed()
    write(path, "[[peer]]\nidentity = 'b.test'\nmax-sessions = 2\n")
    os.utime(path, ns=(1, 1))
    assert source.changed() and source.reload()
    assert source.policy.authorize("b.test").maxSessions == 2
    write(path, "garbage [[[")
    os.utime(path, ns=(2, 2))
    assert source.changed() and not source.reload()
    assert not source.changed()  # not tried again until it changes
    assert source.policy.authorize("b.test").maxSessions == 2


# -- the target's checks, in memory --------------------------------------------------


class Target:
    """A MigrationTarget with the file kind, synchronous I/O, and a peers file."""

    def __init__(self, tmp_path: Path, peers: str) -> None:
        self.state = tmp_path / "state"
        self.root = tmp_path / "vms"
        for name in ("a", "b"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self.peersPath = tmp_path / "peers.toml"
        write(self.peersPath, peers.replace("ROOT", str(self.root)))
        config = TargetConfig(
            FilePath(str(self.state)), allowedRoots=(FilePath(str(self.root)),)
        )
        self.source = PolicySource(str(self.peersPath), config.roots)
        self.source.load()
        self.clock = task.Clock()
        self.target = MigrationTarget(
            self.clock,
            config,
            {"file": fileKind},
            lambda f, *a, **kw: maybeDeferred(f, *a, **kw),
            policy=self.source,
        )
        self.target.recover()  # start-up, as the daemon's service does it

    def prepare(
        self, peer: str, mid: str, *devices: dict[str, Any], fingerprint: str = ""
    ) -> Any:
        d = maybeDeferred(
            lambda: self.target.prepare(
                peer, mid, "vm-" + mid, 1, list(devices), fingerprint
            )
        )
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "prepare did not finish"
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]


def fileDevice(target: str, size: int = 100, kind: str = "file") -> dict[str, Any]:
    return {
        "kind": kind,
        "name": "blob",
        "size": size,
        "precopy": False,
        "params": {"target": target},
    }


PEERS = """
[[peer]]
identity = "source.test"
kinds = ["file"]
roots = ["ROOT/a"]
max-sessions = 1
max-bytes = 1000
"""


@pytest.fixture
def target(tmp_path: Path) -> Target:
    return Target(tmp_path, PEERS)


def test_listedPeerPrepares(target: Target) -> None:
    """A listed peer prepares within its kinds, root, sessions and bytes."""
    version, offers = target.prepare("source.test", "m1", fileDevice("x"))
    assert [o.accepted for o in offers] == [True]
    assert offers[0].params["destination"] == str(target.root / "a" / "x")


def test_unlistedPeerRefused(target: Target) -> None:
    """A peer of the CA that the file does not list is refused, nothing staged."""
    with pytest.raises(NotAuthorized, match="does not accept migrations from rogue"):
        target.prepare("rogue.test", "m1", fileDevice("x"))
    assert target.target.sessions == {}
    assert list((target.state / "staging").iterdir()) == []


def test_kindNotAllowed(target: Target) -> None:
    """A listed peer is refused a kind its entry does not name."""
    with pytest.raises(NotAuthorized, match="kind 'vtpm'.*its kinds are: file"):
        target.prepare("source.test", "m1", fileDevice("x", kind="vtpm"))


def test_destinationOutsidePeerRoots(target: Target) -> None:
    """A destination in another root of the daemon is refused for this peer."""
    _, offers = target.prepare(
        "source.test", "m1", fileDevice(str(target.root / "b/x"))
    )
    assert not offers[0].accepted
    assert "outside the allowed roots" in offers[0].reason
    assert str(target.root / "a") in offers[0].reason


@pytest.mark.parametrize(
    "destination", ["../../etc/x", "/etc/x", "a/../../x", "../b/x"]
)
def test_escapesRefused(target: Target, destination: str) -> None:
    """Escapes by '..' and absolute paths outside the peer's root are refused."""
    _, offers = target.prepare("source.test", "m1", fileDevice(destination))
    assert not offers[0].accepted and "device blob" in offers[0].reason


def test_symlinkOutRefused(target: Target, tmp_path: Path) -> None:
    """A symlinked directory leading out of the root is refused at Prepare."""
    os.symlink(tmp_path / "state", target.root / "a" / "sneaky")
    _, offers = target.prepare("source.test", "m1", fileDevice("sneaky/x"))
    assert "outside the allowed roots" in offers[0].reason


def test_declaredSizeOverLimit(target: Target) -> None:
    """A migration declaring more than max-bytes is refused at Prepare."""
    with pytest.raises(DeviceRefused, match="declare 1001 bytes, more than the 1000"):
        target.prepare("source.test", "m1", fileDevice("x", size=1001))


def test_sessionsPerPeer(target: Target) -> None:
    """A peer at its max-sessions is answered BUSY for another migration."""
    target.prepare("source.test", "m1", fileDevice("x"))
    with pytest.raises(Busy, match="^max-sessions: source.test already runs 1 migr"):
        target.prepare("source.test", "m2", fileDevice("y"))


def test_reloadAppliesToStreams(target: Target) -> None:
    """A peer removed from the file cannot open a stream of its prepared session."""
    target.prepare("source.test", "m1", fileDevice("x"))
    token = target.target.openStream("source.test", "m1", "blob")
    write(target.peersPath, "[[peer]]\nidentity = 'other.test'\n")
    assert target.source.reload()
    with pytest.raises(NotAuthorized, match="not listed"):
        target.target.openStream("source.test", "m1", "blob")
    with pytest.raises(NotAuthorized, match="not listed"):
        target.target.claimToken("source.test", token)


def test_streamBytesOverLimit(target: Target) -> None:
    """Bytes received past max-bytes on the streams of a migration are refused."""
    target.prepare("source.test", "m1", fileDevice("x"))
    charge = target.target.chargeStream("m1")
    charge(600)
    with pytest.raises(Exception, match="more than the 1000 bytes"):
        charge(600)


def test_statusOwnMigrationsOnly(target: Target) -> None:
    """With a peers file, a peer sees only its own migrations."""
    write(
        target.peersPath,
        "[[peer]]\nidentity = 'source.test'\n[[peer]]\nidentity = 'other.test'\n",
    )
    target.source.reload()
    target.prepare("source.test", "m1", fileDevice("x"))
    assert target.target.query("m1", "source.test")["peer"] == "source.test"
    with pytest.raises(UnknownMigration):
        target.target.query("m1", "other.test")
    assert target.target.list(50, "other.test") == []
    assert [r["migration_id"] for r in target.target.list(50, None)] == ["m1"]


def test_tokenReplacedPerDevice(target: Target) -> None:
    """A new token for a device revokes the earlier one (tokens stay bounded)."""
    target.prepare("source.test", "m1", fileDevice("x"))
    first = target.target.openStream("source.test", "m1", "blob")
    second = target.target.openStream("source.test", "m1", "blob")
    assert len(first) == 32 and first != second
    with pytest.raises(BadToken):
        target.target.claimToken("source.test", first)
    session, device = target.target.claimToken("source.test", second)
    assert (session.migrationId, device) == ("m1", "blob")


# -- real daemons --------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    made = PKI(tmp_path_factory.mktemp("pki"))
    pki.issueHost(made.ca, "thief.test")
    return made


def identityTLS(certs: PKI, name: str, pins: tuple[str, ...] = ()) -> Any:
    identity = tls.loadIdentity(certs.ca / f"{name}.pem", certs.ca / f"{name}.key")
    return tls.clientOptions("127.0.0.1", identity, certs.authorities, pins)


def fileSpec(source: Path, destination: Path | str) -> DeviceSpec:
    return DeviceSpec.parse(f"file:blob:path={source},target={destination}")


def peersFor(daemon: Daemon, text: str) -> Daemon:
    """Write the daemon's peers file (ROOT is its allowed root) and use it."""
    for name in ("a", "b"):
        (daemon.dest / name).mkdir(exist_ok=True)
    path = daemon.root / "peers.toml"
    write(path, text.replace("ROOT", str(daemon.dest)))
    daemon.extra += ["--peers", str(path)]
    return daemon


async def migrate(client: Any, source: Path, destination: Path | str) -> Any:
    migration = await client.prepare("vm1", [fileSpec(source, destination)])
    await migration.transfer()
    await migration.commit()
    return migration


def logText(daemon: Daemon) -> str:
    return daemon.logPath.read_text()


@pytest_twisted.ensureDeferred
async def test_daemonWarnsWithoutPeersFile(daemons: Callable[..., Daemon]) -> None:
    """A daemon without --peers says at start that any peer of the CA may migrate."""
    daemon = await daemons().launch(reactor)
    assert "no --peers file: any host whose certificate chains" in logText(daemon)


@pytest_twisted.ensureDeferred
async def test_unlistedPeerRefusedByDaemon(
    daemons: Callable[..., Daemon], certs: PKI, tmp_path: Path
) -> None:
    """A peer with a certificate from the CA, not listed, is refused and logged."""
    daemon = peersFor(daemons(), "[[peer]]\nidentity = 'thief.test'\n")
    await daemon.launch(reactor)
    source = denseFile(tmp_path / "source.bin", MiB)
    with pytest.raises(NotAuthorized, match="not listed in .*peers.toml") as caught:
        await daemon.client(reactor).prepare("vm1", [fileSpec(source, "x.bin")])
    assert "source.test" in str(caught.value)
    with pytest.raises(NotAuthorized):
        await daemon.client(reactor).listMigrations()
    assert re.search(r"refused source\.test: .*sha256 [0-9a-f]{64}", logText(daemon))
    assert daemon.journals() == [] and daemon.leftovers() == []
    assert sorted(p.name for p in daemon.dest.iterdir()) == ["a", "b"]
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_listedPeerLimits(
    daemons: Callable[..., Daemon], certs: PKI, tmp_path: Path
) -> None:
    """A listed peer is refused a kind and a root it lacks, and migrates within."""
    daemon = peersFor(
        daemons(),
        "[[peer]]\nidentity = 'source.test'\nkinds = ['file']\nroots = ['ROOT/a']\n",
    )
    await daemon.launch(reactor)
    client = daemon.client(reactor)
    source = denseFile(tmp_path / "source.bin", MiB)
    with pytest.raises(DeviceRefused, match="outside the allowed roots"):
        await client.prepare("vm1", [fileSpec(source, daemon.dest / "b" / "x.bin")])
    disk = DeviceSpec.parse(f"disk:root:path={source},target=root.img")
    with pytest.raises(NotAuthorized, match="kind 'disk'.*its kinds are: file"):
        await client.prepare("vm1", [fileSpec(source, "x.bin"), disk])
    migration = await migrate(client, source, "x.bin")
    assert migration.installed == [str(daemon.dest / "a" / "x.bin")]
    assert hashFile(str(daemon.dest / "a" / "x.bin")) == hashFile(str(source))
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_peersFileReloads(
    daemons: Callable[..., Daemon], certs: PKI, tmp_path: Path
) -> None:
    """SIGHUP, and a change of the file, bring a new policy in without a restart."""
    daemon = peersFor(daemons(), "[[peer]]\nidentity = 'thief.test'\n")
    await daemon.launch(reactor)
    source = denseFile(tmp_path / "source.bin", MiB)
    client = daemon.client(reactor, timeouts=ClientTimeouts(connect=10, call=10))
    with pytest.raises(NotAuthorized):
        await client.listMigrations()

    write(daemon.root / "peers.toml", "[[peer]]\nidentity = 'source.test'\n")
    os.kill(daemon.pid, signal.SIGHUP)
    await eventually(reactor, lambda: "SIGHUP" in logText(daemon), what="SIGHUP")

    async def allowed() -> bool:
        try:
            await client.listMigrations()
        except NotAuthorized:
            return False
        return True

    await eventually(reactor, allowed, what="the reload")
    await migrate(client, source, "x.bin")

    # No signal: the daemon notices the file changed by itself.
    write(daemon.root / "peers.toml", "[[peer]]\nidentity = 'nobody.test'\n  \n")

    async def refused() -> bool:
        return not await allowed()

    await eventually(reactor, refused, timeout=10, what="the change noticed")
    assert daemon.alive()
    await settled(reactor)


class SwitchTo(ClientFactory):
    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self.protocol


@pytest_twisted.ensureDeferred
async def test_stolenTokenRefused(
    daemons: Callable[..., Daemon], certs: PKI, tmp_path: Path
) -> None:
    """A stream token presented by another host of the same CA is refused, logged."""
    daemon = await daemons().launch(reactor)  # no peers file: both may connect
    source = denseFile(tmp_path / "source.bin", MiB)
    client = daemon.client(reactor)
    migration = await client.prepare("vm1", [fileSpec(source, "x.bin")])
    mid = migration.migrationId
    answer = await client.call(
        migration.control, commands.OpenStream, migration_id=mid, device="blob"
    )
    thief = daemon.client(reactor, identityTLS(certs, "thief.test"))
    protocol = await thief.connect()
    with pytest.raises(BadToken, match="issued to another host"):
        await thief.call(
            protocol,
            commands.StartStream,
            token=answer["token"],
            _protoToSwitchToFactory=SwitchTo(StreamSender("blob")),
        )
    # Nor may it act on the session itself.
    with pytest.raises(NotAuthorized, match="belongs to source.test"):
        await thief.call(protocol, commands.OpenStream, migration_id=mid, device="blob")
    await disconnect(reactor, protocol)
    assert "thief.test presented a token issued to source.test" in logText(daemon)
    # The owner goes on with a fresh token.
    await migration.transfer()
    await migration.commit()
    assert hashFile(str(daemon.dest / "x.bin")) == hashFile(str(source))
    await settled(reactor)


# -- the client pins the target; expired certificates ---------------------------------


def targetFingerprint(certs: PKI) -> str:
    data = (certs.ca / "target.test.pem").read_bytes()
    return certificates.certificateFingerprint(x509.load_pem_x509_certificate(data))


@pytest_twisted.ensureDeferred
async def test_clientPinsTarget(
    daemons: Callable[..., Daemon], certs: PKI, tmp_path: Path
) -> None:
    """A client pinning another certificate refuses the target; the right pin works."""
    daemon = await daemons().launch(reactor)
    source = denseFile(tmp_path / "source.bin", MiB)
    wrong = daemon.client(reactor, identityTLS(certs, "source.test", ("00" * 32,)))
    with pytest.raises(NotAuthorized, match="not the one pinned with --pin-sha256"):
        await wrong.prepare("vm1", [fileSpec(source, "x.bin")])
    assert daemon.journals() == []
    pin = ":".join(re.findall("..", targetFingerprint(certs).upper()))
    right = daemon.client(reactor, identityTLS(certs, "source.test", (pin,)))
    await migrate(right, source, "x.bin")
    await settled(reactor)


def expiredIdentity(certs: PKI, name: str, notYet: bool = False) -> PrivateCertificate:
    """A certificate for ``name`` from the test CA, expired (or not yet valid)."""
    caCert = x509.load_pem_x509_certificate((certs.ca / "ca.pem").read_bytes())
    caKey = serialization.load_pem_private_key((certs.ca / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start, end = (
        (now + datetime.timedelta(days=5), now + datetime.timedelta(days=10))
        if notYet
        else (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
        .sign(caKey, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return PrivateCertificate.loadPEM(pem)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("notYet", [False, True], ids=["expired", "not-yet-valid"])
async def test_expiredClientRefused(
    daemons: Callable[..., Daemon], certs: PKI, tmp_path: Path, notYet: bool
) -> None:
    """A client certificate outside its validity is refused; the daemon says why."""
    daemon = await daemons().launch(reactor)
    identity = expiredIdentity(certs, "late.test", notYet)
    options = tls.clientOptions("127.0.0.1", identity, certs.authorities)
    client = daemon.client(reactor, options, timeouts=ClientTimeouts(connect=10))
    with pytest.raises(SSL.Error):
        await client.listMigrations()
    expected = "is not valid until" if notYet else "expired on"
    await eventually(
        reactor,
        lambda: re.search(
            rf"TLS handshake from 127\.0\.0\.1 failed: the peer's certificate "
            rf"CN=late\.test {expected}",
            logText(daemon),
        ),
        what="the refusal logged",
    )
    assert daemon.alive()
    await settled(reactor)


class Silent(Protocol):
    def connectionLost(self, reason: Any) -> None:
        self.reason = reason


@pytest_twisted.ensureDeferred
async def test_expiredTargetRefusedByClient(certs: PKI) -> None:
    """The client refuses a target whose certificate expired, and says so."""
    identity = expiredIdentity(certs, "127.0.0.1")
    server = tls.serverOptions(identity, certs.authorities)
    port = await tls.serverEndpoint(reactor, 0, "127.0.0.1", server).listen(
        Factory.forProtocol(Protocol)
    )
    try:
        endpoint = wrapClientTLS(
            identityTLS(certs, "source.test"),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )
        client = await endpoint.connect(Factory.forProtocol(Silent))
        client.transport.write(b"hello")
        await eventually(reactor, lambda: hasattr(client, "reason"), what="refusal")
        assert client.reason.check(SSL.Error)
        assert (
            "the target's certificate CN=127.0.0.1 expired on"
            in (tls.recentRefusals[-1])
        )
    finally:
        await port.stopListening()
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_daemonWarnsBeforeExpiry(
    daemons: Callable[..., Daemon], certs: PKI
) -> None:
    """A daemon whose certificate expires within 30 days warns at start."""
    pki.issueHost(certs.ca, "soon.test", ["127.0.0.1"], days=10)
    daemon = daemons(
        "--cert",
        str(certs.ca / "soon.test.pem"),
        "--key",
        str(certs.ca / "soon.test.key"),
    )
    await daemon.launch(reactor)
    assert re.search(
        r"this host's certificate CN=soon\.test expires on .* \(in 9 days\)",
        logText(daemon),
    )


@pytest_twisted.ensureDeferred
async def test_threadedStreamsCheckTheTargetsName(
    daemons: Callable[..., Daemon], certs: PKI
) -> None:
    """A threaded stream's handshake refuses a target not carrying the name asked."""
    import socket

    from twisted.internet.threads import deferToThread

    from xenmig.source.streamtls import StreamTLS
    from xenmig.tls import NameMismatch

    daemon = await daemons().launch(reactor)
    identity = tls.loadIdentity(
        certs.ca / "source.test.pem", certs.ca / "source.test.key"
    )
    streamTLS = StreamTLS(identity, certs.authorities)

    def handshake(name: str) -> str:
        with socket.create_connection(("127.0.0.1", daemon.port), 10) as sock:
            sock.settimeout(None)
            connection = streamTLS.handshake(sock, name)
            return str(connection.get_protocol_version_name())

    assert await deferToThread(handshake, "127.0.0.1") in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(NameMismatch, match="not wrong.test"):
        await deferToThread(handshake, "wrong.test")
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_pinsApplyToThreadedStreams(
    daemons: Callable[..., Daemon], certs: PKI, tmp_path: Path
) -> None:
    """Streams sent from threads (stdlib TLS) check the pins too, before sending."""
    from xenmig.source.client import MigrationClient
    from xenmig.source.threadedstream import sslContext

    daemon = await daemons().launch(reactor)
    source = denseFile(tmp_path / "source.bin", MiB)
    identity = tls.loadIdentity(
        certs.ca / "source.test.pem", certs.ca / "source.test.key"
    )
    client = MigrationClient(
        reactor,
        "127.0.0.1",
        daemon.port,
        tls=identityTLS(certs, "source.test", (targetFingerprint(certs),)),
        sslContext=sslContext(identity, certs.authorities, ["11" * 32]),
        serverName="127.0.0.1",
    )
    migration = await client.prepare("vm1", [fileSpec(source, "x.bin")])
    with pytest.raises(NotAuthorized, match="not the one pinned"):
        await migration.transfer()
    assert not (daemon.dest / "x.bin").exists()
    await eventually(reactor, lambda: not daemon.leftovers(), what="staging removed")
    await settled(reactor)
