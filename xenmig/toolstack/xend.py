"""
xend's device-migration hooks, backed by xenmig's blocking client.

xend, Xen's Python toolstack, migrates a domain's devices through each device
controller's ``migrate(deviceConfig, network, dst, step, domName)`` and
``recover_migrate(...)``, in steps (``XendDomainInfo.DEV_MIGRATE_*``):

- step 0 (``testMigrateDevices``): can the device go?  ``0`` yes, ``-1`` no;
- step 1, before the memory transfer starts (the domain runs);
- step 2, after the domain is suspended: start the transfer and return at once;
- step 3: wait until that transfer has finished;
- ``recover_migrate(..., step, ...)`` after a failure, ``step`` the last good one.

L{XendMigrationHooks} maps these onto one xenmig migration per domain, whatever
the number of devices: the first device's call of each step does the step for
all of the domain's xenmig devices, the others find it done.  Step 0 is Prepare
(every target handler checks it can take its device: ``-1`` if one refuses),
step 1 pre-copy, step 2 the pause and the start of the final transfer (in a
thread), step 3 waits until the target has verified every device (READY).

The commit, the point of no return, is *not* step 3: xend calls step 3 while the
domain's last memory pages have yet to be sent.  The toolstack calls
L{XendMigrationHooks.commit} once the memory stream has completed (in
``XendCheckpoint.save``, after ``xc_save`` returned), before it destroys the
domain; if it does not get there, ``recover_migrate`` aborts, and the source
resumes the domain with every device as it was.  On the target, xend's restore
calls L{awaitRestored} before it unpauses the domain.  See ``doc/toolstacks.md``.

Every call blocks the calling xend thread (never a reactor: see
L{xenmig.source.blocking}) and is bounded by the client's time-outs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from xenmig.errors import (
    CommitInDoubt,
    DeviceRefused,
    InvalidTransition,
    MigrationAborted,
    PhaseTimeout,
    XenmigError,
)
from xenmig.interfaces import IConvergencePolicy
from xenmig.model import DEFAULT_PORT, DEFAULT_STATE_DIR, DeviceSpec

log = Logger()

DEV_MIGRATE_TEST = 0
DEV_MIGRATE_STEP1 = 1
DEV_MIGRATE_STEP2 = 2
DEV_MIGRATE_STEP3 = 3
#: Seconds step 3 waits for the transfer thread beyond the client's own bounds.
TRANSFER_TIMEOUT = 3600.0


@dataclass
class DomainMigration:
    """The xenmig migration of one domain, as far as xend's steps took it."""

    domain: str
    dst: str
    specs: list[DeviceSpec]
    lock: threading.Lock = field(default_factory=threading.Lock)
    results: dict[int, Any] = field(default_factory=dict)
    last: int = -1
    tested: set[str] = field(default_factory=set)  # devices that had step 0
    migration: Any = None  # a BlockingMigration once prepared
    worker: threading.Thread | None = None
    transferError: BaseException | None = None
    finished: str = ""  # "committed", "aborted", "refused", "in doubt"
    reason: str = ""
    installed: list[str] = field(default_factory=list)

    @property
    def migrationId(self) -> str:
        return self.migration.migrationId if self.migration is not None else ""


class XendMigrationHooks:
    """
    One per xend: the device controllers' ``migrate`` and ``recover_migrate``
    call it, and the toolstack calls L{commit} once the memory has arrived.

    @param connect: a blocking client for a target host name (``dst``), e.g.
        L{tlsConnector}.
    @param devices: the xenmig devices of a domain, by its name: each a
        L{DeviceSpec} (``vtpm:tpm0:ctrl=...,target-ctrl=...``).
    @param policy: the pre-copy convergence policy of step 1 (default: xenmig's;
        L{xenmig.source.convergence.DowntimePolicy} for a maximum downtime).
    @param bandwidth: the most bytes per second each migration's streams send
        together (None: no limit).
    """

    def __init__(
        self,
        connect: Callable[[str], Any],
        devices: Callable[[str], Sequence[DeviceSpec]],
        policy: IConvergencePolicy | None = None,
        transferTimeout: float = TRANSFER_TIMEOUT,
        bandwidth: int | None = None,
    ) -> None:
        self.connect = connect
        self.bandwidth = bandwidth
        self.devices = devices
        self.policy = policy
        self.transferTimeout = transferTimeout
        self.domains: dict[str, DomainMigration] = {}
        self._lock = threading.Lock()

    # -- xend's DevController interface ------------------------------------------------

    def migrate(
        self, deviceConfig: Any, network: bool, dst: str, step: int, domName: str
    ) -> int:
        """
        One device's step; the first device of the domain does it for all.

        @return: 0, or -1 at step 0 if a target handler refused a device (the
            reason is logged and in L{reason}).
        @raise XenmigError: the step failed (xend then calls recover_migrate).
        """
        if not network:
            return 0  # a save to a local file: nothing goes to another host
        state = self._current(domName, dst, step, repr(deviceConfig))
        with state.lock:
            if step == DEV_MIGRATE_TEST:
                state.tested.add(repr(deviceConfig))
            if step in state.results:
                result = state.results[step]
                if isinstance(result, BaseException):
                    raise result
                return int(result)
            if step != state.last + 1:
                raise InvalidTransition(
                    f"xend step {step} for domain {domName} after step {state.last}"
                )
            try:
                result = self._step(state, step)
            except BaseException as e:
                state.results[step] = e
                raise
            state.results[step] = result
            state.last = step
            return result

    def recover_migrate(
        self, deviceConfig: Any, network: bool, dst: str, step: int, domName: str
    ) -> int:
        """
        After a failure (``step`` the last good one): abort the migration, once;
        the source devices are as they were and the domain may be resumed.

        @raise CommitInDoubt: never resume the domain then: ask the target.
        """
        state = self.domains.get(domName)
        if not network or state is None:
            return 0
        with state.lock:
            self._abort(state, f"xend recovers from device migration step {step}")
        return 0

    # -- the toolstack's calls ---------------------------------------------------------

    def commit(self, domName: str) -> list[str]:
        """
        The point of no return, once the domain's memory has arrived: the target
        installs every device and releases the domain; the source devices are
        released.  What the target installed.

        @raise CommitInDoubt: the domain may run on the target: do not resume it
            here; ask (L{xenmig.source.blocking.BlockingMigrationClient.query}).
        @raise XenmigError: the migration aborted: resume the domain here.
        """
        state = self.domains.get(domName)
        if state is None or state.migration is None:
            raise InvalidTransition(f"no xenmig migration of {domName} to commit")
        with state.lock:
            if state.finished == "committed":
                return list(state.installed)
            if state.last != DEV_MIGRATE_STEP3 or state.finished:
                raise InvalidTransition(
                    f"the migration of {domName} is at step {state.last}"
                    + (f" ({state.finished})" if state.finished else "")
                    + "; commit needs step 3 done"
                )
            try:
                state.installed = state.migration.commit()
            except CommitInDoubt:
                state.finished = "in doubt"
                raise
            except BaseException as e:
                state.finished, state.reason = "aborted", str(e)
                raise
            state.finished = "committed"
            return list(state.installed)

    def reason(self, domName: str) -> str:
        """Why the domain's migration was refused or aborted ('' if it was not)."""
        state = self.domains.get(domName)
        return state.reason if state is not None else ""

    def report(self, domName: str) -> dict[str, Any] | None:
        """xenmig's JSON report of the domain's migration (the paused window...)."""
        state = self.domains.get(domName)
        if state is None or state.migration is None:
            return None
        return state.migration.report()

    # -- the steps ---------------------------------------------------------------------

    def _current(
        self, domName: str, dst: str, step: int, device: str
    ) -> DomainMigration:
        """
        The domain's migration; a new one when step 0 starts over: after a
        migration that got further or ended, or for a device that had it already
        (xend retrying), but not for the next device of the same attempt.
        """
        with self._lock:
            state = self.domains.get(domName)
            fresh = state is None or (
                step == DEV_MIGRATE_TEST
                and (
                    device in state.tested
                    or state.last > DEV_MIGRATE_TEST
                    or state.finished not in ("", "refused")
                )
            )
            if fresh:
                if state is not None and not state.finished:
                    with state.lock:
                        self._abort(state, "xend started the migration over")
                state = DomainMigration(domName, dst, list(self.devices(domName)))
                self.domains[domName] = state
            assert state is not None
            return state

    def _step(self, state: DomainMigration, step: int) -> int:
        if step == DEV_MIGRATE_TEST:
            return self._prepare(state)
        if state.migration is None:
            return 0  # the domain has no xenmig device
        if step == DEV_MIGRATE_STEP1:
            state.migration.precopy(self.policy)
        elif step == DEV_MIGRATE_STEP2:
            state.migration.paused()
            state.worker = threading.Thread(
                target=self._transfer,
                args=(state,),
                name=f"xenmig-xend-{state.domain}",
                daemon=True,
            )
            state.worker.start()
        elif step == DEV_MIGRATE_STEP3:
            self._waitTransfer(state)
        else:
            raise InvalidTransition(f"xend has no device migration step {step}")
        return 0

    def _prepare(self, state: DomainMigration) -> int:
        if not state.specs:
            return 0
        client = self.connect(state.dst)
        try:
            state.migration = client.prepare(
                state.domain, state.specs, bandwidth=self.bandwidth
            )
        except DeviceRefused as e:
            state.finished, state.reason = "refused", str(e)
            log.error(
                "xenmig: {dst} refused the devices of {domain}: {reason}",
                dst=state.dst,
                domain=state.domain,
                reason=state.reason,
            )
            return -1
        return 0

    def _transfer(self, state: DomainMigration) -> None:
        """In a thread of its own, started at step 2."""
        try:
            state.migration.transfer()
        except BaseException as e:
            state.transferError = e

    def _waitTransfer(self, state: DomainMigration) -> None:
        assert state.worker is not None
        state.worker.join(self.transferTimeout)
        if state.worker.is_alive():
            raise PhaseTimeout(
                f"the device transfer of {state.domain} did not finish within "
                f"{self.transferTimeout:g} s"
            )
        if state.transferError is not None:
            state.reason = str(state.transferError)
            raise state.transferError

    def _abort(self, state: DomainMigration, why: str) -> None:
        """Abort once (called with ``state.lock`` held)."""
        if state.finished == "in doubt":
            raise CommitInDoubt(
                f"the commit of {state.domain}'s migration {state.migrationId} is in "
                f"doubt: do not resume the domain here before asking the target"
            )
        if state.finished or state.migration is None:
            return
        if state.worker is not None:
            state.worker.join(self.transferTimeout)
        try:
            state.migration.abort(why)
        except CommitInDoubt:
            state.finished = "in doubt"
            raise
        except XenmigError as e:
            log.warn(
                "xenmig: aborting {domain}'s migration: {error}",
                domain=state.domain,
                error=str(e),
            )
        state.finished = "aborted"
        state.reason = state.reason or why


def tlsConnector(
    ca: str,
    cert: str,
    key: str | None = None,
    port: int = DEFAULT_PORT,
    resume: bool = True,
    keep: float = 30.0,
) -> Callable[[str], Any]:
    """
    A ``connect`` for L{XendMigrationHooks}: a blocking client for a host name
    over mutual TLS, with this host's certificate (the files are read now).
    Its state streams send from their own threads; with ``resume`` (the
    default, as with the command line) a broken link is reconnected within
    the client's grace instead of ending the migration.  One client per host,
    made at its first migration: it keeps a committed migration's control
    connection ``keep`` seconds for the next one there (0: none).
    """
    from xenmig import tls
    from xenmig.source.blocking import BlockingMigrationClient
    from xenmig.source.client import tlsArguments

    identity = tls.loadIdentity(cert, key)
    authorities = tls.loadAuthority(ca)

    clients: dict[str, BlockingMigrationClient] = {}
    lock = threading.Lock()

    def connect(host: str) -> BlockingMigrationClient:
        with lock:
            if host not in clients:
                arguments = tlsArguments(host, identity, authorities)
                clients[host] = BlockingMigrationClient(
                    host, port, **arguments, resume=resume, keepConnections=keep
                )
            return clients[host]

    return connect


def awaitRestored(
    domName: str,
    stateDir: str = DEFAULT_STATE_DIR,
    timeout: float = 600.0,
    migrationId: str | None = None,
) -> list[str]:
    """
    On the target, before xend unpauses a restored domain: block until its
    migration has committed here; what was installed.

    @raise MigrationAborted: it aborted or did not commit in time: do not run
        the domain (destroy what was restored).
    """
    argv = [
        sys.executable, "-m", "xenmig.cli.main", "await", "--domain", domName,
        "--state-dir", stateDir, "--timeout", f"{timeout:g}", "--json",
    ]  # fmt: skip
    if migrationId:
        argv += ["--migration-id", migrationId]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout + 60, check=False
        )
    except subprocess.TimeoutExpired:
        raise MigrationAborted(f"xenmig await for {domName} did not answer in time")
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        answer = {}
    if done.returncode != 0 or not answer.get("committed"):
        reason = answer.get("reason") or done.stderr.strip() or "no answer"
        raise MigrationAborted(f"{domName} was not restored: {reason}")
    return list(answer.get("installed", []))
