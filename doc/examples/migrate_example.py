"""
How a source toolstack drives one migration with ``xenmig.source.client``, phase by
phase, and what it may do with the VM after each outcome.

``doc/sessions.md`` quotes it; ``tests/test_docs.py`` runs it against a daemon.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from xenmig.errors import CommitInDoubt
from xenmig.model import DeviceSpec
from xenmig.source.client import MigrationClient

Step = Callable[[], Awaitable[None]]


async def migrate(
    client: MigrationClient,
    domain: str,
    specs: Sequence[DeviceSpec],
    pauseVM: Step,
    resumeVM: Step,
) -> list[str]:
    """
    Move the device state of ``domain``; what the target installed.

    Any failure before the commit leaves the VM running (or resumed) here.  A
    commit whose outcome is unknown raises CommitInDoubt with the VM still paused.
    """
    # Refusal here costs nothing: the VM has not been paused.
    migration = await client.prepare(domain, specs)
    try:
        await migration.precopy()  # devices that can send while the VM runs
        await pauseVM()
        migration.paused()
        try:
            await migration.transfer()  # final state, verified by the target
        except BaseException:
            await resumeVM()  # transfer() already aborted and rolled back
            raise
    except BaseException as e:
        await migration.abort(f"the source gave up: {e}")  # no-op if done already
        raise
    try:
        return await migration.commit()
    except CommitInDoubt:
        # The VM may already run on the target: never resume it here on a guess.
        # Ask (``xenmig status ID``, or client.query) until the target answers
        # COMMITTED (destroy the VM here) or ABORTED (resume it here).
        raise
    except BaseException:
        # The target answered, or told a later query, that it did not commit:
        # the session is aborted and the source devices are rolled back.
        await resumeVM()
        raise
