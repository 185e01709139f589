"""
The NBD block-status client against a scripted server on a unix socket: what it
asks, how it walks an export, and the errors it names.  (Against QEMU's own
server it runs in test_qemudirty.)
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from xenmig.clients import nbd
from xenmig.clients.nbd import NBDError, connectBlockStatus
from xenmig.errors import PhaseTimeout

CONTEXT = "qemu:dirty-bitmap:b0"
CONTEXT_ID = 7
SIZE = 10 * 65536


class FakeServer(Protocol):
    """
    A fixed-newstyle NBD server with one export of ``SIZE`` bytes whose block
    status comes from ``extents`` (lists of (length, flags) answered in turn);
    ``mode`` breaks it in one way.
    """

    def __init__(self, extents: list[list[tuple[int, int]]], mode: str) -> None:
        self.extents = list(extents)
        self.mode = mode
        self.buffer = b""
        self.stage = "flags"
        self.asked: list[tuple[int, int]] = []

    def connectionMade(self) -> None:
        if self.mode == "silent":
            return
        # An oldstyle server sends its export's magic where IHAVEOPT belongs.
        option = nbd.IHAVEOPT if self.mode != "oldstyle" else 0x00420281861253
        self.transport.write(b"NBDMAGIC" + struct.pack(">QH", option, 3))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self._step():
            pass

    def _take(self, count: int) -> bytes | None:
        if len(self.buffer) < count:
            return None
        taken, self.buffer = self.buffer[:count], self.buffer[count:]
        return taken

    def _reply(self, option: int, kind: int, data: bytes = b"") -> None:
        header = struct.pack(">QIII", nbd.OPTION_REPLY_MAGIC, option, kind, len(data))
        self.transport.write(header + data)  # type: ignore[union-attr]

    def _step(self) -> bool:
        if self.stage == "flags":
            if self._take(4) is None:
                return False
            self.stage = "options"
            return True
        if self.stage == "options":
            header = self._take(16)
            if header is None:
                return False
            _, option, length = struct.unpack(">QII", header)
            self.buffer = self.buffer[length:]
            if option == nbd.OPT_SET_META_CONTEXT and self.mode != "nocontext":
                body = struct.pack(">I", CONTEXT_ID) + CONTEXT.encode()
                self._reply(option, nbd.REP_META_CONTEXT, body)
            if option == nbd.OPT_GO:
                if self.mode == "refuse":
                    self._reply(option, nbd.REP_FLAG_ERROR | 2, b"no such export")
                    return True
                info = struct.pack(">HQH", nbd.INFO_EXPORT, SIZE, 0)
                self._reply(option, nbd.REP_INFO, info)
                self.stage = "transmission"
            self._reply(option, nbd.REP_ACK)
            return True
        request = self._take(28)
        if request is None:
            return False
        _, _, kind, cookie, offset, length = struct.unpack(">IHHQQI", request)
        if kind == nbd.CMD_DISC:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return False
        self.asked.append((offset, length))
        if self.mode == "hangup":
            self.transport.loseConnection()  # type: ignore[union-attr]
            return False
        extents = self.extents.pop(0) if self.extents else [(0, 0)]
        payload = struct.pack(">I", CONTEXT_ID) + b"".join(
            struct.pack(">II", n, flags) for n, flags in extents
        )
        self.transport.write(  # type: ignore[union-attr]
            struct.pack(
                ">IHHQI",
                nbd.STRUCTURED_REPLY_MAGIC,
                nbd.REPLY_FLAG_DONE,
                nbd.REPLY_TYPE_BLOCK_STATUS,
                cookie,
                len(payload),
            )
            + payload
        )
        return True


async def serve(
    tmp_path: Any, extents: list[list[tuple[int, int]]], mode: str = ""
) -> tuple[str, list[FakeServer], Any]:
    path = str(tmp_path / "nbd.sock")
    servers: list[FakeServer] = []

    def build() -> FakeServer:
        servers.append(FakeServer(extents, mode))
        return servers[-1]

    port = await UNIXServerEndpoint(reactor, path).listen(Factory.forProtocol(build))
    return path, servers, port


async def marked(path: str, timeout: float = 2.0) -> list[tuple[int, int]]:
    client = await connectBlockStatus(reactor, path, "b0", CONTEXT, timeout)
    ranges: list[tuple[int, int]] = []
    try:
        await client.marked(1, lambda a, b: ranges.append((a, b)))
    finally:
        client.close()
    return ranges


@pytest_twisted.ensureDeferred
async def test_walks_the_export_joining_marked_ranges(tmp_path: Any) -> None:
    """Answers that cover the export in parts are asked again from where they
    stopped; adjacent marked extents join; flags other than the one asked for
    do not count."""
    K = 65536
    answers = [
        [(K, 0), (K, 1), (K, 1), (K, 2)],  # the server stops after 4 granules
        [(2 * K, 3), (3 * K, 0), (K, 1)],
    ]
    path, servers, port = await serve(tmp_path, answers)
    try:
        assert await marked(path) == [(K, 3 * K), (4 * K, 6 * K), (9 * K, 10 * K)]
        assert servers[0].asked == [(0, SIZE), (4 * K, SIZE - 4 * K)]
    finally:
        await port.stopListening()


@pytest.mark.parametrize(
    ("mode", "answers", "message"),
    [
        ("oldstyle", [], "not a newstyle NBD server"),
        ("nocontext", [], "no metadata context 'qemu:dirty-bitmap:b0'"),
        ("refuse", [], "refused option 7: no such export"),
        ("hangup", [], "closed the connection mid-answer"),
        ("", [[(0, 1)]], "described nothing at offset 0"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_errors_name_what_went_wrong(
    tmp_path: Any, mode: str, answers: list[list[tuple[int, int]]], message: str
) -> None:
    path, _, port = await serve(tmp_path, answers, mode)
    try:
        with pytest.raises(NBDError, match=message):
            await marked(path)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_silent_server_times_out_naming_the_socket(tmp_path: Any) -> None:
    path, _, port = await serve(tmp_path, [], "silent")
    try:
        with pytest.raises(PhaseTimeout, match="nbd.sock did not answer within 0.2 s"):
            await marked(path, timeout=0.2)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_no_server_is_named(tmp_path: Any) -> None:
    with pytest.raises(NBDError, match="cannot connect to the NBD server at .*none"):
        await marked(str(tmp_path / "none"))
