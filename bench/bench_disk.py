"""
Handler-level benchmark of the disk kind, against plain copies measured in the same run.

    python bench/bench_disk.py [--size-mib N] [--dir DIR] [--drop-caches]

The disk source and target devices are wired by an in-process record pipe (no
network, no TLS): this measures what the handler pair itself costs (reading,
block digests, content digests, staged writes, fsync, atomic install).  The
references are `cp`, a plain loopback-socket copy and `rsync --sparse`, each
fsynced like the staged file.  Images are in the page cache unless --drop-caches.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from benchlib import fsyncPath
from twisted.internet import defer, task
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from zope.interface import implementer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xenmig.devices.disk.blockmap import hashImage  # noqa: E402
from xenmig.devices.disk.kind import diskKind  # noqa: E402
from xenmig.devices.disk.source import DiskSource  # noqa: E402
from xenmig.devices.disk.target import DiskTarget  # noqa: E402
from xenmig.digest import hashFile  # noqa: E402
from xenmig.fs import InstallAs
from xenmig.interfaces import (  # noqa: E402
    IConvergencePolicy,
    IRecordWriter,
    ISourceContext,
    ITargetContext,
)
from xenmig.model import DeviceSpec  # noqa: E402
from xenmig.records import DataRecord, EndRecord, RoundRecord, ZeroRecord  # noqa: E402
from xenmig.source.convergence import ConvergencePolicy, FixedRounds  # noqa: E402

MiB = 1024 * 1024


@implementer(ISourceContext)
class SourceContext:
    migrationId, domain = "bench", "bench-vm"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def runInThread(self, function: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return deferToThread(function, *args, **kw)

    def callPeer(self, method: str, payload: dict[str, Any]) -> Any:
        raise NotImplementedError


@implementer(ITargetContext)
class TargetContext(SourceContext):
    peer = "bench-source"
    installAs = InstallAs()

    def __init__(self, reactor: Any, root: str) -> None:
        super().__init__(reactor)
        self.stagingDir = FilePath(root)

    def stagingPathFor(self, destination: FilePath, suffix: str = "") -> FilePath:
        return destination.sibling(f".{destination.basename()}.staging{suffix}")

    def resolveDestination(self, path: str) -> FilePath:
        return FilePath(path)


@implementer(IRecordWriter)
class Pipe:
    """Records straight into the target device, with its backpressure."""

    def __init__(self, target: DiskTarget) -> None:
        self.target = target
        self.bytesWritten = 0

    def _deliver(self, record: Any) -> Any:
        return self.target.receive(record) or defer.succeed(None)

    def writeData(self, offset: int, data: bytes) -> Any:
        self.bytesWritten += len(data)
        return self._deliver(DataRecord(offset, data))

    def writeZero(self, offset: int, length: int) -> Any:
        self.bytesWritten += length
        return self._deliver(ZeroRecord(offset, length))

    def writeMetadata(self, metadata: dict[str, Any]) -> Any:
        return defer.succeed(None)


# -- images ----------------------------------------------------------------------


def makeDense(path: str, size: int) -> None:
    pattern = bytearray(os.urandom(64 * MiB))
    with open(path, "wb") as f:
        for offset in range(0, size, MiB):
            start = offset % len(pattern)
            block = pattern[start : start + MiB]
            block[:8] = offset.to_bytes(8, "little")  # every block distinct
            f.write(block[: size - offset])


def makeSparse(path: str, size: int, fraction: float = 0.1) -> None:
    rng = random.Random(1)
    pieces = max(1, int(size * fraction) // MiB)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(pieces):
            f.seek(rng.randrange(0, size - MiB, 4096))
            f.write(os.urandom(MiB))


def changeBlocks(path: str, size: int, fraction: float, seed: int = 2) -> int:
    """The guest rewrites 64 KiB in ``fraction`` of the 1 MiB blocks."""
    rng = random.Random(seed)
    blocks = rng.sample(range(size // MiB), max(1, int(size // MiB * fraction)))
    fd = os.open(path, os.O_WRONLY)
    try:
        for block in blocks:
            os.pwrite(fd, os.urandom(64 * 1024), block * MiB + 4096)
    finally:
        os.close(fd)
    return len(blocks)


def dropCaches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        print(f"  (cannot drop caches: {e.strerror})")


# -- the handler pair ------------------------------------------------------------


async def migrate(
    reactor: Any,
    image: str,
    destination: str,
    policy: IConvergencePolicy | None = None,
    between: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One handler-level migration; its timings (seconds) and bytes."""
    spec = DeviceSpec.parse(f"disk:bench:path={image},target={destination}")
    started = time.perf_counter()
    source = DiskSource(spec, SourceContext(reactor))
    description = (await source.describe()).withTargetParams(spec)
    target = diskKind.target(
        description, TargetContext(reactor, os.path.dirname(destination))
    )
    await target.accept()
    pipe = Pipe(target)
    rounds = 0
    if policy is not None:
        while True:
            target.receive(RoundRecord(rounds, False))
            result = await source.sendRound(pipe, rounds)
            rounds += 1
            if not policy.proceed(rounds - 1, result):
                break
    precopy = time.perf_counter()
    if between is not None:
        between()
    paused = time.perf_counter()
    target.receive(RoundRecord(rounds, True))
    digest = await source.sendFinal(pipe)
    staged = await target.finish(
        EndRecord(digest.size, digest.algorithm, digest.digest)
    )
    assert staged == digest, "digest mismatch"
    await target.commit()
    await source.release()
    done = time.perf_counter()
    final = source.history[-1]
    return {
        "total": done - started - (paused - precopy),
        "precopy": precopy - started,
        "paused": done - paused,
        "finalPass": final.seconds,
        "finalData": final.dataBytes,
        "rounds": rounds,
    }


# -- references ------------------------------------------------------------------


async def timeCommand(*argv: str) -> float:
    started = time.perf_counter()
    await deferToThread(subprocess.run, argv, check=True, capture_output=True)
    await deferToThread(fsyncPath, argv[-1])
    return time.perf_counter() - started


def socketCopy(source: str, destination: str) -> float:
    """Blocking: copy through a loopback TCP socket, 1 MiB at a time; seconds."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def receive() -> None:
        connection, _ = server.accept()
        buffer = bytearray(MiB)
        view = memoryview(buffer)
        with connection, open(destination, "wb", buffering=0) as out:
            while received := connection.recv_into(buffer):
                out.write(view[:received])
            os.fsync(out.fileno())

    started = time.perf_counter()
    receiver = threading.Thread(target=receive)
    receiver.start()
    with socket.create_connection(("127.0.0.1", port)) as sender:
        with open(source, "rb", buffering=0) as f:
            while chunk := f.read(MiB):
                sender.sendall(chunk)
    receiver.join()
    server.close()
    return time.perf_counter() - started


# -- the run ---------------------------------------------------------------------


def report(
    name: str, seconds: float, size: int, reference: float | None = None
) -> None:
    rate = size / seconds / MiB
    line = f"  {name:<44} {seconds:7.3f} s  {rate:8.0f} MiB/s"
    if reference is not None:
        line += f"   x{reference / seconds:5.2f} vs reference"
    print(line)


async def main(reactor: Any, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--dir", default=None, help="where images go (default: tmp)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best counts")
    parser.add_argument("--drop-caches", action="store_true")
    options = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-disk-", dir=options.dir)
    try:
        await Bench(reactor, work, options).run()
    finally:
        shutil.rmtree(work)


class Bench:
    """Each measurement starts with dirty pages written out, and the best of
    ``--repeat`` runs counts (the VM's disk makes single runs noisy)."""

    def __init__(self, reactor: Any, work: str, options: argparse.Namespace) -> None:
        self.reactor = reactor
        self.size = options.size_mib * MiB
        self.repeat = options.repeat
        self.cold = options.drop_caches
        self.dense = os.path.join(work, "dense.img")
        self.sparse = os.path.join(work, "sparse.img")
        self.out = os.path.join(work, "out.img")

    async def _ready(self) -> None:
        if os.path.exists(self.out):
            os.unlink(self.out)
        await deferToThread(dropCaches if self.cold else os.sync)

    async def best(self, measure: Callable[[], Any]) -> Any:
        """The run of ``measure`` with the smallest ``total`` (or seconds)."""
        results = []
        for _ in range(self.repeat):
            await self._ready()
            results.append(await measure())
        return min(results, key=lambda r: r["total"] if isinstance(r, dict) else r)

    async def run(self) -> None:
        size, dense, sparse, out = self.size, self.dense, self.sparse, self.out
        await deferToThread(makeDense, dense, size)
        await deferToThread(makeSparse, sparse, size)
        reactor = self.reactor

        print(f"dense image, {size // MiB} MiB (best of {self.repeat})")
        cp = await self.best(lambda: timeCommand("cp", "--sparse=never", dense, out))
        report("cp (+fsync)", cp, size)
        plain = await self.best(lambda: deferToThread(socketCopy, dense, out))
        report("plain loopback socket copy (+fsync)", plain, size, cp)
        one = await self.best(lambda: migrate(reactor, dense, out))
        report("disk handler, one pass (paused throughout)", one["total"], size, plain)
        two = await self.best(lambda: migrate(reactor, dense, out, FixedRounds(1)))
        report("disk handler, pre-copy pass + final pass", two["total"], size, plain)
        print("  (the handler's ratios are against the plain socket copy)")

        print(f"sparse image, {size // MiB} MiB, 10% data")
        rsync = await self.best(lambda: timeCommand("rsync", "--sparse", sparse, out))
        report("rsync --sparse (+fsync)", rsync, size)
        cps = await self.best(lambda: timeCommand("cp", "--sparse=always", sparse, out))
        report("cp --sparse=always (+fsync)", cps, size, rsync)
        one = await self.best(lambda: migrate(reactor, sparse, out))
        report("disk handler, one pass", one["total"], size, rsync)
        print("  (ratios against rsync --sparse)")

        print("live dense image: 1% of the blocks change after pre-copy")
        full = (await self.best(lambda: migrate(reactor, dense, out)))["total"]
        seeds = iter(range(100, 200))

        def guest() -> None:
            changeBlocks(dense, size, 0.01, next(seeds))

        live = await self.best(
            lambda: migrate(reactor, dense, out, ConvergencePolicy(), guest)
        )
        print(
            f"  final pass sent {live['finalData'] // 1024} KiB in "
            f"{live['finalPass']:.3f} s after {live['rounds']} pre-copy round(s)"
        )
        print(
            f"  paused window {live['paused']:.3f} s (final pass, END, target "
            f"verify, commit) = {100 * live['paused'] / full:.1f}% of a full "
            f"one-pass copy ({full:.3f} s), {100 * live['paused'] / cp:.1f}% of cp"
        )

        print("hashing a whole image from the page cache (one thread)")
        for name, path in (("dense", dense), ("sparse", sparse)):
            started = time.perf_counter()
            await deferToThread(hashFile, path)
            single = time.perf_counter() - started
            started = time.perf_counter()
            await deferToThread(hashImage, path)
            tree = time.perf_counter() - started
            print(
                f"  {name}: plain blake3 (xenmig.digest.hashFile) {single:.3f} s, "
                f"block tree (blockmap.hashImage) {tree:.3f} s"
            )


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
