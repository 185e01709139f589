"""
Small states on the control connection (StreamRecords): the target's side in
memory, then whole migrations through a real daemon and the fault proxy,
counting the connections the daemon was opened.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

sys.path.insert(0, os.path.dirname(__file__))

import test_protocol  # noqa: E402
from daemons import PKI, Daemon, denseFile, migrateFile, settled  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from test_protocol import call, connect, device, openStream  # noqa: E402

from xenmig import amp_commands as commands  # noqa: E402
from xenmig.digest import hashBytes, hashFile  # noqa: E402
from xenmig.errors import MigrationAborted, StreamError  # noqa: E402
from xenmig.limits import INLINE_CHUNK, INLINE_OFFER  # noqa: E402
from xenmig.records import (  # noqa: E402
    encodeData,
    encodeEnd,
    encodeStreamHeader,
)
from xenmig.source.connection import ClientTimeouts  # noqa: E402
from xenmig.source.inlinestream import InlineStream  # noqa: E402
from xenmig.source.resumable import ResumePolicy  # noqa: E402
from xenmig.target.session import Phase  # noqa: E402

STATE = bytes(range(256)) * 300  # 76,800 bytes: two chunks and a bit
#: A small file's size: three pieces and a bit.
SMALL = 3 * INLINE_CHUNK + 1000


#: The in-memory target of L{test_protocol}, and its fixtures.
clock, kind, target = test_protocol.clock, test_protocol.kind, test_protocol.target


def prepare(pump: Any, client: Any) -> dict[str, Any]:
    return test_protocol.prepare(pump, client, devices=[device(size=len(STATE))])


def streamBytes(data: bytes = STATE) -> bytes:
    """What a stream connection carries after StartStream for ``data``."""
    digest = hashBytes(data)
    return b"".join(
        [
            encodeStreamHeader(),
            *encodeData(0, data),
            *encodeEnd(digest.size, digest.algorithm, digest.digest),
        ]
    )


def records(pump: Any, client: Any, offset: int, data: bytes, device: str = "dev"):
    return call(
        pump,
        client,
        commands.StreamRecords,
        migration_id="m1",
        device=device,
        offset=offset,
        data=data,
    )["taken"]


def sendFrom(pump: Any, client: Any, start: int, stream: bytes) -> int:
    """Send ``stream`` from ``start`` on, a piece at a time; what was taken."""
    taken = start
    for offset in range(start, len(stream), INLINE_CHUNK):
        taken = records(pump, client, offset, stream[offset : offset + INLINE_CHUNK])
    return taken


# -- the target, in memory ---------------------------------------------------------


def test_offered_at_prepare_and_taken_in_pieces(target: Any, kind: Any) -> None:
    """
    The target offers small streams at Prepare; a stream sent in pieces cut
    anywhere (mid-header, mid-record), one of them asked twice, reaches the
    device whole, verifies and commits.
    """
    server, client, pump = connect(target)
    answer = prepare(pump, client)
    assert answer["inline"] == INLINE_OFFER
    stream = streamBytes()
    cuts = [0, 7, 40_000, 40_000, len(stream) - 3, len(stream)]
    taken = []
    for start, end in zip(cuts, cuts[1:], strict=False):
        taken.append(records(pump, client, start, stream[start:end]))
        if start == 7:  # the answer lost: the same piece again takes nothing
            assert records(pump, client, start, stream[start:end]) == end
    assert taken == cuts[1:]
    ready = call(pump, client, commands.DeviceReady, migration_id="m1", device="dev")
    assert ready["digest"] == hashBytes(STATE).digest
    call(pump, client, commands.Commit, migration_id="m1")
    assert bytes(kind.targets[0].data) == STATE
    status = call(pump, client, commands.QueryMigration, migration_id="m1")["status"]
    assert status["phase"] == "COMMITTED"
    assert status["devices"][0]["bytes_done"] == len(STATE)


def streamRecords(
    pump: Any, client: Any, offset: int, data: bytes, answers: list[Any] | None = None
) -> list[Any]:
    """One StreamRecords, pumped; its answer (or failure) in ``answers``, once."""
    answers = [] if answers is None else answers
    client.callRemote(
        commands.StreamRecords,
        migration_id="m1",
        device="dev",
        offset=offset,
        data=data,
    ).addBoth(answers.append)
    pump.flush()
    return answers


def test_the_last_piece_brings_the_verification(target: Any, kind: Any) -> None:
    """
    The answer to the piece that holds END carries the device's verified
    digest, as DeviceReady's (asked again, the same): the source needs no
    DeviceReady round trip, and the commit follows.
    """
    server, client, pump = connect(target)
    prepare(pump, client)
    stream = streamBytes()
    last = len(stream) - 100
    for offset in range(0, last, INLINE_CHUNK):
        piece = stream[offset : min(offset + INLINE_CHUNK, last)]
        assert records(pump, client, offset, piece) == offset + len(piece)
    answer = call(
        pump, client, commands.StreamRecords, migration_id="m1", device="dev",
        offset=last, data=stream[last:],
    )  # fmt: skip
    expected = hashBytes(STATE)
    assert answer["taken"] == len(stream)
    assert (answer["size"], answer["algorithm"], answer["digest"]) == (
        expected.size, expected.algorithm, expected.digest,
    )  # fmt: skip
    again = call(
        pump, client, commands.StreamRecords, migration_id="m1", device="dev",
        offset=last, data=stream[last:],
    )  # fmt: skip
    assert again == answer
    call(pump, client, commands.Commit, migration_id="m1")
    assert bytes(kind.targets[0].data) == STATE


def test_a_slow_verification_is_asked_for_as_before(
    clock: Any, target: Any, kind: Any
) -> None:
    """A device that takes longer than a moment to verify: the last piece is
    answered without a digest, and DeviceReady waits for it as always."""
    from twisted.internet.defer import Deferred

    from xenmig.target.inline import VERIFY_WAIT

    server, client, pump = connect(target)
    prepare(pump, client)
    verifying: Deferred[Any] = Deferred()
    kind.targets[0].finish = lambda end: verifying
    stream = streamBytes()
    start = len(stream) - INLINE_CHUNK
    assert sendFrom(pump, client, 0, stream[:start]) == start
    answers = streamRecords(pump, client, start, stream[start:])
    assert answers == []
    clock.advance(VERIFY_WAIT)
    pump.flush()
    assert answers[0]["taken"] == len(stream) and answers[0]["digest"] is None
    ready: list[Any] = []
    client.callRemote(commands.DeviceReady, migration_id="m1", device="dev").addBoth(
        ready.append
    )
    pump.flush()
    assert ready == []
    verifying.callback(hashBytes(STATE))
    pump.flush()
    assert ready[0]["digest"] == hashBytes(STATE).digest


def test_a_mismatch_fails_the_last_piece(target: Any, kind: Any) -> None:
    """State that does not match its END's digest: the last piece's answer
    is the mismatch, naming the device, and the session aborts."""
    from xenmig.errors import DigestMismatch

    server, client, pump = connect(target)
    prepare(pump, client)
    digest = hashBytes(b"other" + STATE[5:])
    stream = b"".join(
        [
            encodeStreamHeader(),
            *encodeData(0, STATE),
            *encodeEnd(digest.size, digest.algorithm, digest.digest),
        ]
    )
    start = len(stream) - INLINE_CHUNK
    assert sendFrom(pump, client, 0, stream[:start]) == start
    answers = streamRecords(pump, client, start, stream[start:])
    assert len(answers) == 1 and answers[0].check(DigestMismatch)
    assert "device dev" in answers[0].getErrorMessage()
    status = call(pump, client, commands.QueryMigration, migration_id="m1")["status"]
    assert status["phase"] == "ABORTED"


def test_a_gap_is_refused_and_nothing_taken(target: Any, kind: Any) -> None:
    """A piece beyond what was taken is refused by name; the stream goes on."""
    server, client, pump = connect(target)
    prepare(pump, client)
    stream = streamBytes()
    assert records(pump, client, 0, stream[:100]) == 100
    with pytest.raises(StreamError, match="at byte 200 came after only 100 bytes"):
        records(pump, client, 200, stream[200:300])
    assert records(pump, client, 100, stream[100:40_000]) == 40_000
    assert records(pump, client, 40_000, stream[40_000:]) == len(stream)
    ready = call(pump, client, commands.DeviceReady, migration_id="m1", device="dev")
    assert ready["size"] == len(STATE)


def test_not_begun_midway(target: Any) -> None:
    """The first piece of a device's state must start at byte 0."""
    server, client, pump = connect(target)
    prepare(pump, client)
    with pytest.raises(StreamError, match="device dev: its state began at byte 16"):
        records(pump, client, 16, b"x" * 16)
    assert target.sessions["m1"].phase is Phase.PREPARED


def test_not_both_a_stream_and_inline(target: Any) -> None:
    """A device whose stream came on a connection of its own takes no pieces."""
    server, client, pump = connect(target)
    prepare(pump, client)
    openStream(target, pump, client)
    with pytest.raises(StreamError, match="its state comes on a stream connection"):
        records(pump, client, 0, streamBytes()[:100])


def test_inline_then_a_stream_is_refused(target: Any) -> None:
    """...and one whose state comes inline gets no stream connection either."""
    server, client, pump = connect(target)
    prepare(pump, client)
    stream = streamBytes()
    records(pump, client, 0, stream[:50])
    with pytest.raises(StreamError, match="device dev already had its stream"):
        openStream(target, pump, client)
    assert sendFrom(pump, client, 50, stream) == len(stream)
    ready = call(pump, client, commands.DeviceReady, migration_id="m1", device="dev")
    assert ready["size"] == len(STATE)


def test_bytes_after_the_end_abort(target: Any) -> None:
    """Anything after the END record aborts the session, naming the device."""
    server, client, pump = connect(target)
    prepare(pump, client)
    stream = streamBytes()
    records(pump, client, 0, stream[:40_000])
    with pytest.raises(StreamError, match="device dev: data after the END record"):
        records(pump, client, 40_000, stream[40_000:] + stream[-64:])
    with pytest.raises(MigrationAborted, match="device dev: data after the END record"):
        records(pump, client, len(stream), b"more")


def test_garbage_aborts_naming_the_device(target: Any) -> None:
    """Bytes that are no record abort the session; the error names the device."""
    server, client, pump = connect(target)
    prepare(pump, client)
    with pytest.raises(StreamError, match=r"device dev: .* exceeds the limit"):
        records(pump, client, 0, encodeStreamHeader() + b"\xff" * 64)
    session = target.sessions["m1"]
    assert session.phase is Phase.ABORTED
    assert "device dev" in session.reason


# -- whole migrations through a daemon -----------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


#: Time-outs for a loaded machine, the same for every client here.
TIMEOUTS = ClientTimeouts(connect=5.0, call=10.0, commit=10.0)


@pytest.mark.parametrize(
    ("size", "inline", "connections"),
    [
        (SMALL, True, 1),
        (SMALL, False, 2),
        (INLINE_OFFER + 1, True, 2),
    ],
    ids=["small", "small-not-inline", "over-the-offer"],
)
@pytest_twisted.ensureDeferred
async def test_connections_a_migration_opens(
    daemons: Callable[..., Daemon],
    proxies: Callable[[Daemon], FaultProxy],
    tmp_path: Path,
    size: int,
    inline: bool,
    connections: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    A file migration through a daemon commits the same bytes either way: a
    small device's state on the control connection (one connection in all,
    unless the client says no, and no DeviceReady: its last piece's answer
    brought the verification), a larger one on a stream of its own.
    """
    from xenmig.source import migration as sourcemigration

    asked: list[str] = []

    def deviceReady(migration: Any, run: Any) -> Any:
        asked.append(run.name)
        return original(migration, run)

    original = sourcemigration.deviceReady
    monkeypatch.setattr(sourcemigration, "deviceReady", deviceReady)
    daemon = await daemons().launch(reactor)
    proxy = proxies(daemon)
    image = denseFile(tmp_path / "vm.state", size)
    destination = daemon.dest / "vm.state"
    client = daemon.client(reactor, port=proxy.port, timeouts=TIMEOUTS, inline=inline)
    migration = await migrateFile(client, image, destination)

    assert hashFile(str(destination)) == hashFile(str(image))
    sender = migration.devices["blob"].sender
    assert isinstance(sender, InlineStream) is (connections == 1)
    assert asked == ([] if connections == 1 else ["blob"])
    stats = await deferToThread(proxy.stats)
    assert stats["connections"] == connections
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_control_connection_cut_mid_state(
    daemons: Callable[..., Daemon],
    proxies: Callable[[Daemon], FaultProxy],
    tmp_path: Path,
) -> None:
    """
    A resumable migration whose control connection is reset while a small
    device's state is on it: the connection is re-established, the pieces
    the target did not take are sent again, none twice, and it commits.
    """
    daemon = await daemons("--reconnect-grace", "10").launch(reactor)
    proxy = proxies(daemon)
    image = denseFile(tmp_path / "vm.state", INLINE_OFFER)
    destination = daemon.dest / "vm.state"
    # Each connection is reset once 100 KiB went up it: the state (four and a
    # bit pieces) needs three connections.
    await deferToThread(proxy.call, op="set", reset_after=100 * 1024, directions=["up"])
    policy = ResumePolicy(seconds=20, initial=0.05, maximum=0.2)
    client = daemon.client(
        reactor, port=proxy.port, timeouts=TIMEOUTS, resume=True, resumePolicy=policy
    )
    migration = await migrateFile(client, image, destination)

    assert hashFile(str(destination)) == hashFile(str(image))
    assert isinstance(migration.devices["blob"].sender, InlineStream)
    stats = await deferToThread(proxy.stats)
    assert stats["resets"] >= 2
    assert migration.report()["reconnections"]["control"] >= 2
    await settled(reactor)


def test_the_daemons_bandwidth_paces_pieces(
    tmp_path: Any, clock: Any, kind: Any
) -> None:
    """
    With the daemon's --max-bandwidth, a piece beyond what the bucket holds is
    answered only once the bandwidth allows it: small states share the limit
    with the streams.
    """
    from twisted.python.filepath import FilePath

    from xenmig.target.config import TargetConfig
    from xenmig.target.core import MigrationTarget

    config = TargetConfig(FilePath(str(tmp_path)), maxBandwidth=64 * 1024)
    limited = MigrationTarget(clock, config, {"memory": kind}, test_protocol.syncRunner)
    server, client, pump = connect(limited)
    prepare(pump, client)
    stream = streamBytes()
    answers: list[Any] = []
    for start in range(0, len(stream), INLINE_CHUNK):
        piece = stream[start : start + INLINE_CHUNK]
        streamRecords(pump, client, start, piece, answers)
    assert len(answers) == 1  # the first piece was within the burst
    waited = 0.0
    while len(answers) < 2 and waited < 5:
        clock.advance(0.1)
        pump.flush()
        waited += 0.1
    assert answers[-1]["taken"] == len(stream)
    assert answers[-1]["digest"] == hashBytes(STATE).digest
    # 64 KiB/s with 64 KiB of burst: the 16 KiB past it wait about a quarter second
    assert 0.1 <= waited <= 1.0, waited
