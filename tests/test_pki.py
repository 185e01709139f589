"""Tests for xenmig.cli.pki: the CA, host certificates and the ``xenmig pki`` CLI."""

from __future__ import annotations

import datetime
import ipaddress
import re
import shlex
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xenmig.cli import pki
from xenmig.errors import ConfigurationError


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def caDir(tmp_path: Path) -> Path:
    """A directory holding a fresh CA."""
    directory = tmp_path / "ca"
    pki.initCA(directory)
    return directory


def test_initCAWritesSelfSignedCA(caDir: Path) -> None:
    """initCA writes a self-signed CA certificate that may sign certificates."""
    ca = _certificate(caDir / "ca.pem")
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    name = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert name == "xenmig CA"
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"


def test_initCAKeyMatchesAndIsPrivate(caDir: Path) -> None:
    """initCA writes an EC key matching the certificate, mode 0600, in a 0700 dir."""
    key = serialization.load_pem_private_key((caDir / "ca.key").read_bytes(), None)
    ca = _certificate(caDir / "ca.pem")
    assert key.public_key() == ca.public_key()
    assert _mode(caDir / "ca.key") == 0o600
    assert _mode(caDir) == 0o700


def test_initCARefusesExistingCA(caDir: Path) -> None:
    """initCA refuses, leaving the CA untouched, when a CA already exists."""
    before = (caDir / "ca.key").read_bytes()
    with pytest.raises(ConfigurationError, match="already exists"):
        pki.initCA(caDir)
    assert (caDir / "ca.key").read_bytes() == before


def test_issueHostCertificateVerifies(caDir: Path) -> None:
    """issueHost writes a host certificate that the CA's key signed."""
    certPath, keyPath = pki.issueHost(caDir, "node1.example", ["192.0.2.10"])
    host = _certificate(Path(certPath.path))
    host.verify_directly_issued_by(_certificate(caDir / "ca.pem"))
    key = serialization.load_pem_private_key(Path(keyPath.path).read_bytes(), None)
    assert key.public_key() == host.public_key()
    assert Path(certPath.path) == caDir / "node1.example.pem"
    assert Path(keyPath.path) == caDir / "node1.example.key"


def test_issueHostNamesAndUsages(caDir: Path) -> None:
    """issueHost puts the name and addresses in SAN and allows server and client use."""
    certPath, _ = pki.issueHost(caDir, "node1.example", ["192.0.2.10", "2001:db8::1"])
    host = _certificate(Path(certPath.path))
    extensions = host.extensions
    san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node1.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("2001:db8::1"),
    ]
    assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    usage = extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert not extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cn = host.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "node1.example"


def test_issueHostKeyIdentifiersChain(caDir: Path) -> None:
    """The host's authority key identifier is the CA's subject key identifier."""
    certPath, _ = pki.issueHost(caDir, "node1.example")
    host = _certificate(Path(certPath.path))
    ca = _certificate(caDir / "ca.pem")
    aki = host.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    caSKI = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == caSKI.digest
    assert host.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_issueHostValidity(caDir: Path) -> None:
    """issueHost makes a certificate valid from 5 minutes ago for the given days."""
    before = datetime.datetime.now(datetime.UTC)
    certPath, _ = pki.issueHost(caDir, "node1.example", days=10)
    host = _certificate(Path(certPath.path))
    start = host.not_valid_before_utc
    assert before - datetime.timedelta(minutes=6) < start <= before
    assert start < before - datetime.timedelta(minutes=4)
    assert host.not_valid_after_utc - start == datetime.timedelta(days=10)


def test_issueHostKeyIsPrivate(caDir: Path) -> None:
    """issueHost writes the host key with mode 0600."""
    _, keyPath = pki.issueHost(caDir, "node1.example")
    assert _mode(Path(keyPath.path)) == 0o600


def test_issueHostRefusesOverwrite(caDir: Path) -> None:
    """issueHost refuses to overwrite the files of a host issued before."""
    _, keyPath = pki.issueHost(caDir, "node1.example")
    before = Path(keyPath.path).read_bytes()
    with pytest.raises(ConfigurationError, match="already exist"):
        pki.issueHost(caDir, "node1.example")
    assert Path(keyPath.path).read_bytes() == before


@pytest.mark.parametrize(
    "host",
    ["", "-node", "node-", "no_de", "a..b", "node/x", "x" * 64, "10.0.0.1", "ca pem"],
)
def test_issueHostRejectsBadHostName(caDir: Path, host: str) -> None:
    """issueHost refuses a host name that is not a DNS name, writing nothing."""
    before = sorted(caDir.iterdir())
    with pytest.raises(ConfigurationError, match="host"):
        pki.issueHost(caDir, host)
    assert sorted(caDir.iterdir()) == before


def test_issueHostRejectsBadAddress(caDir: Path) -> None:
    """issueHost refuses an --ip that is not an IP address, naming it."""
    with pytest.raises(ConfigurationError, match="'192.0.2'"):
        pki.issueHost(caDir, "node1.example", ["192.0.2"])


def test_issueHostWithoutCA(tmp_path: Path) -> None:
    """issueHost explains how to make a CA when the directory holds none."""
    with pytest.raises(ConfigurationError, match="init-ca"):
        pki.issueHost(tmp_path, "node1.example")


def test_writeIdentityCombines(caDir: Path) -> None:
    """writeIdentity writes the certificate then the key, mode 0600."""
    certPath, keyPath = pki.issueHost(caDir, "node1.example")
    combined = pki.writeIdentity(certPath, keyPath, caDir / "both.pem")
    data = Path(combined.path).read_bytes()
    assert data == Path(certPath.path).read_bytes() + Path(keyPath.path).read_bytes()
    assert _mode(Path(combined.path)) == 0o600


def test_mainInitCAAndIssue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """main() init-ca then issue write the files, print their paths and return 0."""
    directory = tmp_path / "ca"
    assert pki.main(["init-ca", "--dir", str(directory)]) == 0
    argv = ["issue", "--dir", str(directory), "--host", "node1.example"]
    argv += ["--ip", "192.0.2.10", "--ip", "192.0.2.11", "--combined"]
    assert pki.main(argv) == 0
    printed = capsys.readouterr().out.split()
    names = ["ca.pem", "ca.key", "node1.example.pem", "node1.example.key"]
    expected = [str(directory / name) for name in names]
    assert printed == expected + [str(directory / "node1.example.identity.pem")]
    assert all(Path(path).is_file() for path in printed)
    san = _certificate(directory / "node1.example.pem").extensions
    ips = san.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(ips.get_values_for_type(x509.IPAddress)) == 2


def test_mainBadHostName(caDir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """main() prints one error line and returns 2 for a bad host name."""
    status = pki.main(["issue", "--dir", str(caDir), "--host", "bad_name"])
    assert status == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "bad_name" in lines[0]


def test_mainUsageError(capsys: pytest.CaptureFixture[str]) -> None:
    """main() prints one error line and returns 2 when a required option is missing."""
    assert pki.main(["issue", "--host", "node1.example"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "--dir" in lines[0]


def test_mainSecondInitCA(caDir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """main() returns 2 with a clear line when init-ca finds an existing CA."""
    assert pki.main(["init-ca", "--dir", str(caDir)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_docCommandsWork(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ``xenmig pki`` commands in doc/certificates.md succeed as written."""
    doc = (Path(__file__).parent.parent / "doc" / "certificates.md").read_text()
    found = re.search(r"<!-- xenmig-pki:.*?-->\n```sh\n(.*?)```", doc, re.S)
    assert found
    commands = [shlex.split(line) for line in found.group(1).splitlines()]
    assert commands and all(words[:2] == ["xenmig", "pki"] for words in commands)
    for words in commands:
        argv = [word.replace("/root/xenmig-ca", str(tmp_path)) for word in words]
        assert pki.main(argv[2:]) == 0
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == sorted(
        ["ca.pem", "ca.key"]
        + [f"node{n}.example.{e}" for n in (1, 2) for e in ("pem", "key")]
    )
