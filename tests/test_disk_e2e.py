"""
The disk kind end to end: ``xenmig migrate --live`` into a real ``twistd xenmig``
daemon over mutual TLS, with a "guest" process writing to the source image.

The pause command stops the writer (SIGSTOP, then waits until the kernel says it
is stopped) and records the image's digest at that moment; the target image must
equal it.  With ``qmp=`` the writer is a QEMU, whose dirty bitmap the rounds
follow.  Failures: the client killed mid pre-copy, the connection cut in the
final round (after the pause: the resume command must run), and a target
filesystem (a small tmpfs) that fills up.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from daemons import (
    CLIENT,
    PKI,
    Daemon,
    MiB,
    denseFile,
    eventually,
    settled,
    sparseFile,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater

from xenmig.demo import testguest
from xenmig.devices.disk import leaves
from xenmig.digest import hashFile
from xenmig.testing import requirePrograms

CI = os.environ.get("CI", "").lower() == "true"

#: The "guest": rewrites 4 or 64 KiB at random places of the image, ~300 times a
#: second, until stopped; touches READY after its first write.
WRITER = """
import os, random, sys, time
path, ready = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY)
size = os.fstat(fd).st_size
rng = random.Random()
writes = 0
while True:
    length = rng.choice((4096, 65536))
    os.pwrite(fd, os.urandom(length), rng.randrange(0, size - length, 4096))
    writes += 1
    if writes == 1:
        open(ready, "w").close()
    time.sleep(0.003)
"""

#: The pause command: the guest's last writes (optional), stop the writer (if
#: any) and wait until it is stopped, record the digest of the image, and
#: optionally ask the test to arm a connection cut and wait until it has.
PAUSE = """
import json, os, sys, time
from xenmig.digest import hashFile
options = json.loads(sys.argv[1])
if options.get("fill"):
    fd = os.open(options["image"], os.O_WRONLY)
    start, length = options["fill"]
    for offset in range(start, start + length, 1 << 20):
        os.pwrite(fd, os.urandom(1 << 20), offset)
    os.close(fd)
pid = options.get("writer")
if pid:
    os.kill(pid, 19)  # SIGSTOP
    while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.001)
with open(options["digest"], "w") as f:
    f.write(hashFile(options["image"]).hex)
if options.get("request"):
    open(options["request"], "w").close()
    while not os.path.exists(options["ack"]):
        time.sleep(0.002)
"""


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, certs: PKI) -> Iterator[Daemon]:
    """One daemon for the module; ``small`` is a second allowed root (for a tmpfs)."""
    root = tmp_path_factory.mktemp("daemon")
    (root / "small").mkdir()
    # A source that is killed, or whose connections are cut for good, is waited
    # for a second (not the default minute) before its migration aborts.
    extra = ("--allow-root", str(root / "small"), "--reconnect-grace", "1")
    running = Daemon(root, certs, *extra).start()
    yield running
    running.stop()


@pytest.fixture
def writers() -> Iterator[Callable[[Path, Path], subprocess.Popen[bytes]]]:
    """Start guest writer processes; each is killed (by pid) and reaped afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(image: Path, ready: Path) -> subprocess.Popen[bytes]:
        started.append(
            subprocess.Popen([sys.executable, "-c", WRITER, str(image), str(ready)])
        )
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def smallFilesystem(daemon: Daemon) -> Iterator[Path]:
    """A 40 MiB tmpfs on the daemon's second root; unmounted afterwards."""
    mountpoint = daemon.root / "small"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        if CI:
            pytest.fail(f"cannot mount a tmpfs on CI: {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


# -- the client as a process ---------------------------------------------------------


class Client(ProcessProtocol):
    """``xenmig migrate`` as a child of the reactor: its output and exit status."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: Deferred[Any] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)

    def kill(self) -> None:
        assert self.transport is not None
        self.transport.signalProcess("KILL")

    @property
    def stdout(self) -> str:
        return b"".join(self.out).decode(errors="replace")

    @property
    def stderr(self) -> str:
        return b"".join(self.err).decode(errors="replace")

    def report(self) -> dict[str, Any]:
        return json.loads(self.stdout)


def migrate(daemon: Daemon, *args: str, port: int | None = None) -> Client:
    """Start ``xenmig migrate --json`` with the client certificate and ``args``."""
    where = daemon.pki.ca
    argv = [
        sys.executable,
        "-m",
        "xenmig.cli.main",
        "migrate",
        "--target",
        f"127.0.0.1:{port or daemon.port}",
        "--ca",
        str(where / "ca.pem"),
        "--cert",
        str(where / f"{CLIENT}.pem"),
        "--key",
        str(where / f"{CLIENT}.key"),
        "--json",
        *args,
    ]
    client = Client()
    reactor.spawnProcess(client, sys.executable, argv, env=dict(os.environ))
    return client


def live(
    tmp_path: Path,
    image: Path,
    destination: Path,
    domain: str,
    params: str = "",
    **pause: Any,
) -> list[str]:
    """
    The arguments of a live migration of one disk (``params``: more of its
    parameters, e.g. ``,reflink=1``); the pause records a digest.
    """
    options = {"image": str(image), "digest": str(tmp_path / "paused.digest"), **pause}
    return [
        "--domain",
        domain,
        "--migration-id",
        domain,
        "--device",
        f"disk:d0:path={image},target={destination}{params}",
        "--live",
        "--pause-command",
        shlex.join([sys.executable, "-c", PAUSE, json.dumps(options)]),
        "--resume-command",
        f"touch {tmp_path / 'resumed'}"
        + (f"; kill -CONT {pause['writer']}" if pause.get("writer") else ""),
    ]


# -- a relay between client and daemon, to stall or cut the connections --------------


class Relay:
    """
    A TCP relay on 127.0.0.1 to the daemon (TLS passes through it untouched).
    It can stall the source's bytes after ``stallAt`` bytes, or cut every
    connection after ``cutAt`` more bytes.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.forwarded = 0
        self.stallAt: int | None = None
        self.cutAt: int | None = None
        self.stalled: Deferred[None] = Deferred()
        self.sides: list[Any] = []
        self.listening: Any = None

    async def start(self) -> int:
        relay = self

        class Downstream(Protocol):
            """The source's side of one connection."""

            transport: Any
            peer: Any = None

            def connectionMade(self) -> None:
                relay.sides.append(self)
                self.transport.pauseProducing()
                endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", relay.upstream)
                connectProtocol(endpoint, Upstream(self)).addErrback(
                    lambda _: self.transport.loseConnection()
                )

            def dataReceived(self, data: bytes) -> None:
                relay.forward(self, data)

            def connectionLost(self, reason: Any = None) -> None:
                if self.peer is not None and self.peer.transport is not None:
                    self.peer.transport.loseConnection()

        class Upstream(Protocol):
            """The daemon's side of one connection."""

            transport: Any

            def __init__(self, peer: Downstream) -> None:
                self.peer = peer

            def connectionMade(self) -> None:
                relay.sides.append(self)
                self.peer.peer = self
                if not relay.stalled.called:
                    self.peer.transport.resumeProducing()

            def dataReceived(self, data: bytes) -> None:
                self.peer.transport.write(data)

            def connectionLost(self, reason: Any = None) -> None:
                self.peer.transport.loseConnection()

        factory: Any = Factory.forProtocol(Downstream)
        self.listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        return int(self.listening.getHost().port)

    def forward(self, side: Any, data: bytes) -> None:
        self.forwarded += len(data)
        side.peer.transport.write(data)
        if self.cutAt is not None and self.forwarded >= self.cutAt:
            self.cut()
        elif self.stallAt is not None and self.forwarded >= self.stallAt:
            self.stallAt = None
            for s in self.sides:
                if s.__class__.__name__ == "Downstream":
                    s.transport.pauseProducing()
            self.stalled.callback(None)

    def release(self) -> None:
        """Resume the stalled connections."""
        for s in self.sides:
            if s.__class__.__name__ == "Downstream" and s.transport is not None:
                s.transport.resumeProducing()

    def cut(self) -> None:
        """Drop every connection at once (an RST each way)."""
        for s in self.sides:
            if s.transport is not None:
                s.transport.abortConnection()

    async def stop(self) -> None:
        self.cut()
        if self.listening is not None:
            await self.listening.stopListening()


# -- checks ---------------------------------------------------------------------------


async def aborted(daemon: Daemon, mid: str, destination: Path) -> dict[str, Any]:
    """The daemon aborted ``mid`` and left nothing: no staging, no destination."""
    status = await daemon.waitPhase(reactor, mid, "ABORTED", timeout=20)
    await eventually(reactor, lambda: not daemon.leftovers(), what="staging removed")
    assert not destination.exists()
    assert not any(p.name.startswith(".") for p in destination.parent.iterdir())
    return status


def qemuCompare(first: Path, second: Path) -> None:
    result = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(first), str(second)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- a live migration ------------------------------------------------------------------


async def startLive(
    daemon: Daemon,
    tmp_path: Path,
    writers: Any,
    image: Path,
    destination: Path,
    params: str = "",
) -> tuple[Client, subprocess.Popen[bytes]]:
    """
    Make a 64 MiB sparse image, start a writer on it, and once it writes, a live
    migration of it in three rounds (the pause stops the writer); the client and
    the writer.
    """
    sparseFile(image, 64 * MiB, [(0, 8 * MiB), (32 * MiB, 48 * MiB)])
    ready = tmp_path / "writer-ready"
    writer = writers(image, ready)
    await eventually(reactor, ready.exists, what="the writer's first write")
    name = destination.stem
    client = migrate(
        daemon,
        "--convergence",
        "rounds=3,threshold=0,shrink=1",
        *live(tmp_path, image, destination, name, params, writer=writer.pid),
    )
    return client, writer


@pytest_twisted.ensureDeferred
async def test_live_migration_while_the_guest_writes(
    daemon: Daemon, tmp_path: Path, writers: Any
) -> None:
    """Pre-copy rounds chase a writing guest; the target image equals the source
    at the pause, and the report has the bytes of each round and the paused
    window."""
    requirePrograms("qemu-img")
    image = tmp_path / "vm.img"
    destination = daemon.dest / "live.img"
    client, writer = await startLive(daemon, tmp_path, writers, image, destination)
    await client.ended
    report = client.report()

    assert report["exit_status"] == 0, client.stderr
    assert writer.poll() is None  # still there, stopped by the pause
    atPause = (tmp_path / "paused.digest").read_text()
    assert hashFile(str(destination)).hex == atPause == hashFile(str(image)).hex
    qemuCompare(image, destination)
    assert os.stat(destination).st_blocks * 512 <= os.stat(image).st_blocks * 512 + MiB
    [disk] = report["devices"]
    rounds = disk["rounds"]
    assert len(rounds) >= 2 and rounds[0] >= 24 * MiB, rounds
    assert rounds[1] > 0, rounds  # what the guest wrote during round 0
    assert disk["digest"].startswith("blake3-blocks-1024k:")
    assert 0 < report["paused_window"] < report["durations"]["total"]
    assert report["live"]["pause"]["status"] == 0
    assert report["live"]["resumed"] is None
    assert not (tmp_path / "resumed").exists()
    assert daemon.leftovers() == []
    status = await daemon.status(reactor, "live")
    assert status["phase"] == "COMMITTED"
    assert status["devices"][0]["digest"] == disk["digest"]
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_live_migration_with_reflink_snapshots(
    daemon: Daemon, tmp_path: Path, xfs: Path, writers: Any
) -> None:
    """``reflink=1``: an image on XFS that a process writes during pre-copy; the
    rounds follow reflink snapshots, the target equals the image at the pause,
    and no snapshot is left next to the image."""
    requirePrograms("qemu-img")
    home = xfs / "e2e-reflink"
    home.mkdir()
    image = home / "vm.img"
    destination = daemon.dest / "reflink.img"
    client, writer = await startLive(
        daemon, tmp_path, writers, image, destination, ",reflink=1"
    )
    snapshots: set[str] = set()  # the snapshots seen while it runs
    while not client.ended.called:
        snapshots |= {n for n in os.listdir(home) if n.endswith(".snap")}
        await deferLater(reactor, 0.002, lambda: None)
    report = client.report()

    assert report["exit_status"] == 0, client.stderr
    atPause = (tmp_path / "paused.digest").read_text()
    assert hashFile(str(destination)).hex == atPause == hashFile(str(image)).hex
    qemuCompare(image, destination)
    [disk] = report["devices"]
    assert len(disk["rounds"]) == 3 and disk["rounds"][1] > 0, disk["rounds"]
    # One snapshot per interval, next to the image; all gone at the end.
    assert len(snapshots) >= 2, snapshots
    assert all(n.startswith(".vm.img.xenmig-") for n in snapshots)
    assert os.listdir(home) == ["vm.img"]
    assert daemon.leftovers() == []
    await settled(reactor)


#: The pause command of a QEMU-run disk: ask the test's writer to stop and wait
#: until it has, make the guest's last writes through QEMU's own QMP socket, stop
#: the VM, and record the image's digest.
QEMU_PAUSE = """
import json, os, sys, time
from xenmig.digest import hashFile
from xenmig.demo.testguest import guestWrites
options = json.loads(sys.argv[1])
open(options["request"], "w").close()
while not os.path.exists(options["ack"]):
    time.sleep(0.002)
guestWrites(options["qmp"], [(offset, 65536, 0x77) for offset in options["last"]])
with open(options["digest"], "w") as f:
    f.write(hashFile(options["image"]).hex)
"""


async def bitmapsOn(qmp: Any, node: str) -> set[str]:
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    return {
        bitmap["name"]
        for each in nodes
        if each["node-name"] == node
        for bitmap in each.get("dirty-bitmaps", [])
    }


@pytest_twisted.ensureDeferred
async def test_live_migration_of_a_disk_qemu_writes(
    daemon: Daemon, tmp_path: Path
) -> None:
    """``qmp=``: a QEMU writes the image during pre-copy and before the pause;
    the rounds follow its dirty bitmap; the target equals the image at the pause
    and QEMU keeps no bitmap or NBD server of the migration's."""
    requirePrograms(testguest.QEMU, "qemu-img")
    image = denseFile(tmp_path / "vm.img", 32 * MiB)
    destination = daemon.dest / "qemu-live.img"
    control, free, pause = (str(tmp_path / f"{n}.qmp") for n in "abc")
    command = [
        testguest.QEMU, "-machine", "none", "-nodefaults", "-display", "none",
        "-blockdev", f"driver=file,filename={image},node-name=file0",
        "-blockdev", "driver=raw,file=file0,node-name=disk0",
    ]  # fmt: skip
    for monitor in (control, free, pause):
        command += ["-qmp", f"unix:{monitor},server=on,wait=off"]
    guest = await testguest.startQEMU(reactor, command, control)
    request, ack = tmp_path / "pause-request", tmp_path / "writer-stopped"
    options = {
        "image": str(image),
        "digest": str(tmp_path / "paused.digest"),
        "qmp": pause,
        "request": str(request),
        "ack": str(ack),
        "last": [3 * MiB, 17 * MiB + 65536],
    }
    try:
        client = migrate(
            daemon,
            "--domain", "vm-qemu", "--migration-id", "vm-qemu",
            "--device", f"disk:d0:path={image},target={destination},qmp={free}",
            "--live", "--convergence", "rounds=3,threshold=0,shrink=1",
            "--pause-command",
            shlex.join([sys.executable, "-c", QEMU_PAUSE, json.dumps(options)]),
            "--resume-command", f"touch {tmp_path / 'resumed'}",
        )  # fmt: skip
        writes = 0
        recorded: set[str] = set()  # the migration's bitmaps seen on file0
        while not request.exists() and not client.ended.called:
            offset = (writes * 7 % 32) * MiB + 4096
            await testguest.writeThroughQEMU(
                guest.qmp, "disk0", offset, 8192, writes % 250
            )
            writes += 1
            recorded |= await bitmapsOn(guest.qmp, "file0")
            await deferLater(reactor, 0.005, lambda: None)
        ack.touch()
        await client.ended
        report = client.report()
        assert report["exit_status"] == 0, client.stderr
        assert await guest.qmp.queryStatus() == "paused"
        assert await bitmapsOn(guest.qmp, "file0") == set()
    finally:
        await guest.terminate()
    assert writes > 0
    # One bitmap per interval, on the file node: pre-copy followed QEMU's writes.
    assert len(recorded) >= 2 and all(b.startswith("xenmig-") for b in recorded)
    atPause = (tmp_path / "paused.digest").read_text()
    assert hashFile(str(destination)).hex == atPause == hashFile(str(image)).hex
    [disk] = report["devices"]
    rounds = disk["rounds"]
    assert len(rounds) == 3 and rounds[0] == 32 * MiB, rounds
    if leaves.available():
        # Later rounds send the 64 KiB granules QEMU wrote (data throughout),
        # not whole blocks: both sides keep leaf tables from round 0 on.
        assert all(r % (64 * 1024) == 0 and r < 8 * MiB for r in rounds[1:]), rounds
        assert any(r % MiB for r in rounds[1:]), rounds  # not whole blocks
    else:  # the blocks QEMU wrote (1 MiB each, data throughout)
        assert all(r % MiB == 0 for r in rounds[1:]), rounds
    assert 0 < report["paused_window"] < report["durations"]["total"]
    assert not (tmp_path / "resumed").exists()
    assert daemon.leftovers() == []
    await settled(reactor)


# -- failures ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_killed_mid_precopy(daemon: Daemon, tmp_path: Path) -> None:
    """Killing the client in the middle of a pre-copy round aborts the migration on
    the target, leaving nothing; the VM was never paused nor resumed."""
    image = denseFile(tmp_path / "vm.img", 48 * MiB)
    before = hashFile(str(image))
    destination = daemon.dest / "killed.img"
    relay = Relay(daemon.port)
    relay.stallAt = 12 * MiB
    port = await relay.start()
    try:
        args = live(tmp_path, image, destination, "vm-killed")
        client = migrate(daemon, *args, port=port)
        await relay.stalled.addTimeout(30, reactor)
        await daemon.waitBytes(reactor, "vm-killed", MiB, timeout=20)
        client.kill()
        ended = await client.ended
        relay.release()  # the relay passes the source's hang-up on
        assert ended.signal == signal.SIGKILL, client.stderr
        status = await aborted(daemon, "vm-killed", destination)
    finally:
        await relay.stop()
    assert "connection was lost" in status["reason"] or "stream" in status["reason"]
    assert 0 < status["devices"][0]["bytes_done"] < 48 * MiB
    assert hashFile(str(image)) == before
    assert not (tmp_path / "paused.digest").exists()
    assert not (tmp_path / "resumed").exists()
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_connection_cut_in_final_round_resumes(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Without resuming, the connection cut in the final round (the VM paused)
    aborts both sides and runs the resume command; the source image is as it
    was at the pause."""
    image = sparseFile(tmp_path / "vm.img", 64 * MiB, [(0, 16 * MiB)])
    destination = daemon.dest / "cut.img"
    request, ack = tmp_path / "cut-request", tmp_path / "cut-ack"
    relay = Relay(daemon.port)
    port = await relay.start()
    try:
        args = live(
            tmp_path,
            image,
            destination,
            "vm-cut",
            fill=[32 * MiB, 16 * MiB],  # the guest's last writes: 16 MiB to send
            request=str(request),
            ack=str(ack),
        )
        client = migrate(daemon, *args, "--no-resume", port=port)  # the cut aborts
        await eventually(reactor, request.exists, timeout=30, what="the pause")
        relay.cutAt = relay.forwarded + 2 * MiB  # two MiB into the final round
        ack.touch()
        await client.ended
        await aborted(daemon, "vm-cut", destination)
    finally:
        await relay.stop()
    report = client.report()
    assert report["exit_status"] == 1, client.stderr
    assert report["phase"] == "ABORTED"
    assert report["live"]["resumed"] is True
    assert (tmp_path / "resumed").exists()
    assert "the VM was resumed here" in client.stderr
    assert hashFile(str(image)).hex == (tmp_path / "paused.digest").read_text()
    await settled(reactor)


@pytest_twisted.ensureDeferred
async def test_full_target_filesystem_aborts_and_resumes(
    daemon: Daemon, tmp_path: Path, smallFilesystem: Path
) -> None:
    """A guest that fills holes during pre-copy outgrows the target's (40 MiB)
    filesystem: the final round fails with a clear message, nothing stays there,
    and the VM is resumed."""
    image = sparseFile(tmp_path / "vm.img", 256 * MiB, [(0, 8 * MiB)])
    destination = smallFilesystem / "vm.img"
    started = time.monotonic()
    client = migrate(
        daemon,
        *live(tmp_path, image, destination, "vm-full", fill=[64 * MiB, 48 * MiB]),
    )
    await client.ended
    report = client.report()
    assert report["exit_status"] == 1, client.stderr
    assert report["live"]["resumed"] is True
    assert "the VM was resumed here" in client.stderr
    status = await aborted(daemon, "vm-full", destination)
    assert "device d0: no space left on the target filesystem" in status["reason"]
    assert os.listdir(smallFilesystem) == []
    assert hashFile(str(image)).hex == (tmp_path / "paused.digest").read_text()
    assert time.monotonic() - started < 30
    await settled(reactor)
