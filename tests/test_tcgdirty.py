"""
QEMU's own live migration of a TCG guest that rewrites its RAM loses none of
its writes with the RAM size the tests, benches and demos use
(``testguest.tcgRAM``; doc/devmodel.md, "TCG caveat").

QEMU alone, no xenmig: the check that the setting every live test relies on
still holds on this host's QEMU.  With a RAM of a whole number of 64-page words
(16 MiB) QEMU 7.2 lost the guest's last counts, or a page it rewrote, in about
half of these runs (3 of 5 in one set).  With ``tcgRAM(16)`` the count always
arrived, but two whole-suite runs each had 2 of 5 runs where one or two of the
pages the guest rewrites arrived as of an earlier sweep: QEMU 7.2's loss made
rarer, not gone.  That trace alone is tolerated before QEMU 9.0.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from test_devmodel import Guests, guests, randomRAM, workdir
from test_devmodel_live import dirtying
from twisted.internet import reactor
from twisted.internet.task import deferLater

from xenmig.demo import testguest

__all__ = ["guests", "workdir"]  # fixtures, used by name

MiB = 1024 * 1024


async def finished(qmp: Any) -> dict[str, Any]:
    """``query-migrate`` once the migration ended (within 60 s)."""
    for _ in range(3000):
        info: dict[str, Any] = await qmp.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"the migration did not end: {info}")


@pytest.mark.parametrize("run", range(5))
@pytest_twisted.ensureDeferred
async def test_qemuAloneLosesNoWriteUnderTCG(
    guests: Guests, workdir: str, run: int
) -> None:
    """
    Several passes over dirty RAM at 20 MiB/s while the guest rewrites 512 KiB
    and counts: the target holds the count the source stopped at.
    """
    image = dirtying(workdir)
    running = await guests.start("src", image=image, extra=randomRAM(workdir))
    waiting = await guests.start("dst", incoming=True, image=image)
    source, target = running.observer, waiting.observer
    assert source is not None and target is not None
    channel = os.path.join(workdir, "migration.sock")
    await target.execute("migrate-incoming", {"uri": f"unix:{channel}"})
    await running.countsPast(3)
    await source.execute(
        "migrate-set-parameters", {"max-bandwidth": 20 * MiB, "downtime-limit": 20}
    )
    await source.execute("migrate", {"uri": f"unix:{channel}"})
    info = await finished(source)
    assert info["status"] == "completed", info
    assert (await finished(target))["status"] == "completed"
    # Passes over RAM the guest rewrote while it ran, not one copy.
    assert info["ram"]["dirty-sync-count"] >= 3
    assert await running.status() == "postmigrate"
    stoppedAt = await running.readCounter()
    assert stoppedAt > 3
    assert await waiting.readCounter() == stoppedAt
    # And every page: the source's RAM as it stopped, the target's as it loaded.
    dumps = []
    for qmp, name in ((source, "source"), (target, "target")):
        path = os.path.join(workdir, f"{name}.ram")
        size = testguest.tcgRAMBytes(16)
        await qmp.execute("pmemsave", {"val": 0, "size": size, "filename": path})
        with open(path, "rb") as f:
            dumps.append(f.read())
    assert len(dumps[0]) == len(dumps[1]) == size
    pages = range(0, size, 4096)
    differing = [p for p in pages if dumps[0][p : p + 4096] != dumps[1][p : p + 4096]]
    version = (await source.execute("query-version"))["qemu"]
    if (version["major"], version["minor"]) >= (9, 0):
        assert differing == []
        return
    # QEMU before 9.0 (doc/devmodel.md, "TCG caveat"): the RAM size makes its lost
    # stores rarer, not impossible.  Their only trace may be a page the guest
    # rewrites holding an earlier sweep's count; anything else is a defect.
    for page in differing:
        assert page in REWRITTEN, f"page {page:#x} differs"
        kept, loaded = (_counts(dump[page : page + 4096]) for dump in dumps)
        assert len(loaded) <= 2 and max(loaded) <= max(kept), (
            f"page {page:#x}: the target has counts {loaded}, the source {kept}"
        )
    assert len(differing) <= 2, [hex(page) for page in differing]


#: The pages the dirtying guest fills with its count, sweep after sweep.
REWRITTEN = range(0x10000, 0x90000, 4096)


def _counts(page: bytes) -> set[int]:
    """
    The counts a rewritten page holds (the low 16 bits, a word each): one, or
    two where a sweep stopped in it.
    """
    return {int.from_bytes(page[i : i + 2], "little") for i in range(0, 4096, 2)}
