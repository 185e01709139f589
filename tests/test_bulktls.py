"""The daemon's bulk reading of a stream's TLS: bytes, chunks, and a damaged record."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from xenmig import tls
from xenmig.cli import pki
from xenmig.fs import directlyWritable
from xenmig.records import (
    DataRecord,
    Record,
    RecordParser,
    encodeRecord,
    encodeStreamHeader,
)
from xenmig.streamreceiver import BulkTLSReader, alignedBlock

MiB = 1024 * 1024


class Collector(Protocol):
    """A stream's receiving end that reads through a L{BulkTLSReader}."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        BulkTLSReader(self.transport).install()  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.lost = reason


@pytest.fixture
def connected(tmp_path: Path) -> tuple[Any, Any, Collector]:
    """A client and a server TLS protocol, handshake done, over StringTransports."""
    client, server, collector = connect(tmp_path, Collector())
    client.write(b"ping")
    shuttle(client, server)
    assert collector.chunks == [b"ping"], "the handshake did not complete"
    collector.chunks.clear()
    return client, server, collector


def connect(tmp_path: Path, collector: Collector) -> tuple[Any, Any, Collector]:
    """``collector`` as the server's protocol, the handshake done."""
    ca = tmp_path / "pki"
    pki.initCA(ca)
    pki.issueHost(ca, "target.test", ["127.0.0.1"])
    pki.issueHost(ca, "source.test")
    authorities = tls.loadAuthority(ca / "ca.pem")

    def identity(name: str) -> Any:
        return tls.loadIdentity(ca / f"{name}.pem", ca / f"{name}.key")

    clock = Clock()  # Twisted's TLS sends small writes at the next iteration
    server = TLSMemoryBIOFactory(
        tls.serverOptions(identity("target.test"), authorities),
        False,
        Factory.forProtocol(lambda: collector),
        clock,
    ).buildProtocol(None)
    client = TLSMemoryBIOFactory(
        tls.clientOptions("127.0.0.1", identity("source.test"), authorities),
        True,
        ClientFactory.forProtocol(Protocol),
        clock,
    ).buildProtocol(None)
    client.clock = clock
    server.makeConnection(StringTransport())
    client.makeConnection(StringTransport())
    for _ in range(10):
        shuttle(client, server)
        shuttle(server, client)
    return client, server, collector


def shuttle(sender: Any, receiver: Any, damage: int | None = None) -> None:
    """Hand what ``sender`` wrote to ``receiver`` (with one byte flipped)."""
    if hasattr(sender, "clock"):
        sender.clock.advance(0)
    data = bytearray(sender.transport.value())
    sender.transport.clear()
    if damage is not None:
        data[damage] ^= 0x01
    if data:
        receiver.dataReceived(bytes(data))


def test_bulkReaderDeliversEveryByteInLargeChunks(
    connected: tuple[Any, Any, Collector],
) -> None:
    """Records arriving together reach the protocol whole, in few large chunks."""
    client, server, collector = connected
    data = os.urandom(3 * MiB + 12345)
    client.write(data)
    shuttle(client, server)
    assert b"".join(collector.chunks) == data
    # 16 KiB records read into buffers of up to 256 KiB, not a string per record.
    assert len(collector.chunks) <= 14
    assert collector.lost is None


def test_bulkReaderReportsADamagedRecord(
    connected: tuple[Any, Any, Collector],
) -> None:
    """A record altered in transit ends the connection with OpenSSL's reason."""
    client, server, collector = connected
    data = os.urandom(MiB)
    client.write(data)
    shuttle(client, server, damage=40000)  # inside the third record
    # What came before the damaged record is delivered, nothing of it or after.
    assert b"".join(collector.chunks) == data[:32768]
    server.transport.loseConnection()  # as the reactor would, once it is closed
    server.connectionLost(Failure(Exception("closed")))
    assert collector.lost is not None
    assert collector.lost.check(SSL.Error), collector.lost
    assert "decrypt" in tls.describeTLSError(collector.lost.value).lower() or (
        "bad record mac" in tls.describeTLSError(collector.lost.value).lower()
    )


class BlockCollector(Collector):
    """A receiving end whose parser assembles large DATA records in blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.parser = RecordParser(allocate=alignedBlock)
        self.records: list[Record] = []
        self.straight = 0  # bytes read straight into blocks

    def connectionMade(self) -> None:
        BulkTLSReader(self.transport, self).install()  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        self.records.extend(self.parser.feed(data))

    def blockSpace(self) -> memoryview | None:
        return self.parser.blockSpace()

    def blockFilled(self, count: int) -> None:
        self.straight += count
        self.records.extend(self.parser.blockFilled(count))


def test_bulkReaderReadsLargeRecordsStraightIntoBlocks(tmp_path: Path) -> None:
    """
    The rest of a large DATA record is read straight into its block: the
    records come out whole, and nearly none of their bytes pass through a
    buffer of the reader's.
    """
    collector = BlockCollector()
    client, server, _ = connect(tmp_path, collector)
    records = [DataRecord(i * MiB, os.urandom(MiB)) for i in range(4)]
    stream = encodeStreamHeader() + b"".join(
        b"".join(encodeRecord(record)) for record in records
    )
    for start in range(0, len(stream), 300000):  # several socket reads per record
        client.write(stream[start : start + 300000])
        shuttle(client, server)
    assert collector.records == records
    # All but the start of the first record, read with the stream's header.
    assert collector.straight > 4 * MiB - 300000
    assert all(
        directlyWritable(record.data, record.offset)  # type: ignore[attr-defined]
        for record in collector.records
    )
