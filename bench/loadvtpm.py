"""
The vTPM client of the load benchmark: one process, one MigrationClient (set up
as ``xenmig migrate`` sets it up), many vTPM migrations at once into a daemon
that is already running, real swtpms on both sides (``target-ctrl``: a fresh
swtpm in the daemon's allowed root, as host B's toolstack starts it).

    python bench/loadvtpm.py --port P --pki DIR --dest DIR --work DIR --count N
                             [--alone R]

1. starts 1 + R + N pairs of swtpms (not timed);
2. one migration to warm the client and the daemon, then R alone, one after
   the other (the reference);
3. prints ``warm`` and waits for a line on its standard input (the bench reads
   the daemon's memory meanwhile);
4. starts the N others at once, and waits for every one;
5. checks that each committed target TPM runs (a raw ``TPM2_Startup`` is
   refused as already initialised), stops the swtpms, and prints one JSON
   object: the outcomes, the reference, the wall time, its own CPU and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import startSwtpm
from loadoutcome import COMMITTED, FAILED, Outcome
from twisted.internet import defer, task, threads

from xenmig import tls
from xenmig.model import DeviceSpec
from xenmig.source.client import MigrationClient
from xenmig.source.migration import SourceMigration
from xenmig.source.threadedstream import sslContext

#: swtpms started at once while setting up.
STARTING = 8


@dataclass
class Pair:
    """A VM's running swtpm on the source, and a fresh one for it on the target."""

    n: int
    source: Any
    target: Any

    def spec(self) -> DeviceSpec:
        return DeviceSpec.parse(
            f"vtpm:tpm0:ctrl={self.source.ctrlPath},target-ctrl={self.target.ctrlPath}"
        )


def client(reactor: Any, port: int, where: Path) -> MigrationClient:
    """As ``xenmig migrate`` makes it: control over Twisted's TLS, streams threaded."""
    identity = tls.loadIdentity(where / "source.test.pem", where / "source.test.key")
    authorities = tls.loadAuthority(where / "ca.pem")
    return MigrationClient(
        reactor,
        "127.0.0.1",
        port,
        tls=tls.clientOptions("127.0.0.1", identity, authorities),
        sslContext=sslContext(identity, authorities),
        serverName="127.0.0.1",
    )


async def startPairs(reactor: Any, work: Path, dest: Path, count: int) -> list[Pair]:
    """``count`` pairs of swtpms, started ``STARTING`` at a time."""
    gate = defer.DeferredSemaphore(STARTING)

    async def one(n: int) -> Pair:
        source = await startSwtpm(reactor, str(work / f"s{n}"))
        target = await startSwtpm(reactor, str(dest / f"t{n}"), running=False)
        return Pair(n, source, target)

    return list(
        await defer.gatherResults(
            [gate.run(defer.Deferred.fromCoroutine, one(n)) for n in range(count)],
            consumeErrors=True,
        )
    )


async def migrate(client: MigrationClient, pair: Pair) -> Outcome:
    """One migration of ``pair``'s TPM; its outcome, from the client's report."""
    from xenmig.toolstack.failures import describeError

    migration = SourceMigration(client, f"vm-{pair.n}", os.urandom(16).hex())
    try:
        await migration.prepare([pair.spec()])
        await migration.transfer()
        await migration.commit()
    except Exception as e:
        report = migration.report()
        report["reason"] = migration.reason or describeError(e)
        return Outcome.fromReport(report, committed=False, code=errorCode(e))
    return Outcome.fromReport(migration.report(), committed=True)


def errorCode(error: BaseException) -> str | None:
    """The wire code of ``error`` (e.g. ``DEVICE_REFUSED``, ``BUSY``), if it has one."""
    from xenmig.errors import WIRE_ERRORS

    for kind in type(error).__mro__:
        code = WIRE_ERRORS.get(kind)  # type: ignore[call-overload]
        if code is not None:
            return code.decode()
    code = getattr(error, "errorCode", None)
    return code.decode() if isinstance(code, bytes) else None


async def resumed(reactor: Any, pair: Pair) -> bool:
    """Whether the target TPM runs the migrated state (a raw Startup is refused)."""
    from xenmig.clients.swtpmprocess import (
        TPM2_STARTUP_CLEAR,
        TPM_RC_INITIALIZE,
        responseCode,
        tpmCommand,
    )

    answer = await tpmCommand(reactor, pair.target.serverPath, TPM2_STARTUP_CLEAR)
    return responseCode(answer) == TPM_RC_INITIALIZE


async def stopAll(pairs: list[Pair]) -> None:
    await defer.gatherResults(
        [s.stop() for p in pairs for s in (p.source, p.target)], consumeErrors=True
    )


async def run(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The steps of the module's docstring; the JSON figures."""
    talker = client(reactor, args.port, Path(args.pki))
    pairs = await startPairs(
        reactor, Path(args.work), Path(args.dest), 1 + args.alone + args.count
    )
    try:
        warm = await migrate(talker, pairs[0])
        if warm.status != COMMITTED:
            raise SystemExit(f"loadvtpm: the warm-up migration failed: {warm.reason}")
        alone = [await migrate(talker, p) for p in pairs[1 : 1 + args.alone]]
        print("warm", flush=True)
        await threads.deferToThread(sys.stdin.readline)
        batch = pairs[1 + args.alone :]
        started = time.perf_counter()
        outcomes = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(migrate(talker, p)) for p in batch]
        )
        wall = time.perf_counter() - started
        outcomes = [
            await checked(reactor, p, o) for p, o in zip(batch, outcomes, strict=True)
        ]
    finally:
        await stopAll(pairs)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "alone": [o.seconds for o in alone if o.seconds is not None],
        "outcomes": [o.toJSON() for o in outcomes],
        "wall": wall,
        "client_cpu": usage.ru_utime + usage.ru_stime,
        "client_rss": usage.ru_maxrss * 1024,
    }


async def checked(reactor: Any, pair: Pair, outcome: Outcome) -> Outcome:
    """``outcome``, made FAILED if it committed but the target TPM does not run."""
    if outcome.status != COMMITTED or await resumed(reactor, pair):
        return outcome
    return Outcome(FAILED, None, outcome.retries, "the target TPM did not resume")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pki", required=True, help="ca.pem, source.test.pem, ...")
    parser.add_argument("--dest", required=True, help="an allowed root of the daemon")
    parser.add_argument("--work", required=True, help="where the source swtpms live")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--alone", type=int, default=5)
    args = parser.parse_args(argv)

    async def body(reactor: Any) -> None:
        print(json.dumps(await run(reactor, args)), flush=True)

    from xenmig.tuning import tuneAllocator

    tuneAllocator()  # as the xenmig command line does
    task.react(lambda reactor: defer.Deferred.fromCoroutine(body(reactor)))


if __name__ == "__main__":
    main(sys.argv[1:])
