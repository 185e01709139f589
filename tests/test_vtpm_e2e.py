"""
End to end (issue 3): a running swtpm vTPM migrated through real ``twistd xenmig``
daemons over mutual TLS, and verified on the target with tpm2-tools.

Two hosts on loopback, each with its own certificate from one throwaway CA and its
own daemon: ``hosta.test`` (the source: ``xenmig migrate`` or the client API run
with its certificate) and ``hostb.test`` (the target daemon); one test takes the
migrated TPM on, from B back into A's daemon.  The source TPM is populated with
``populate`` from ``tests/test_vtpm.py`` (a PCR extended, a persistent primary, a
secret sealed to a PCR policy, an NV index) and the target TPM checked with
``assertResumed`` (same PCRs, the handle, the secret unseals, the NV contents, and
a raw TPM2_Startup answered TPM_RC_INITIALIZE: it resumed, it was not restarted).

Failures go through the daemon too: each aborts, leaves the source TPM running and
usable, names the reason at the source, and ``xenmig status`` on the target shows
the session ABORTED with that reason (a device refused at Prepare opens no session
at all: there the CLI's message is the whole record).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from daemons import Daemon, eventually, settled
from test_vtpm import (
    Host,
    assertResumed,
    assertUsable,
    flush,
    populate,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    UNIXClientEndpoint,
    UNIXServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from zope.interface import implementer

from xenmig import tls
from xenmig.cli import pki
from xenmig.clients.swtpm import CMD_GET_CAPABILITY, SwtpmNotRunning
from xenmig.clients.swtpmprocess import SwtpmProcess
from xenmig.devices.vtpm.kind import vtpmKind
from xenmig.errors import CommitFailed, DigestMismatch, XenmigError
from xenmig.interfaces import IDeviceKind
from xenmig.model import DeviceSpec
from xenmig.source.client import MigrationClient
from xenmig.source.connection import ClientTimeouts
from xenmig.source.threadedstream import sslContext
from xenmig.testing import requirePrograms

PROGRAMS = (
    "swtpm",
    "tpm2_startup",
    "tpm2_pcrextend",
    "tpm2_createprimary",
    "tpm2_evictcontrol",
    "tpm2_createpolicy",
    "tpm2_create",
    "tpm2_load",
    "tpm2_unseal",
    "tpm2_nvdefine",
    "tpm2_nvwrite",
    "tpm2_nvread",
    "tpm2_flushcontext",
    "tpm2_getcap",
)
HOST_A, HOST_B = "hosta.test", "hostb.test"
#: Bounds on every wait of the in-process client.
TIMEOUTS = ClientTimeouts(connect=10, call=10, ready=20, commit=20, keepalive=5)


# -- two hosts, two daemons ------------------------------------------------------------


@dataclass
class HostCerts:
    """One host's identity from the shared CA, as a daemon and as a client."""

    ca: Path
    name: str

    def paths(self) -> tuple[str, str, str]:
        return (
            str(self.ca / pki.CA_CERTIFICATE),
            str(self.ca / f"{self.name}.pem"),
            str(self.ca / f"{self.name}.key"),
        )

    def daemonArgs(self) -> list[str]:
        ca, cert, key = self.paths()
        return ["--ca", ca, "--cert", cert, "--key", key]

    def clientTLS(self, threaded: bool = True) -> dict[str, Any]:
        """MigrationClient's TLS arguments, as ``xenmig migrate`` makes them
        (state streams from threads), or streams through Twisted's TLS."""
        ca, cert, key = self.paths()
        identity = tls.loadIdentity(cert, key)
        authorities = tls.loadAuthority(ca)
        options = {"tls": tls.clientOptions("127.0.0.1", identity, authorities)}
        if threaded:
            options["sslContext"] = sslContext(identity, authorities)
        return options

    def cliArgs(self, target: Daemon) -> list[str]:
        """``xenmig migrate`` options to reach ``target`` as this host."""
        ca, cert, key = self.paths()
        where = f"127.0.0.1:{target.port}"
        return ["--target", where, "--ca", ca, "--cert", cert, "--key", key]


@dataclass
class Hosts:
    """The two daemons; ``runA``/``runB``: each host's toolstack directory (its
    swtpms' sockets, its keys), an allowed root of that host's daemon, since a
    peer may name only paths inside the roots."""

    a: Daemon
    b: Daemon
    certsA: HostCerts
    certsB: HostCerts
    runA: str
    runB: str

    def client(self, kinds: Any = None, threaded: bool = True) -> MigrationClient:
        """A client on host A for host B's daemon."""
        return MigrationClient(
            reactor,
            "127.0.0.1",
            self.b.port,
            timeouts=TIMEOUTS,
            kinds=kinds,
            **self.certsA.clientTLS(threaded),
        )


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The daemons of host A and host B, started once for the module."""
    requirePrograms(*PROGRAMS)
    root = tmp_path_factory.mktemp("vtpm-e2e")
    ca = root / "pki"
    pki.initCA(ca)
    certs = [HostCerts(ca, name) for name in (HOST_A, HOST_B)]
    for host in certs:
        pki.issueHost(ca, host.name, ["127.0.0.1"])
    run = tempfile.mkdtemp(prefix="xm-e2e-")  # short: unix socket paths
    runs = [os.path.join(run, name) for name in ("a", "b")]
    daemons = []
    for c, where in zip(certs, runs, strict=True):
        os.mkdir(where)
        daemons.append(Daemon(root / c.name, c, "--allow-root", where))
    try:
        for daemon in daemons:
            daemon.spawn()
        deadline = time.monotonic() + 30
        while not all(daemon.ready() for daemon in daemons):
            assert time.monotonic() < deadline, [d.output() for d in daemons]
            time.sleep(0.02)
        yield Hosts(*daemons, *certs, *runs)
    finally:
        for daemon in daemons:
            daemon.stop()
        shutil.rmtree(run, ignore_errors=True)


async def _side(where: str) -> Any:
    side = Host(tempfile.mkdtemp(dir=where), [])
    yield side
    for process in side.started:
        await process.stop()
    shutil.rmtree(side.work, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def host(hosts: Hosts):
    """Host A's toolstack: its swtpms, keys and tpm2-tools files (all stopped and
    removed afterwards)."""
    async for side in _side(hosts.runA):
        yield side


@pytest_twisted.async_yield_fixture
async def peer(hosts: Hosts):
    """Host B's toolstack: the target swtpms and keys."""
    async for side in _side(hosts.runB):
        yield side


# -- the command line, as a child process ----------------------------------------------


@dataclass
class Result:
    code: int | None
    out: str
    err: str


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: Deferred[None] = Deferred()
        self.code: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Any) -> None:
        self.code = reason.value.exitCode
        self.ended.callback(None)


async def xenmig(*args: str, timeout: float = 30.0) -> Result:
    """Run ``python -m xenmig.cli.main ARGS`` without blocking the reactor; killed if it
    takes longer than ``timeout`` seconds."""
    child = _Collect()
    argv = [sys.executable, "-m", "xenmig.cli.main", *args]
    transport = reactor.spawnProcess(child, sys.executable, argv, env=dict(os.environ))
    killer = reactor.callLater(timeout, transport.signalProcess, "KILL")
    await child.ended
    if killer.active():
        killer.cancel()
    else:
        raise AssertionError(f"xenmig {' '.join(args)} took over {timeout:g} s")
    return Result(
        child.code,
        b"".join(child.out).decode(errors="replace"),
        b"".join(child.err).decode(errors="replace"),
    )


async def statusOn(daemon: Daemon, migrationId: str) -> dict[str, Any]:
    """``xenmig status ID --json`` on the target host (its local socket)."""
    result = await xenmig(
        "status", migrationId, "--state-dir", str(daemon.stateDir), "--json"
    )
    assert result.code == 0, result.err
    return json.loads(result.out)


async def bounded(d: Deferred[Any], seconds: float = 10.0) -> Any:
    return await d.addTimeout(seconds, reactor)


# -- the source side -------------------------------------------------------------------


def keyArgs(side: Host, keys: str, shared: Host | None = None) -> dict[str, Any]:
    """
    One side's swtpm key options for the variant ``keys``: ``plain``; ``key``
    (each side its own --key); ``migration-key`` (each side its own --key and a
    --migration-key: ``shared``'s, copied, or a new one).
    """
    options: dict[str, Any] = {}
    if keys in ("key", "migration-key"):
        options["key"] = side.key("state-key")
    if keys == "migration-key":
        options["migrationKey"] = side.key("migration-key")
        if shared is not None:
            shutil.copyfile(
                shared.key("migration-key").path, options["migrationKey"].path
            )
    return options


async def runningSource(host: Host, keys: str = "plain") -> tuple[Any, dict[str, str]]:
    """Host A's running swtpm, populated; what populate returned."""
    source = await host.swtpm("src", **keyArgs(host, keys))
    return source, await populate(source, host.work)


def sourceParams(source: SwtpmProcess, keys: str = "plain", timeout: str = "") -> str:
    params = f"ctrl={source.ctrlPath}"
    if keys != "plain":
        params += ",key=1"
    if timeout:
        params += f",timeout={timeout}"
    return params


async def prepare(hosts: Hosts, spec: str, migrationId: str, **kw: Any) -> Any:
    """Prepare a migration from A to B with the client API (as host A)."""
    client = hosts.client(**kw)
    return await client.prepare(migrationId, [DeviceSpec.parse(spec)], migrationId)


async def assertAbortedOnTarget(
    hosts: Hosts, migrationId: str, words: str, error: BaseException
) -> dict[str, Any]:
    """The source's error and the target's ``xenmig status`` both give the reason;
    the target is ABORTED and removed what it staged."""
    assert words in str(error), str(error)
    status = await statusOn(hosts.b, migrationId)
    assert status["phase"] == "ABORTED", status
    assert words in status["reason"], status["reason"]
    assert status["peer"] == HOST_A
    assert [d["state"] for d in status["devices"]] == ["ABORTED"]
    await eventually(reactor, lambda: not hosts.b.leftovers(), 10, "staging removed")
    return status


async def assertNotInitialised(target: SwtpmProcess) -> None:
    """The target swtpm was never loaded: its TPM still does not run."""
    assert target.running
    with pytest.raises(SwtpmNotRunning):
        await target.control.getEstablished()


# -- successful migrations -------------------------------------------------------------


@pytest.mark.parametrize("keys", ["plain", "key", "migration-key"])
@pytest.mark.parametrize("mode", ["ctrl", "statedir"])
@pytest_twisted.ensureDeferred
async def test_migrate_with_cli(
    hosts: Hosts, host: Host, peer: Host, mode: str, keys: str
):
    """
    ``xenmig migrate --json`` on host A moves the running TPM into host B's
    daemon; the TPM resumes there with every piece of state, in both target modes,
    with plain state, with a different --key on each side, and with a shared
    --migration-key as well.  The source swtpm is shut down after the commit.
    """
    source, expected = await runningSource(host, keys)
    targetKeys = keyArgs(peer, keys, shared=host)
    migrationId = f"cli-{mode}-{keys}"
    if mode == "ctrl":  # host B's toolstack starts a fresh swtpm, without INIT
        target = await peer.swtpm("dst", running=False, **targetKeys)
        where = f"target-ctrl={target.ctrlPath}"
    else:
        statedir = hosts.b.dest / migrationId
        where = f"target-statedir={statedir}"
        if "key" in targetKeys:
            where += f",target-key={targetKeys['key'].path}"
        if "migrationKey" in targetKeys:
            where += f",target-migration-key={targetKeys['migrationKey'].path}"
    spec = f"vtpm:tpm0:{sourceParams(source, keys)},{where}"
    # host B's toolstack waits for the VM before it attaches the TPM (resume gate)
    waiting = Deferred.fromCoroutine(
        xenmig(
            "await", "--domain", migrationId, "--state-dir", str(hosts.b.stateDir),
            "--timeout", "20", "--json",
        )
    )  # fmt: skip

    result = await xenmig(
        "migrate",
        *hosts.certsA.cliArgs(hosts.b),
        "--domain",
        migrationId,
        "--migration-id",
        migrationId,
        "--device",
        spec,
        "--json",
    )

    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["phase"] == "COMMITTED"
    restored = await waiting
    assert restored.code == 0, restored.err
    assert json.loads(restored.out)["installed"] == report["installed"]
    [device] = report["devices"]
    assert device["kind"] == "vtpm" and 8 * 1024 < device["data_bytes"] < 64 * 1024
    await bounded(source.whenEnded())  # released: the same TPM never runs twice
    status = await hosts.b.status(reactor, migrationId)
    assert (status["phase"], status["peer"]) == ("COMMITTED", HOST_A)
    assert status["devices"][0]["digest"] == device["digest"]
    if mode == "ctrl":
        resumed = f"vtpm tpm0 resumed in swtpm at {target.ctrlPath}"
        assert report["installed"] == [resumed]
    else:
        assert report["installed"] == [str(statedir)]
        # host B's toolstack starts the VM's swtpm on the new directory, INIT 1.
        target = await peer.swtpm(str(statedir), running=False, **targetKeys)
        await target.control.init(1)
    await assertResumed(target, host.work, expected)
    assert hosts.b.leftovers() == []


@pytest_twisted.ensureDeferred
async def test_round_trip_through_both_daemons(hosts: Hosts, host: Host, peer: Host):
    """
    A to B with the client API (streams through Twisted's TLS; B's toolstack
    started the target swtpm), then the resumed TPM back from B into A's daemon
    with ``xenmig migrate`` as host B (a state directory under A's own key): still
    the same TPM.
    """
    source, expected = await runningSource(host)
    onB = await peer.swtpm("on-b", running=False)
    spec = f"vtpm:tpm0:ctrl={source.ctrlPath},target-ctrl={onB.ctrlPath}"
    migration = await prepare(hosts, spec, "trip-1", threaded=False)
    await migration.transfer()
    assert await migration.commit() == [f"vtpm tpm0 resumed in swtpm at {onB.ctrlPath}"]
    await bounded(source.whenEnded())
    await assertResumed(onB, host.work, expected)
    await flush(onB)  # what assertResumed loaded (no resource manager here)

    statedir = hosts.a.dest / "trip-2"
    key = host.key("state-key-back")
    back = f"vtpm:tpm0:ctrl={onB.ctrlPath},target-statedir={statedir},"
    back += f"target-key={key.path},target-allow-unencrypted=1"
    result = await xenmig(
        "migrate",
        *hosts.certsB.cliArgs(hosts.a),
        "--domain",
        "trip",
        "--migration-id",
        "trip-2",
        "--device",
        back,
    )

    assert result.code == 0, result.err
    assert f"installed {statedir}" in result.out
    await bounded(onB.whenEnded())
    status = await hosts.a.status(reactor, "trip-2")
    assert (status["phase"], status["peer"]) == ("COMMITTED", HOST_B)
    onA = await host.swtpm(str(statedir), running=False, key=key)
    await onA.control.init(1)
    await assertResumed(onA, host.work, expected)
    await settled(reactor)


# -- failures --------------------------------------------------------------------------


class CorruptingWriter:
    """
    A record writer that passes everything on but flips one bit in the first
    DATA record of the volatile blob: damage in transit, after the source
    computed the digests it announces.
    """

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)

    def writeMetadata(self, metadata: dict[str, Any]) -> Deferred[None]:
        self.armed = metadata.get("vtpm-blob") == "volatile"
        return self.writer.writeMetadata(metadata)

    def writeData(self, offset: int, data: bytes) -> Deferred[None]:
        if self.armed:
            self.armed = False
            damaged = bytearray(data)
            damaged[len(damaged) // 2] ^= 0x10
            data = bytes(damaged)
        return self.writer.writeData(offset, data)


@implementer(IDeviceKind)
class CorruptingKind:
    """The source side of the vtpm kind, sending through a L{CorruptingWriter}."""

    kind = "vtpm"
    summary = "vtpm, damaged in transit"

    def source(self, spec: DeviceSpec, context: Any) -> Any:
        device = vtpmKind.source(spec, context)
        sendFinal = device.sendFinal
        device.sendFinal = lambda writer: sendFinal(CorruptingWriter(writer))
        return device

    def target(self, description: Any, context: Any) -> Any:
        raise NotImplementedError("source side only")


@pytest_twisted.ensureDeferred
async def test_corrupted_in_transit(hosts: Hosts, host: Host, peer: Host):
    """A blob damaged in the stream fails the target's digest check: ABORTED, the
    target swtpm never initialised, the source TPM runs on."""
    source, expected = await runningSource(host)
    target = await peer.swtpm("dst", running=False)
    spec = f"vtpm:tpm0:ctrl={source.ctrlPath},target-ctrl={target.ctrlPath}"
    migration = await prepare(
        hosts, spec, "corrupted", kinds={"vtpm": CorruptingKind()}
    )

    with pytest.raises(DigestMismatch) as caught:
        await migration.transfer()

    assert migration.phase == "ABORTED"
    await assertAbortedOnTarget(
        hosts, "corrupted", "the volatile blob differs from what the source sent",
        caught.value,
    )  # fmt: skip
    assert "the target TPM was not initialised" in str(caught.value)
    await assertNotInitialised(target)
    await assertUsable(source, expected)
    await settled(reactor)


class FlipProxy(Protocol):
    """
    One connection of a control-socket proxy: forwards control commands to the
    real swtpm and their answers back, flipping one byte of a GET_STATEBLOB
    answer for the volatile blob (as if the source host's memory or socket
    damaged it).  The commands of an operation share a connection, one at a
    time: bytes from the client after an answer begin the next command.
    """

    transport: Any

    def __init__(self, real: str) -> None:
        self.real = real
        self.request = b""
        self.upstream: Any = None
        self.answered = 0

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        d = connectProtocol(UNIXClientEndpoint(reactor, self.real, 5), _Upstream(self))
        d.addCallbacks(self._connected, lambda _: self.transport.loseConnection())

    def _connected(self, upstream: Any) -> None:
        self.upstream = upstream
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.answered:  # the previous command was answered: a new one
            self.request, self.answered = b"", 0
        self.request += data
        self.upstream.transport.write(data)

    def fromSwtpm(self, data: bytes) -> None:
        getVolatile = struct.pack(">I", 0x0C) + b"\0\0\0\1" + struct.pack(">I", 2)
        flip = 16 + 200 - self.answered  # inside the blob, past the 16-byte header
        if self.request.startswith(getVolatile) and 0 <= flip < len(data):
            damaged = bytearray(data)
            damaged[flip] ^= 0x01
            data = bytes(damaged)
        self.answered += len(data)
        self.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class _Upstream(Protocol):
    transport: Any

    def __init__(self, downstream: FlipProxy) -> None:
        self.downstream = downstream

    def dataReceived(self, data: bytes) -> None:
        self.downstream.fromSwtpm(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.downstream.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_corrupted_at_the_source_with_migration_key(
    hosts: Hosts, host: Host, peer: Host
):
    """
    A byte flipped between the source swtpm and the handler happens before the
    stream's digests; with a migration key, swtpm's own authentication refuses it
    at the target's SET, which happens when the state arrives: the session aborts
    before the commit, and the target TPM is never INITed.
    (Plain blobs have no such check: see doc/vtpm.md.)
    """
    source, expected = await runningSource(host, "migration-key")
    targetKeys = keyArgs(peer, "migration-key", shared=host)
    target = await peer.swtpm("dst", running=False, **targetKeys)
    proxyPath = os.path.join(host.work, "proxy.ctrl")
    factory = Factory.forProtocol(lambda: FlipProxy(source.ctrlPath))
    port = await UNIXServerEndpoint(reactor, proxyPath).listen(factory)
    try:
        spec = f"vtpm:tpm0:ctrl={proxyPath},key=1,target-ctrl={target.ctrlPath}"
        migration = await prepare(hosts, spec, "corrupted-source")
        with pytest.raises(XenmigError) as caught:
            await migration.transfer()
    finally:
        await port.stopListening()

    assert migration.phase == "ABORTED"
    status = await assertAbortedOnTarget(
        hosts, "corrupted-source", "--migration-key", caught.value
    )
    assert "SET_STATEBLOB" in status["reason"]
    assert status["installed"] == []
    await assertNotInitialised(target)
    await assertUsable(source, expected)
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_busy_control_socket(hosts: Hosts, host: Host, peer: Host):
    """
    Another client holding the source's control socket when the VM is paused: the
    final GET times out, the session aborts with the reason on both sides, nothing
    changed; once the socket is free, the same migration succeeds.
    """
    source, expected = await runningSource(host)
    target = await peer.swtpm("dst", running=False)
    params = sourceParams(source, timeout="0.5")
    spec = f"vtpm:tpm0:{params},target-ctrl={target.ctrlPath}"
    migration = await prepare(hosts, spec, "busy")
    holder = socket.socket(socket.AF_UNIX)
    holder.settimeout(5)
    try:
        holder.connect(source.ctrlPath)
        holder.sendall(struct.pack(">I", CMD_GET_CAPABILITY))
        assert len(holder.recv(8)) == 8  # swtpm now serves this client only
        with pytest.raises(XenmigError) as caught:
            await migration.transfer()
    finally:
        holder.close()

    assert migration.phase == "ABORTED"
    await assertAbortedOnTarget(
        hosts, "busy", "did not answer GET_STATEBLOB", caught.value
    )
    assert source.ctrlPath in str(caught.value)
    await assertNotInitialised(target)
    await assertUsable(source, expected)

    again = await prepare(hosts, spec, "busy-retried")
    await again.transfer()
    await again.commit()
    await assertResumed(target, host.work, expected)
    await settled(reactor)


@pytest.mark.parametrize("which", ["target", "source"])
@pytest_twisted.ensureDeferred
async def test_swtpm_dies_midway(hosts: Hosts, host: Host, peer: Host, which: str):
    """
    A swtpm killed after Prepare: the migration aborts with the reason on both
    sides, the target swtpm is never initialised, and (when the target's died)
    the source TPM runs on.
    """
    source, expected = await runningSource(host)
    target = await peer.swtpm("dst", running=False)
    spec = f"vtpm:tpm0:ctrl={source.ctrlPath},target-ctrl={target.ctrlPath}"
    migrationId = f"dies-{which}"
    migration = await prepare(hosts, spec, migrationId)
    dying = target if which == "target" else source
    dying.signal("KILL")
    await bounded(dying.whenEnded())

    with pytest.raises(XenmigError) as caught:
        await migration.transfer()

    assert migration.phase == "ABORTED"
    await assertAbortedOnTarget(
        hosts, migrationId, "swtpm is not running there", caught.value
    )
    assert "vtpm device tpm0" in str(caught.value)
    assert dying.ctrlPath in str(caught.value)
    if which == "target":
        await assertUsable(source, expected)
    else:
        await assertNotInitialised(target)
    await settled(reactor)


@pytest.mark.parametrize("mode", ["ctrl", "statedir"])
@pytest_twisted.ensureDeferred
async def test_target_with_another_migration_key(
    hosts: Hosts, host: Host, peer: Host, mode: str
):
    """
    The target has a migration key, but not the source's: the blobs do not
    decrypt there (at the statedir helper's load, or at the commit's SET before
    INIT); the session aborts and the source TPM runs on.
    """
    source, expected = await runningSource(host, "migration-key")
    other = peer.key("another-migration-key")
    targetKey = peer.key("state-key")
    migrationId = f"other-key-{mode}"
    target = None
    if mode == "ctrl":
        target = await peer.swtpm(
            "dst", running=False, key=targetKey, migrationKey=other
        )
        where = f"target-ctrl={target.ctrlPath}"
    else:
        where = f"target-statedir={hosts.b.dest / migrationId},"
        where += f"target-key={targetKey.path},target-migration-key={other.path}"
    spec = f"vtpm:tpm0:{sourceParams(source, 'migration-key')},{where}"
    migration = await prepare(hosts, spec, migrationId)

    with pytest.raises(XenmigError) as caught:
        await migration.transfer()  # both modes find out before the commit

    assert migration.phase == "ABORTED"
    await assertAbortedOnTarget(hosts, migrationId, "--migration-key", caught.value)
    assert not isinstance(caught.value, CommitFailed)
    if target is not None:
        await assertNotInitialised(target)
    else:
        assert not (hosts.b.dest / migrationId).exists()
    await assertUsable(source, expected)
    await settled(reactor)


@pytest.mark.parametrize("missing", ["migration-key", "state-key"])
@pytest_twisted.ensureDeferred
async def test_target_without_the_needed_key(
    hosts: Hosts, host: Host, peer: Host, missing: str
):
    """
    ``xenmig migrate`` to a target that lacks a key the source's state needs: the
    target refuses the device at Prepare, the CLI says why and that the VM may
    resume; no session is opened on the target (``xenmig status`` shows the
    refusal and its reason) and the source TPM runs on.
    """
    keys = "migration-key" if missing == "migration-key" else "key"
    source, expected = await runningSource(host, keys)
    migrationId = f"keyless-{missing}"
    if missing == "migration-key":  # a target swtpm with its own --key only
        target = await peer.swtpm("dst", running=False, key=peer.key("state-key"))
        where = f"target-ctrl={target.ctrlPath}"
        words = "the source swtpm encrypts its state with a migration key"
    else:  # a state directory without target-key
        where = f"target-statedir={hosts.b.dest / migrationId}"
        words = "would store it in plain"
    spec = f"vtpm:tpm0:{sourceParams(source, keys)},{where}"

    result = await xenmig(
        "migrate",
        *hosts.certsA.cliArgs(hosts.b),
        "--domain",
        migrationId,
        "--migration-id",
        migrationId,
        "--device",
        spec,
    )

    assert result.code == 1, result.err
    assert f"{migrationId} aborted: vtpm device tpm0: " in result.err  # named once
    assert words in result.err
    assert "nothing was installed on the target; the VM may be resumed" in result.err
    status = await xenmig(
        "status", migrationId, "--state-dir", str(hosts.b.stateDir), "--json"
    )
    assert status.code == 0, status
    shown = json.loads(status.out)
    assert shown["phase"] == "ABORTED", shown
    assert shown["reason"].startswith("refused at Prepare: ")
    assert words in shown["reason"]
    assert not (hosts.b.dest / migrationId).exists()
    assert source.running
    await assertUsable(source, expected)
