"""Tests of the swtpm control-channel client and of the swtpm runner."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from xenmig.clients.swtpm import (
    BLOB_PERMANENT,
    BLOB_SAVESTATE,
    BLOB_VOLATILE,
    CMD_GET_CAPABILITY,
    CMD_GET_CONFIG,
    CMD_GET_STATEBLOB,
    CMD_INIT,
    TPM_BAD_ORDINAL,
    TPM_RETRY,
    AnswerParser,
    StateBlob,
    SwtpmBusy,
    SwtpmCommandFailed,
    SwtpmNotInstalled,
    SwtpmNotRunning,
    SwtpmStartFailed,
    SwtpmUnavailable,
)
from xenmig.clients.swtpmcontrol import ControlExchange, SwtpmControl
from xenmig.clients.swtpmprocess import (
    TPM2_STARTUP_CLEAR,
    TPM_RC_INITIALIZE,
    KeyOption,
    SwtpmProcess,
    responseCode,
    swtpmFeatures,
    tpmCommand,
)
from xenmig.errors import DeviceError
from xenmig.testing import requirePrograms

PCR_VALUE = "01" * 32


# -- helpers -------------------------------------------------------------------------


def resultOf(d: Deferred) -> Any:
    """The result a Deferred has already fired with."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failureOf(d: Deferred, *types: type[BaseException]) -> Failure:
    """The Failure a Deferred has already failed with, of one of ``types``."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    assert isinstance(results[0], Failure), f"expected a failure, got {results[0]!r}"
    assert results[0].check(*types), results[0].getTraceback()
    return results[0]


async def tpm2(process: SwtpmProcess, tool: str, *args: str) -> str:
    """Run one tpm2-tools program against ``process``; its standard output."""
    env = dict(os.environ, TPM2TOOLS_TCTI=f"swtpm:path={process.serverPath}")
    out, err, code = await getProcessOutputAndValue(
        tool, args, env=env, reactor=reactor
    )
    assert code == 0, f"{tool} {' '.join(args)} exited {code}: {err.decode()}"
    return out.decode()


@pytest.fixture
def workdir():
    """A short private directory (unix socket paths are limited to 108 bytes)."""
    path = tempfile.mkdtemp(prefix="xm-swtpm-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def swtpms(workdir):
    """Start swtpms in ``workdir``; every one is stopped at the end of the test."""
    started: list[SwtpmProcess] = []

    async def start(name: str, running: bool = True, **kwargs: Any) -> SwtpmProcess:
        requirePrograms("swtpm", "tpm2_startup")
        state = os.path.join(workdir, name)
        os.mkdir(state)
        process = SwtpmProcess(reactor, state, **kwargs)
        started.append(process)
        await process.start()
        if running:
            await process.control.init()
            await tpm2(process, "tpm2_startup", "-c")
        return process

    yield start
    for process in started:
        await process.stop()
        assert not process.running


# -- parsing, without any transport --------------------------------------------------


def getAnswer(data: bytes, total: int | None = None, flags: int = 0) -> bytes:
    total = len(data) if total is None else total
    return struct.pack(">IIII", 0, flags, total, len(data)) + data


def test_blobAnswerParsedByteByByte():
    """A GET_STATEBLOB answer fed one byte at a time completes at its last byte."""
    request = struct.pack(">IIIII", CMD_GET_STATEBLOB, 1, BLOB_PERMANENT, 0, 0)
    answered: Deferred = Deferred()
    exchange = ControlExchange(request, AnswerParser(CMD_GET_STATEBLOB), answered)
    transport = StringTransport()
    exchange.makeConnection(transport)
    assert transport.value() == request
    answer = getAnswer(b"state-bytes", flags=2)
    for i in range(len(answer)):
        assert not answered.called
        exchange.dataReceived(answer[i : i + 1])
    result = resultOf(answered)
    assert (result.result, result.flags, result.total) == (0, 2, 11)
    assert result.data == b"state-bytes"
    assert transport.disconnecting


def test_shortErrorAnswer():
    """A failing GET_STATEBLOB answers only its 4-byte result, and that completes."""
    parser = AnswerParser(CMD_GET_STATEBLOB)
    assert parser.feed(b"\x00\x00") is None
    answer = parser.feed(b"\x00\x0a")
    assert answer is not None and answer.result == TPM_BAD_ORDINAL


def test_missingBlobAnswer():
    """GET_STATEBLOB's "no such blob" answer carries a full, empty header."""
    parser = AnswerParser(CMD_GET_STATEBLOB)
    assert parser.feed(struct.pack(">I", TPM_RETRY)) is None
    answer = parser.feed(bytes(12))
    assert answer is not None and (answer.result, answer.data) == (TPM_RETRY, b"")


def test_fixedAnswers():
    """GET_CAPABILITY answers 8 bytes of bits, GET_CONFIG a result and flags."""
    caps = AnswerParser(CMD_GET_CAPABILITY)
    assert caps.feed(bytes(7)) is None
    assert caps.feed(b"\xff").value == 0xFF  # type: ignore[union-attr]
    config = AnswerParser(CMD_GET_CONFIG)
    assert config.feed(struct.pack(">II", 0, 3)).flags == 3  # type: ignore[union-attr]
    init = AnswerParser(CMD_INIT)
    assert init.feed(struct.pack(">I", 0x101)).result == 0x101  # type: ignore


# -- the client, on a memory reactor and an injected clock ---------------------------


def connectNext(clock: MemoryReactorClock) -> tuple[Any, StringTransport]:
    """Complete the oldest pending unix connection; its protocol and transport."""
    address, factory, _, _ = clock.unixClients.pop(0)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_blobReadByOffset():
    """A blob larger than one answer is read on by offset over new connections."""
    clock = MemoryReactorClock()
    control = SwtpmControl(clock, "/run/vm1/tpm.sock.ctrl", timeout=5)
    d = control.getStateBlob(BLOB_VOLATILE)
    protocol, transport = connectNext(clock)
    assert transport.value() == struct.pack(">IIII", CMD_GET_STATEBLOB, 1, 2, 0)
    protocol.dataReceived(getAnswer(b"0123456", total=10))
    protocol.connectionLost(Failure(Exception("closed")))
    protocol, transport = connectNext(clock)
    assert transport.value() == struct.pack(">IIII", CMD_GET_STATEBLOB, 1, 2, 7)
    protocol.dataReceived(getAnswer(b"789", total=3))
    assert resultOf(d) == StateBlob(BLOB_VOLATILE, 0, b"0123456789")
    assert not clock.getDelayedCalls()


def test_timeoutNamesSocket():
    """An operation whose answer never comes fails as busy after the timeout."""
    clock = MemoryReactorClock()
    control = SwtpmControl(clock, "/run/vm1/tpm.sock.ctrl", timeout=2)
    d = control.getConfig()
    _, transport = connectNext(clock)
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.1)
    failure = failureOf(d, SwtpmBusy)
    assert "/run/vm1/tpm.sock.ctrl" in str(failure.value)
    assert "GET_CONFIG" in str(failure.value)
    assert "one control client at a time" in str(failure.value)
    assert transport.disconnected
    assert not clock.getDelayedCalls()


def test_timeoutWhileConnecting():
    """An operation still connecting at the deadline fails as busy."""
    clock = MemoryReactorClock()
    control = SwtpmControl(clock, "/run/vm1/tpm.sock.ctrl", timeout=1)
    d = control.stop()
    clock.advance(1)
    failureOf(d, SwtpmBusy)
    assert not clock.getDelayedCalls()


def test_answerCancelsTimer():
    """An answer in time leaves no timer behind."""
    clock = MemoryReactorClock()
    control = SwtpmControl(clock, "/run/vm1/tpm.sock.ctrl", timeout=2)
    d = control.init(1)
    protocol, transport = connectNext(clock)
    assert transport.value() == struct.pack(">II", CMD_INIT, 1)
    protocol.dataReceived(bytes(4))
    assert resultOf(d) is None
    assert not clock.getDelayedCalls()


def test_notRunningAnswer():
    """GET_STATEBLOB answered 0x0a means the TPM is not running, said plainly."""
    clock = MemoryReactorClock()
    control = SwtpmControl(clock, "/run/vm1/tpm.sock.ctrl")
    d = control.getStateBlob(BLOB_PERMANENT)
    protocol, _ = connectNext(clock)
    protocol.dataReceived(struct.pack(">I", TPM_BAD_ORDINAL))
    failure = failureOf(d, SwtpmNotRunning)
    assert "not running" in str(failure.value)
    assert isinstance(failure.value, DeviceError)


def test_missingBlobIsEmpty():
    """A missing blob (TPM_RETRY) is returned as an empty blob."""
    clock = MemoryReactorClock()
    control = SwtpmControl(clock, "/run/vm1/tpm.sock.ctrl")
    d = control.getStateBlob(BLOB_SAVESTATE)
    protocol, _ = connectNext(clock)
    protocol.dataReceived(struct.pack(">IIII", TPM_RETRY, 0, 0, 0))
    assert resultOf(d) == StateBlob(BLOB_SAVESTATE, 0, b"")


@pytest_twisted.ensureDeferred
async def test_refusedNamesSocket(workdir):
    """A control socket nobody listens on gives an error naming it."""
    path = os.path.join(workdir, "nothing.ctrl")
    with pytest.raises(SwtpmUnavailable) as caught:
        await SwtpmControl(reactor, path, timeout=2).getConfig()
    assert path in str(caught.value)
    assert "not running" in str(caught.value)


# -- with a real swtpm ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_featuresOfInstalledSwtpm():
    """The installed swtpm is recent enough and its features are found."""
    requirePrograms("swtpm")
    features = await swtpmFeatures(reactor)
    assert features.version >= (0, 6, 0)
    assert "tpm-2.0" in features.capabilities
    assert features.migrationKey


@pytest_twisted.ensureDeferred
async def test_missingSwtpmExecutable():
    """A missing swtpm executable is reported as not installed, with what to do."""
    with pytest.raises(SwtpmNotInstalled) as caught:
        await swtpmFeatures(reactor, "swtpm-does-not-exist")
    assert "apt-get install swtpm" in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_getBlobsFromRunningTPM(swtpms):
    """The three blobs come out of a running TPM: permanent, volatile, savestate."""
    source = await swtpms("source")
    blobs = await source.control.getStateBlobs()
    assert [b.name for b in blobs] == ["permanent", "volatile", "savestate"]
    assert len(blobs[0].data) > 500 and len(blobs[1].data) > 500
    assert blobs[2].data == b""
    assert all(b.flags == 0 for b in blobs)


@pytest_twisted.ensureDeferred
async def test_getDoesNotChangeState(swtpms):
    """GET leaves the TPM as it was: same blobs again, and it still answers."""
    source = await swtpms("source")
    await tpm2(source, "tpm2_pcrextend", f"16:sha256={PCR_VALUE}")
    before = await tpm2(source, "tpm2_pcrread", "sha256:16,23")
    first = await source.control.getStateBlobs()
    second = await source.control.getStateBlobs()
    assert first[0] == second[0]  # the volatile blob carries the TPM's clock
    assert await tpm2(source, "tpm2_pcrread", "sha256:16,23") == before
    startup = await tpmCommand(reactor, source.serverPath, TPM2_STARTUP_CLEAR)
    assert responseCode(startup) == TPM_RC_INITIALIZE
    await tpm2(source, "tpm2_pcrextend", f"16:sha256={PCR_VALUE}")
    assert await tpm2(source, "tpm2_pcrread", "sha256:16,23") != before


@pytest_twisted.ensureDeferred
async def test_roundTripIntoFreshSwtpm(swtpms):
    """Blobs set into a fresh swtpm make it resume: PCRs kept, no Startup needed."""
    source = await swtpms("source")
    await tpm2(source, "tpm2_pcrextend", f"16:sha256={PCR_VALUE}")
    expected = await tpm2(source, "tpm2_pcrread", "sha256:16")
    blobs = await source.control.getStateBlobs()
    target = await swtpms("target", running=False)
    await target.control.loadStateBlobs(blobs)
    assert await tpm2(target, "tpm2_pcrread", "sha256:16") == expected
    startup = await tpmCommand(reactor, target.serverPath, TPM2_STARTUP_CLEAR)
    assert responseCode(startup) == TPM_RC_INITIALIZE


@pytest_twisted.ensureDeferred
async def test_getBeforeInit(swtpms):
    """GET on a swtpm that was never initialised says the TPM is not running."""
    fresh = await swtpms("fresh", running=False)
    with pytest.raises(SwtpmNotRunning) as caught:
        await fresh.control.getStateBlob(BLOB_PERMANENT)
    assert fresh.ctrlPath in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_busyControlSocket(swtpms):
    """A control socket held by another client gives the busy error, then recovers."""
    source = await swtpms("source")
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(source.ctrlPath)
    try:
        holder.sendall(struct.pack(">I", CMD_GET_CAPABILITY))
        assert len(holder.recv(8)) == 8  # the holder is being served
        control = SwtpmControl(reactor, source.ctrlPath, timeout=0.5)
        with pytest.raises(SwtpmBusy) as caught:
            await control.getConfig()
        assert source.ctrlPath in str(caught.value)
        assert "close the other client" in str(caught.value)
    finally:
        holder.close()
    assert await source.control.getConfig() == 0


@pytest_twisted.ensureDeferred
async def test_startFailureReportsOutput(swtpms, workdir):
    """A swtpm that cannot start (missing key file) fails with its own message."""
    key = KeyOption(os.path.join(workdir, "no-such-key"))
    with pytest.raises(SwtpmStartFailed) as caught:
        await swtpms("badkey", running=False, key=key)
    assert "exited during start-up" in str(caught.value)
    assert "no-such-key" in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_stopKillsAfterGrace(workdir):
    """stop() sends SIGKILL when SIGTERM is ignored past the grace period."""
    script = os.path.join(workdir, "stubborn")
    with open(script, "w") as f:
        f.write("#!/bin/sh\ntrap '' TERM\necho ready\nexec sleep 30\n")
    os.chmod(script, 0o755)
    process = SwtpmProcess(reactor, workdir, executable=script, stopGrace=0.3)
    process.spawn()
    while "ready" not in process.output:
        await deferLater(reactor, 0.01)
    assert process.running
    await process.stop()
    assert not process.running
    assert process.ended is not None and process.ended.value.signal == 9


@pytest_twisted.ensureDeferred
async def test_shutdownEndsProcess(swtpms):
    """shutdown() through the control channel makes swtpm exit."""
    source = await swtpms("source")
    await source.shutdown()
    assert not source.running
    assert not os.path.exists(source.ctrlPath)


def test_tcpControlAddress():
    """A ``tcp:HOST:PORT`` control address is spoken to over TCP."""
    clock = MemoryReactorClock()
    d = SwtpmControl(clock, "tcp:127.0.0.1:2322").getCapability()
    host, port, factory, _, _ = clock.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 2322)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(struct.pack(">Q", 0x7FFF))
    assert resultOf(d) == 0x7FFF
    with pytest.raises(ValueError):
        SwtpmControl(clock, "tcp:nohost")


class CountingEndpoint:
    """An endpoint that counts the connections made through it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.connections = 0

    def connect(self, factory: Any) -> Deferred:
        self.connections += 1
        return self.inner.connect(factory)


@pytest_twisted.ensureDeferred
async def test_anOperationTakesOneConnection(swtpms):
    """All blobs out, and STOP, SET and INIT in: one control connection each."""
    source = await swtpms("source")
    await tpm2(source, "tpm2_pcrextend", f"16:sha256={PCR_VALUE}")
    expected = await tpm2(source, "tpm2_pcrread", "sha256:16")
    target = await swtpms("target", running=False)
    counted = [CountingEndpoint(s.control._endpoint) for s in (source, target)]
    source.control._endpoint, target.control._endpoint = counted
    blobs = await source.control.getStateBlobs()
    async with target.control.session() as session:
        assert await session.getCapability() and await session.getConfig() == 0
        with pytest.raises(SwtpmNotRunning):
            await session.getEstablished()  # an error answer keeps the connection
        await session.loadStateBlobs(blobs)
    assert [c.connections for c in counted] == [1, 1]
    assert await tpm2(target, "tpm2_pcrread", "sha256:16") == expected
    startup = await tpmCommand(reactor, target.serverPath, TPM2_STARTUP_CLEAR)
    assert responseCode(startup) == TPM_RC_INITIALIZE


@pytest_twisted.ensureDeferred
async def test_aFailedSetDropsTheSessionsConnection(swtpms):
    """
    A SET refused by a running TPM (its body unread) ends the connection; the
    session's next command opens a new one, and the TPM is as it was.
    """
    source = await swtpms("source")
    before = await tpm2(source, "tpm2_pcrread", "sha256:16,23")
    blobs = await source.control.getStateBlobs()
    counting = CountingEndpoint(source.control._endpoint)
    source.control._endpoint = counting
    async with source.control.session() as session:
        with pytest.raises(SwtpmCommandFailed, match="the TPM is running"):
            await session.setStateBlob(blobs[0])
        assert (await session.getStateBlob(BLOB_PERMANENT)).data == blobs[0].data
    assert counting.connections == 2
    assert await tpm2(source, "tpm2_pcrread", "sha256:16,23") == before
