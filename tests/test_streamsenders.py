"""Both stream senders: backpressure, and one way of losing the stream."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure

from xenmig import tls
from xenmig.cli import pki
from xenmig.digest import hashBytes
from xenmig.errors import StreamError, StreamLost
from xenmig.records import encodeData, encodeKeepalive
from xenmig.source.streamchannel import RECORD, StreamChannel, setSocketTimeout
from xenmig.source.streamsender import StreamSender
from xenmig.source.streamtls import StreamTLS
from xenmig.source.threadedstream import StreamEndpoint, ThreadedStreamSender

MiB = 1024 * 1024


def outcome(d: Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    d.addBoth(results.append)
    return results


# -- StreamSender (Twisted's transport) ------------------------------------------------


def test_streamSenderLosesTheStream() -> None:
    """A lost connection fails the waiting writer and every later write."""
    sender = StreamSender("blob")
    sender.makeConnection(StringTransport())
    sender.pauseProducing()
    waiting = outcome(sender.writeData(0, b"x" * 10))
    assert waiting == []
    sender.connectionLost(Failure(ConnectionLost("reset by peer")))
    [failure] = waiting
    assert failure.check(StreamLost)
    assert "the stream of device blob was lost after 10 bytes" in str(failure.value)
    [later] = outcome(sender.writeZero(10, 5))
    assert later.value is failure.value


def test_streamSenderClosedAfterFinish() -> None:
    """Once finished, a clean close is no loss and writes say the stream is closed."""
    sender = StreamSender("blob")
    transport = StringTransport()
    sender.makeConnection(transport)
    sender.finish(hashBytes(b""))
    sender.connectionLost(Failure(ConnectionLost()))
    [failure] = outcome(sender.writeData(0, b"x"))
    assert failure.check(StreamError) and not failure.check(StreamLost)


# -- ThreadedStreamSender (TLS in a thread; plaintext here) ---------------------------


class StreamServer:
    """A loopback server that answers StartStream, then reads or resets."""

    def __init__(self, read: bool) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.reset = threading.Event()
        self._read = read
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            request = b""
            while not request.endswith(b"\x00\x00"):  # the box's end
                request += connection.recv(1)
            connection.sendall(amp.AmpBox(_answer=b"1").serialize())
            if not self._read:
                self.reset.wait(10)
                linger = struct.pack("ii", 1, 0)  # close with a reset
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                return
            while data := connection.recv(MiB):
                self.received += len(data)

    def endpoint(self) -> StreamEndpoint:
        return StreamEndpoint("127.0.0.1", self.port, None, "127.0.0.1", 10.0)

    def close(self) -> None:
        self.reset.set()
        self._thread.join(10)
        self.listener.close()


@pytest.fixture
def servers() -> Iterator[list[StreamServer]]:
    made: list[StreamServer] = []
    yield made
    for server in made:
        server.close()


@pytest_twisted.ensureDeferred
async def test_threadedSenderWaitsForItsThread(servers: list[StreamServer]) -> None:
    """Above the high mark a writer waits until the thread has sent the queue."""
    server = StreamServer(read=True)
    servers.append(server)
    sender = ThreadedStreamSender(reactor, "disk", highWater=MiB, lowWater=0)
    await sender.open(server.endpoint(), b"token")
    for offset in range(0, 8 * MiB, MiB):
        await sender.writeData(offset, bytes(MiB))
    await sender.finish(hashBytes(bytes(8 * MiB)))
    server.close()
    assert server.received > 8 * MiB and sender.dataBytes == 8 * MiB


@pytest_twisted.ensureDeferred
async def test_threadedSenderLosesTheStream(servers: list[StreamServer]) -> None:
    """A reset connection fails the waiting writer and every later write."""
    server = StreamServer(read=False)
    servers.append(server)
    sender = ThreadedStreamSender(reactor, "disk", highWater=MiB, lowWater=0)
    await sender.open(server.endpoint(), b"token")
    chunk = bytes(MiB)
    # Far more than the socket's buffers hold: the last writers have to wait.
    writes = [sender.writeData(offset, chunk) for offset in range(0, 64 * MiB, MiB)]
    assert not writes[-1].called
    server.reset.set()
    outcomes = await DeferredList(writes, consumeErrors=True)
    lost = [result for ok, result in outcomes if not ok]
    assert lost and not outcomes[-1][0]
    for failure in lost:
        assert failure.check(StreamLost)
        assert "the stream of device disk was lost after" in str(failure.value)
    with pytest.raises(StreamLost):
        await sender.writeData(64 * MiB, b"x")
    sender.abort()  # as a failed migration does: nobody waits for the close now


# -- how a threaded stream cuts what it sends ------------------------------------------


class RecordingChannel(StreamChannel):
    """A channel whose writes are recorded instead of sent."""

    def __init__(self) -> None:
        super().__init__(socket.socket())
        self.sock.close()
        self.writes: list[bytes] = []

    def _write(self, data: bytes | memoryview) -> None:
        self.writes.append(bytes(data))

    def _cork(self, on: bool) -> None:
        self.corked = on


def test_channelSendsWholeTLSRecords() -> None:
    """Records go out in writes of whole TLS records; the bytes are unchanged."""
    channel = RecordingChannel()
    sent: list[bytes] = []
    for size in (MiB, 5, 3 * RECORD + 7, 100):
        parts = encodeData(0, bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        sent += parts
        channel.send(parts, flush=False)
    assert all(len(w) % RECORD == 0 for w in channel.writes)
    assert channel.corked  # the kernel holds partial segments meanwhile
    channel.send([], flush=True)
    assert not channel.corked
    assert b"".join(channel.writes) == b"".join(sent)
    assert all(len(w) % RECORD == 0 for w in channel.writes[:-1])
    # A flushed send leaves nothing behind: the KEEPALIVE goes out at once.
    channel.send(encodeKeepalive())
    assert channel.writes[-1] == b"".join(encodeKeepalive())


# -- the TLS of threaded streams, on memory BIOs ---------------------------------------


@pytest.fixture(scope="module")
def streamTLS(tmp_path_factory: pytest.TempPathFactory) -> StreamTLS:
    ca = tmp_path_factory.mktemp("pki")
    pki.initCA(ca)
    pki.issueHost(ca, "target.test", ["127.0.0.1"])
    pki.issueHost(ca, "source.test")
    identity = tls.loadIdentity(ca / "source.test.pem", ca / "source.test.key")
    return StreamTLS(identity, tls.loadAuthority(ca / "ca.pem"))


@pytest.mark.parametrize(
    ("peer", "error", "message"),
    [
        ("silent", TimeoutError, "the TLS handshake timed out"),
        ("closes", StreamError, "the target closed the stream connection"),
    ],
)
def test_threadedHandshakeSaysWhyItEnded(
    streamTLS: StreamTLS, peer: str, error: type[Exception], message: str
) -> None:
    """A target that never answers the handshake, or hangs up, is named as such."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        connection, _ = listener.accept()
        accepted.append(connection)
        if peer == "closes":
            connection.recv(65536)  # the ClientHello
            connection.close()

    server = threading.Thread(target=serve)
    server.start()
    try:
        with socket.create_connection(listener.getsockname(), 10) as sock:
            sock.settimeout(None)
            setSocketTimeout(sock, 0.3)  # as StreamEndpoint.connect bounds it
            with pytest.raises(error, match=message):
                streamTLS.handshake(sock, "127.0.0.1")
    finally:
        server.join()
        for connection in accepted:
            connection.close()
        listener.close()
