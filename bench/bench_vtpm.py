"""
Time a handler-level vTPM migration: source GET of the blobs, target load.

Runs real swtpms (no daemons, no network): the source and target devices of the
``vtpm`` kind are driven against each other through an in-memory writer, as the
tests do.  Prints milliseconds per phase, per target mode, for N rounds::

    python bench/bench_vtpm.py [--rounds 20]

The end-to-end number (two daemons over mutual TLS) comes from extending this
script once the core lands.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from xenmig.devices.vtpm import vtpmKind
from xenmig.model import DeviceSpec
from xenmig.records import EndRecord
from xenmig.swtpm import (
    TPM2_STARTUP_CLEAR,
    SwtpmProcess,
    responseCode,
    tpmCommand,
)
from xenmig.testing import FakeSourceContext, FakeTargetContext, MemoryWriter

PHASES = ("describe", "accept", "sendFinal", "finish", "commit")


async def startSource(reactor: Any, work: str) -> SwtpmProcess:
    """A running source swtpm, started with TPM2_Startup."""
    state = os.path.join(work, "source")
    os.mkdir(state)
    source = SwtpmProcess(reactor, state)
    await source.start()
    await source.control.init()
    answer = await tpmCommand(reactor, source.serverPath, TPM2_STARTUP_CLEAR)
    assert responseCode(answer) == 0, answer.hex()
    return source


async def oneRound(
    reactor: Any, source: SwtpmProcess, work: str, mode: str, n: int
) -> dict[str, float]:
    """One migration; the milliseconds each phase took."""
    target: SwtpmProcess | None = None
    if mode == "ctrl":
        state = os.path.join(work, f"target-{n}")
        os.mkdir(state)
        target = SwtpmProcess(reactor, state)
        await target.start()
        where = f"target-ctrl={target.ctrlPath}"
    else:
        where = f"target-statedir={os.path.join(work, f'statedir-{n}')}"
    spec = DeviceSpec.parse(f"vtpm:tpm0:ctrl={source.ctrlPath},{where}")
    targetContext = FakeTargetContext(reactor, [work])
    times: dict[str, float] = {}
    clock = time.perf_counter

    try:
        started = clock()
        device = vtpmKind.source(spec, FakeSourceContext(reactor))
        description = await device.describe()
        times["describe"] = clock()
        receiver = vtpmKind.target(description, targetContext)
        device.accepted(await receiver.accept())
        times["accept"] = clock()
        writer = MemoryWriter()
        digest = await device.sendFinal(writer)
        times["sendFinal"] = clock()
        for record in writer.records:
            receiver.receive(record)
        await receiver.finish(EndRecord(digest.size, digest.algorithm, digest.digest))
        times["finish"] = clock()
        await receiver.commit()
        times["commit"] = clock()
    finally:
        targetContext.cleanup()
        if target is not None:
            await target.stop()
    previous, result = started, {}
    for phase in PHASES:
        result[phase] = (times[phase] - previous) * 1000
        previous = times[phase]
    result["total"] = (times["commit"] - started) * 1000
    result["paused"] = (times["commit"] - times["accept"]) * 1000
    return result


def report(mode: str, rounds: list[dict[str, float]]) -> None:
    print(f"target-{mode}: {len(rounds)} rounds, milliseconds (median / min)")
    for key in (*PHASES, "paused", "total"):
        values = [r[key] for r in rounds]
        print(f"  {key:>10}: {statistics.median(values):8.2f} / {min(values):8.2f}")


async def main(reactor: Any, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=20)
    options = parser.parse_args(argv)
    if shutil.which("swtpm") is None:
        sys.exit("bench_vtpm needs swtpm (apt-get install swtpm)")
    work = tempfile.mkdtemp(prefix="xm-bench-")
    source = await startSource(reactor, work)
    try:
        for mode in ("ctrl", "statedir"):
            rounds = [
                await oneRound(reactor, source, work, mode, n)
                for n in range(options.rounds)
            ]
            report(mode, rounds)
    finally:
        await source.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
