"""
A hypothesis state machine driving a real MigrationTarget, and the guarantees
it keeps whatever the order of commands, faults, crashes and time.

The target is real: its sessions, its journal in a temporary state directory,
its resume gate and on-commit hook, the ``file`` and ``memory`` kinds.  Its
thread pool is stepped by hand (L{SteppedThreads}) and its clock is a
``task.Clock``.  A crash drops the MigrationTarget with its clock and whatever
waited in its pool (those calls never ran), and a new one recovers from the
same state directory.  The machine keeps what the source and the toolstack
were told (L{Told}, L{World.releases}) and, after every step, checks each
guarantee: an invariant named for it that raises its own L{Broken} error.

The base machine (L{TargetMachine}) runs every command to its end before the
next.  Its variants add what the defects found from outside needed to show
(Prepares still in flight, a full disk on cue, a crash inside a commit, more
than one waiter); the minimal sequences at the end are those defects, one
each, kept as regression tests now that they are fixed.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import Phase as HypothesisPhase
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from xenmig.devices.file import fileKind
from xenmig.devices.staging import StagedFile
from xenmig.digest import hashBytes
from xenmig.errors import CommitFailed, InternalError, XenmigError
from xenmig.interfaces import IStagelessDevice
from xenmig.records import encodeData, encodeEnd, encodeStreamHeader
from xenmig.streamreceiver import StreamReceiver
from xenmig.target.config import TargetConfig, Timeouts
from xenmig.target.core import MigrationTarget
from xenmig.target.gate import Release
from xenmig.target.recordfiles import RecordFiles, readRecords
from xenmig.target.session import Phase
from xenmig.testing import MemoryKind, SteppedThreads

#: The thread call the staging fault aims at, named from the function itself: a
#: renamed function fails here, where a fault cued by a stale name never fires.
STAGING_WRITE = StagedFile._writeBatch.__name__

PEER = "source.test"
#: The ids a lone Prepare draws from: few, so that duplicates and reuse happen
#: (whole migrations take fresh ones).  Few domains: busy ones happen too.
IDS = ("m0", "m1", "m2", "m3", "m4", "m5")
DOMAINS = ("vm0", "vm1", "vm2")
TIMEOUTS = Timeouts(
    idle=15.0, prepared=20.0, receiving=40.0, ready=20.0, token=10.0, commit=30.0
)
MAX_SESSIONS = 2
AWAIT_TIMEOUT = 30.0
FINAL = ("COMMITTED", "ABORTED")


def noSpace() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- the guarantees --------------------------------------------------------------------


class Broken(AssertionError):
    """A guarantee of the target was broken; each subclass is one guarantee."""


class TwoUnfinishedSessions(Broken):
    """A domain had two unfinished migrations at once."""


class OverSessionLimit(Broken):
    """More migrations ran at once than --max-sessions allows."""


class IdPreparedTwice(Broken):
    """Two Prepares of one migration id were both accepted."""


class UndeclaredError(Broken):
    """The core failed with an error outside xenmig's (INTERNAL on the wire)."""


class CommittedThenAborted(Broken):
    """A migration told or journalled COMMITTED later read ABORTED."""


class AbortedThenCommitted(Broken):
    """A migration someone was told was ABORTED later read COMMITTED."""


class CommitErrorButCommitted(Broken):
    """Commit answered with an error (the source resumes the VM), yet committed."""


class BrokenStreamCommitted(Broken):
    """A migration one of whose streams was broken (or wrong) committed."""


class InstalledContentWrong(Broken):
    """A committed destination holds other bytes than the source sent."""


class CommitAnswerChanged(Broken):
    """A Commit asked again answered other than the first time."""


class ReleasedTwice(Broken):
    """One commit was handed to a toolstack twice (the VM resumed twice)."""


class ReleaseNotCommitted(Broken):
    """AwaitRestored handed over a migration that is not COMMITTED."""


class InstalledThoughAborted(Broken):
    """A migration that never committed left something at its destinations."""


class InstalledButHidden(Broken):
    """An aborted migration left a destination its record does not list."""


class StagingLeft(Broken):
    """A finished migration left its staging behind."""


class StagingLost(Broken):
    """A running migration's staging was removed under it."""


class AwaitNotAnswered(Broken):
    """AwaitRestored named a finished migration and was not answered at once."""


class CommittingStuck(Broken):
    """A session stayed COMMITTING with nothing left to do."""


class JournalDisagrees(Broken):
    """The journal on disk and the target's answers disagree."""


class PreparedButUnknown(Broken):
    """A migration whose Prepare was answered is unknown to the target."""


class HookNotRun(Broken):
    """A committed migration never ran the on-commit hook."""


class HookRunTwice(Broken):
    """The on-commit hook ran again for one commit, with no restart to excuse it."""


def check(holds: bool, broken: type[Broken], message: str) -> None:
    if not holds:
        raise broken(message)


# -- what the source sent and was told -------------------------------------------------


@dataclass
class Device:
    """One device as the source describes and sends it."""

    kind: str
    name: str
    data: bytes
    refuse: bool = False
    stageless: bool = False  # a memory device that stages nothing

    def description(self, migrationId: str) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.kind == "file":
            params["target"] = destinationName(migrationId, self.name)
        if self.refuse:
            params["refuse"] = "this host will not take it"
        if self.stageless:
            params["stageless"] = True
        return {
            "kind": self.kind,
            "name": self.name,
            "size": len(self.data),
            "precopy": False,
            "params": params,
        }


def destinationName(migrationId: str, device: str) -> str:
    return f"{migrationId}-{device}.img"


@dataclass
class Told:
    """One accepted migration as its source knows it: what it did, what it heard."""

    domain: str
    devices: dict[str, Device]
    streamed: set[str] = field(default_factory=set)
    brokenStream: bool = False  # one was cut off, stalled or had a wrong digest
    commitSent: bool = False
    commitLost: bool = False  # a Commit's answer never came
    #: The source rolled back (an error answer, ABORTED heard): it sends no more.
    gaveUp: bool = False
    committed: bool = False  # told COMMITTED: Commit's answer, or a query
    aborted: bool = False  # told ABORTED: Abort's answer, or a query
    commitRefused: bool = False  # Commit answered with an error
    installed: tuple[str, ...] | None = None  # what Commit answered


@st.composite
def deviceLists(draw: st.DrawFn) -> list[tuple[str, int]]:
    """
    One or two devices: (kind, size); ``refusing`` is a memory device refused,
    ``stageless`` one that stages nothing (no staging directory).
    """
    kinds = st.sampled_from(["memory", "file", "stageless", "file", "refusing"])
    return draw(
        st.lists(st.tuples(kinds, st.integers(1, 3000)), min_size=1, max_size=2)
    )


def makeDevices(migrationId: str, drawn: list[tuple[str, int]]) -> list[Device]:
    devices = []
    for n, (kind, size) in enumerate(drawn):
        name = f"d{n}"
        data = (f"{migrationId}/{name};".encode() * size)[:size]
        refuse, stageless = kind == "refusing", kind == "stageless"
        memory = refuse or stageless
        devices.append(
            Device("memory" if memory else kind, name, data, refuse, stageless)
        )
    return devices


def streamBytes(device: Device, how: str) -> bytes:
    """A device's stream: whole, with a wrong digest, or without its END record."""
    data = device.data
    records = [
        piece
        for offset in range(0, len(data), 1000)
        for piece in encodeData(offset, data[offset : offset + 1000])
    ]
    digest = hashBytes(data)
    sent = digest.digest if how != "wrong digest" else bytes(len(digest.digest))
    end = [] if how in ("cut off", "stalls") else encodeEnd(len(data), "blake3", sent)
    return b"".join([encodeStreamHeader(), *records, *end])


class FailingMemoryKind(MemoryKind):
    """The memory kind, whose devices fail their commit."""

    def target(self, description: Any, context: Any) -> Any:
        device = super().target(description, context)
        device.failCommit = CommitFailed("the device could not load its state")
        return device


# -- the world, which outlives each target ---------------------------------------------


class World:
    """
    What survives a crash of the target: its state directory and allowed
    root on disk, the clock's time, and what the toolstack saw (the hook's
    runs, the releases AwaitRestored answered).
    """

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="xenmig-machine-"))
        self.stateDir = self.base / "state"
        self.root = self.base / "vms"
        self.root.mkdir()
        self.now = 0.0
        self.hookRuns: Counter[str] = Counter()
        #: (the migration id asked for, or None; what was handed over)
        self.releases: list[tuple[str | None, Release]] = []
        #: How many more journal file writes find the state directory full: a
        #: fault inside the journal's thread call, as a full disk's would be.
        self.fullFor = 0
        self._writeJournalFile = RecordFiles.write

        def write(files: RecordFiles, mid: str, data: bytes) -> bool:
            return self.writeJournalFile(files, mid, data)

        RecordFiles.write = write  # type: ignore[method-assign]

    def runHook(self, command: str, env: dict[str, str], migrationId: str) -> Any:
        self.hookRuns[env["XENMIG_MIGRATION_ID"]] += 1
        return succeed(0)

    def destination(self, migrationId: str, device: str) -> Path:
        return self.root / destinationName(migrationId, device)

    def writeJournalFile(self, files: RecordFiles, mid: str, data: bytes) -> bool:
        """The journal's file writes, failing while the directory is full."""
        if self.fullFor:
            self.fullFor -= 1
            raise noSpace()
        return self._writeJournalFile(files, mid, data)

    def journal(self) -> dict[str, dict[str, Any]]:
        """The journal's records on disk, by migration id."""
        records = readRecords(str(self.stateDir / "sessions"))
        return {mid: json.loads(data) for mid, data in records.items()}

    def closeDescriptors(self) -> None:
        """Close what a crashed target held open here, as its process's end would."""
        for name in os.listdir("/proc/self/fd"):
            try:
                held = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                continue
            if held.startswith(str(self.base)):
                os.close(int(name))

    def remove(self) -> None:
        RecordFiles.write = self._writeJournalFile  # type: ignore[method-assign]
        self.closeDescriptors()
        shutil.rmtree(self.base, ignore_errors=True)


def buryTheDead() -> None:
    """
    Finalize now what a crashed target left suspended on thread calls that
    will never run.  Left to the garbage collector they are closed whenever
    it runs, once inside hypothesis's parsing of a later test's source, which
    CPython 3.11 cannot take (SystemError: AST constructor recursion depth
    mismatch).  A coroutine that awaits in its cleanup complains as it is
    closed (RuntimeError, unraisable): a dead process's leftovers, not heard.
    """

    def unraisable(report: Any) -> None:
        if not (
            isinstance(report.exc_value, RuntimeError)
            and "GeneratorExit" in str(report.exc_value)
        ):
            previous(report)

    previous, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous


@pytest.fixture(autouse=True, scope="module")
def frozenHeap() -> Iterator[None]:
    """
    What lives before these tests is frozen out of the garbage collector's
    sight (gc.freeze), so that L{buryTheDead}'s collection after each crash
    looks at the machine's objects only: milliseconds, not tens of them.
    """
    gc.freeze()
    yield
    gc.unfreeze()


def choose(items: list[Any], pick: int) -> Any:
    return sorted(items)[pick % len(items)]


# -- the machine -----------------------------------------------------------------------


class TargetMachine(RuleBasedStateMachine):
    """
    A source, an operator and a toolstack driving one target host, which may
    crash.  Each rule does one thing and lets the target's threads run to
    the end; the variants below leave work in flight.
    """

    #: Prepares are left in flight, their thread calls stepped one by one.
    INTERLEAVED = False
    #: The state directory fills up on cue (the journal's writes fail).
    JOURNAL_FAULTS = False
    #: Memory devices fail their commit, and some come after a file device.
    COMMIT_FAULTS = False
    #: The target dies in the middle of a commit.
    CRASHES_IN_COMMIT = False
    #: The target dies right after AwaitRestored answered.
    CRASHES_AFTER_CLAIM = False
    #: Several toolstack waiters for one domain's next commit at once.
    CONCURRENT_AWAITS = False
    #: Check that AwaitRestored naming a finished migration answers at once;
    #: off until the gate learns of aborted migrations at recovery (see
    #: test_awaitAfterRestart).
    AWAIT_ANSWERS_FINISHED = False

    def __init__(self) -> None:
        super().__init__()
        self.world = World()
        self.told: dict[str, Told] = {}
        self.accepted: Counter[str] = Counter()
        self.undeclared: list[str] = []
        self.answerChanges: list[str] = []
        self.everCommitted: set[str] = set()
        #: Waiters for a domain's next commit (no id) not yet answered.
        self.awaiting: Counter[str] = Counter()
        self.unanswered: list[str] = []
        self.committingSince: dict[str, int] = {}
        self.quietSteps = 0
        self.restarts = 0
        self.freshIds = 0
        self.boot()

    def teardown(self) -> None:
        self.settle()  # nothing left suspended on a thread call
        self.world.remove()

    # -- one target's life -------------------------------------------------------------

    def boot(self) -> None:
        """A target on the state directory: recovered, as twistd starts one."""
        self.clock = task.Clock()
        self.clock.advance(self.world.now)
        self.threads = SteppedThreads()
        self.memory = FailingMemoryKind() if self.COMMIT_FAULTS else MemoryKind()
        config = TargetConfig(
            FilePath(str(self.world.stateDir)),
            allowedRoots=(FilePath(str(self.world.root)),),
            onCommit="resume-the-vm",
            timeouts=TIMEOUTS,
            maxSessions=MAX_SESSIONS,
        )
        kinds: dict[str, Any] = {"file": fileKind, "memory": self.memory}
        self.target = MigrationTarget(
            self.clock, config, kinds, self.threads, runHook=self.world.runHook
        )
        self.target.recover()
        self.clock.advance(0)  # the reactor runs: what recovery left for it
        self.settle()

    def crash(self) -> None:
        """The target dies: what waited in its threads never runs; it starts again."""
        self.world.now = self.clock.seconds()
        self.restarts += 1
        self.awaiting.clear()  # their connections died with the target
        self.threads.crash()
        self.world.closeDescriptors()
        self.boot()
        buryTheDead()

    @property
    def quiet(self) -> bool:
        """No thread-pool call waits: every command has come to its end."""
        return not self.threads.waiting

    def settle(self) -> None:
        self.threads.runAll()

    def call(
        self,
        function: Callable[..., Coroutine[Any, Any, Any] | Deferred[Any]],
        *args: Any,
        answered: Callable[[Any], object] = lambda result: None,
        refused: Callable[[XenmigError], object] = lambda error: None,
    ) -> None:
        """
        Call the core (a coroutine or a Deferred) as a protocol does: ``answered``
        hears its answer, ``refused`` its error (an undeclared one as the
        wire carries it, INTERNAL, and kept for L{everyErrorIsDeclared}).
        """

        def failed(failure: Failure) -> None:
            error = failure.value
            if not isinstance(error, XenmigError):
                self.undeclared.append(f"{function.__name__}: {error!r}")
                error = InternalError(repr(error))  # what the wire makes of it
            refused(error)

        d = maybeDeferred(lambda: ensureDeferred(function(*args)))
        d.addCallbacks(answered, failed)

    def phaseOf(self, migrationId: str) -> str | None:
        """The phase QueryMigration answers, or None for an unknown id."""
        try:
            return str(self.target.query(migrationId)["phase"])
        except XenmigError:
            return None

    # -- the source's commands ---------------------------------------------------------

    @rule(
        mid=st.sampled_from(IDS), domain=st.sampled_from(DOMAINS), drawn=deviceLists()
    )
    def prepare(self, mid: str, domain: str, drawn: list[tuple[str, int]]) -> None:
        self.startPrepare(mid, domain, drawn)
        if not self.INTERLEAVED:
            self.settle()  # else its handlers are still at work when the next comes

    def startPrepare(self, mid: str, domain: str, drawn: list[tuple[str, int]]) -> None:
        devices = makeDevices(mid, drawn)
        told = Told(domain, {device.name: device for device in devices})

        def answered(result: Any) -> None:
            if all(offer.accepted for offer in result[1]):
                self.accepted[mid] += 1
                self.told[mid] = told

        descriptions = [device.description(mid) for device in devices]
        self.call(
            self.target.prepare, PEER, mid, domain, 1, descriptions, answered=answered
        )

    def streamable(self) -> list[tuple[str, str]]:
        return [
            (mid, name)
            for mid, told in self.told.items()
            if not told.gaveUp and not told.commitSent
            for name in told.devices
            if name not in told.streamed
        ]

    @precondition(lambda self: self.streamable())
    @rule(pick=st.integers(0, 20))
    def sendStreams(self, pick: int) -> None:
        """Every device of a migration not yet sent is sent whole."""
        mid, _ = choose(self.streamable(), pick)
        for name in sorted(self.told[mid].devices):
            self.send(mid, name, "whole")
        self.settle()

    @precondition(lambda self: self.streamable())
    @rule(
        pick=st.integers(0, 20),
        how=st.sampled_from(["wrong digest", "cut off", "stalls"]),
    )
    def sendABrokenStream(self, pick: int, how: str) -> None:
        mid, name = choose(self.streamable(), pick)
        self.send(mid, name, how)
        self.settle()

    def send(self, mid: str, name: str, how: str) -> None:
        """A device's stream, through StartStream's receiver, as ``how`` says."""
        told = self.told[mid]
        if name in told.streamed:
            return
        told.streamed.add(name)
        told.brokenStream |= how != "whole"
        try:
            token = self.target.openStream(PEER, mid, name)
            session, device = self.target.claimToken(PEER, token)
        except XenmigError:
            return
        receiver = StreamReceiver(
            session, device, TIMEOUTS.idle, self.target.chargeStream(mid)
        )
        receiver.makeConnection(StringTransport())
        receiver.dataReceived(streamBytes(told.devices[name], how))
        if how == "cut off":
            receiver.connectionLost(Failure(ConnectionDone("the source went away")))

    @rule(
        drawn=deviceLists(),
        how=st.sampled_from(["whole", "whole", "whole", "wrong digest"]),
        lost=st.booleans(),
        awaited=st.booleans(),
    )
    def migrate(
        self, drawn: list[tuple[str, int]], how: str, lost: bool, awaited: bool
    ) -> None:
        """
        A whole migration of an idle domain: Prepare, every stream (the first
        maybe corrupt), Commit (its answer maybe lost); the toolstack may await
        the domain's next commit meanwhile.
        """
        mid = self.freshMigration(drawn, how)
        if mid is not None:
            if awaited:
                self.startAwait(self.told[mid].domain, None)
            self.commitAndHear(mid, lost)

    def freshMigration(
        self, drawn: list[tuple[str, int]], how: str = "whole"
    ) -> str | None:
        """
        A migration under an id never used, of a domain with nothing running,
        its devices all accepted, prepared and every stream sent (the first
        as ``how`` says); its id.
        """
        busy = {
            s.domain
            for s in self.target.sessions.values()
            if s.phase.value not in FINAL
        }
        free = [domain for domain in DOMAINS if domain not in busy]
        if not free:
            return None
        mid = self.newId()
        accepted = [("memory" if kind == "refusing" else kind, n) for kind, n in drawn]
        return mid if self.prepareAndSend(mid, free[0], accepted, how) else None

    def newId(self) -> str:
        """A migration id never used here (the ids of L{IDS} collide on purpose)."""
        self.freshIds += 1
        return f"f{self.freshIds}"

    def prepareAndSend(
        self, mid: str, domain: str, drawn: list[tuple[str, int]], how: str = "whole"
    ) -> bool:
        """
        Prepare and, if it is accepted, send every stream, the first as ``how``
        says and the others whole; whether it was accepted.
        """
        before = self.told.get(mid)
        self.prepare(mid, domain, drawn)
        self.settle()
        if self.told.get(mid) in (None, before):
            return False
        for n, name in enumerate(sorted(self.told[mid].devices)):
            self.send(mid, name, how if n == 0 else "whole")
        self.settle()
        return True

    def committable(self) -> list[str]:
        return [mid for mid, told in self.told.items() if not told.gaveUp]

    @precondition(lambda self: self.committable())
    @rule(pick=st.integers(0, 20), lost=st.booleans())
    def commit(self, pick: int, lost: bool) -> None:
        self.commitAndHear(choose(self.committable(), pick), lost)

    def commitAndHear(self, mid: str, lost: bool) -> None:
        """Commit; an answer lost on the way makes the source ask instead."""
        self.startCommit(mid, lost)
        self.settle()
        if lost:
            self.ask(mid)

    def startCommit(self, mid: str, lost: bool) -> None:
        told = self.told[mid]
        told.commitSent = True
        told.commitLost |= lost

        def answered(installed: list[str]) -> None:
            if lost:
                return
            if told.installed is not None and tuple(installed) != told.installed:
                self.answerChanges.append(f"{mid}: {told.installed} then {installed}")
            told.committed, told.installed = True, tuple(installed)

        def refused(error: XenmigError) -> None:
            if not lost:
                told.commitRefused = True
                self.giveUp(mid, f"the commit failed: {error}")

        self.call(self.target.commit, PEER, mid, answered=answered, refused=refused)

    def ask(self, mid: str) -> None:
        """QueryMigration, as a source whose commit is in doubt asks."""
        told, phase = self.told[mid], self.phaseOf(mid)
        if phase == "COMMITTED":
            told.committed = True
        elif phase == "ABORTED":
            told.aborted = told.gaveUp = True

    def giveUp(self, mid: str, reason: str) -> None:
        """The source rolls back and sends Abort, best effort."""
        self.told[mid].gaveUp = True
        self.abortAs(PEER, mid, reason)

    def abortAs(self, peer: str | None, mid: str, reason: str) -> None:
        def answered(phase: str) -> None:
            self.told[mid].aborted |= phase == "ABORTED"

        self.call(self.target.abort, peer, mid, reason, answered=answered)

    @precondition(lambda self: self.told)
    @rule(pick=st.integers(0, 20), locally=st.booleans())
    def abort(self, pick: int, locally: bool) -> None:
        """Abort from the source, or on the local socket (``xenmig abort``)."""
        mid = choose(list(self.told), pick)
        if locally:
            self.abortAs(None, mid, "the operator said so")
        else:
            self.giveUp(mid, "the source gave up")
        self.settle()

    @precondition(lambda self: self.told)
    @rule(pick=st.integers(0, 20))
    def loseControlConnection(self, pick: int) -> None:
        self.target.controlConnectionLost(PEER, [choose(list(self.told), pick)])
        self.settle()

    @precondition(lambda self: self.told)
    @rule(pick=st.integers(0, 20))
    def query(self, pick: int) -> None:
        mid = choose(list(self.told), pick)
        if self.told[mid].commitSent:
            self.ask(mid)

    # -- the toolstack, the operator, time and crashes ---------------------------------

    @rule(pick=st.integers(0, 20), byId=st.booleans())
    def awaitRestored(self, pick: int, byId: bool) -> None:
        """AwaitRestored for a migration's domain's next commit, or for it by id."""
        if not self.told:
            self.startAwait(DOMAINS[pick % len(DOMAINS)], None)
        else:
            mid = choose(list(self.told), pick)
            self.startAwait(self.told[mid].domain, mid if byId else None)
        self.settle()

    def startAwait(self, domain: str, mid: str | None) -> None:
        """AwaitRestored; what it hands over goes to L{World.releases}."""
        if mid is None:
            if self.awaiting[domain] and not self.CONCURRENT_AWAITS:
                return  # this toolstack waits for a domain's next commit once
            self.awaiting[domain] += 1
        incarnation = self.restarts

        def released(release: Release) -> None:
            self.world.releases.append((mid, release))
            answered()

        def failed(failure: Failure) -> None:
            if not isinstance(failure.value, XenmigError):
                self.undeclared.append(f"awaitRestored: {failure.value!r}")
            answered()

        def answered() -> None:
            if mid is None and incarnation == self.restarts:
                self.awaiting[domain] -= 1

        phase = None if mid is None else self.phaseOf(mid)
        d = self.target.awaitRestored(domain, AWAIT_TIMEOUT, mid)
        if phase in FINAL and not d.called:
            self.unanswered.append(f"{mid}, {phase}")
        d.addCallbacks(released, failed)

    @rule(seconds=st.sampled_from([1.0, 1.0, 6.0, 11.0, 16.0, 21.0, 41.0]))
    def passTime(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()

    @precondition(lambda self: self.quiet and self.restarts < 3)
    @rule()
    def restart(self) -> None:
        """The daemon is killed between commands and started again."""
        self.crash()

    @precondition(lambda self: STAGING_WRITE not in self.threads.cued)
    @rule()
    def fillTheDisk(self) -> None:
        """The next write of staged state finds the filesystem full."""
        self.threads.failNext(STAGING_WRITE, noSpace())

    # -- faults the variants add -------------------------------------------------------

    @precondition(lambda self: self.INTERLEAVED and not self.quiet)
    @rule(count=st.integers(1, 4))
    def stepThreads(self, count: int) -> None:
        for _ in range(count):
            if self.threads.waiting:
                self.threads.run()

    @precondition(lambda self: self.JOURNAL_FAULTS and not self.world.fullFor)
    @rule()
    def fillTheStateDirectory(self) -> None:
        """The journal's next file write finds the state directory full."""
        self.world.fullFor = 1

    # -- what the variants add, around a fresh migration ------------------------------

    @precondition(lambda self: self.JOURNAL_FAULTS)
    @rule(drawn=deviceLists(), full=st.sampled_from(["at Prepare", "at Commit"]))
    def migrateOnAFullStateDirectory(
        self, drawn: list[tuple[str, int]], full: str
    ) -> None:
        """A migration whose Prepare, or Commit, finds the state directory full."""
        if full == "at Prepare":
            self.fillTheStateDirectory()
        mid = self.freshMigration(drawn)
        if mid is not None:
            self.fillTheStateDirectory()
            self.commitAndHear(mid, lost=False)

    @precondition(lambda self: self.CRASHES_IN_COMMIT)
    @rule(drawn=deviceLists(), steps=st.integers(1, 5), asked=st.booleans())
    def crashDuringCommit(
        self, drawn: list[tuple[str, int]], steps: int, asked: bool
    ) -> None:
        """
        A migration whose target dies after ``steps`` of its commit's thread
        calls; the source, its answer lost, may have asked (QueryMigration).
        """
        mid = self.freshMigration(drawn)
        if mid is None:
            return
        self.startCommit(mid, lost=True)
        for _ in range(steps):
            if self.threads.waiting:
                self.threads.run()
        if asked:
            self.ask(mid)
        self.crash()

    @precondition(lambda self: self.COMMIT_FAULTS)
    @rule(drawn=deviceLists())
    def migrateWithAFailingDevice(self, drawn: list[tuple[str, int]]) -> None:
        """A migration whose last device, a memory one, fails its commit."""
        mid = self.freshMigration([*drawn, ("memory", 64)])
        if mid is not None:
            self.commitAndHear(mid, lost=False)

    @precondition(lambda self: self.CONCURRENT_AWAITS)
    @rule(drawn=deviceLists())
    def twoWaitersThenMigrate(self, drawn: list[tuple[str, int]]) -> None:
        """Two toolstack waiters for a domain's next commit; then one commits."""
        for domain in DOMAINS:
            self.startAwait(domain, None)
            self.startAwait(domain, None)
        mid = self.freshMigration(drawn)
        if mid is not None:
            self.commitAndHear(mid, lost=False)

    @precondition(lambda self: self.AWAIT_ANSWERS_FINISHED)
    @rule(drawn=deviceLists())
    def abortRestartAndAwait(self, drawn: list[tuple[str, int]]) -> None:
        """A migration aborts, the target restarts, a toolstack awaits it by id."""
        mid = self.freshMigration(drawn)
        if mid is not None:
            self.abortAs(None, mid, "the operator said so")
            self.settle()
            self.crash()
            self.startAwait(self.told[mid].domain, mid)
            self.settle()

    @precondition(lambda self: self.CRASHES_AFTER_CLAIM)
    @rule(drawn=deviceLists())
    def crashAfterAClaim(self, drawn: list[tuple[str, int]]) -> None:
        """
        A migration commits, a toolstack's AwaitRestored takes it, the target
        dies right after, and the toolstack, started again, waits again.
        """
        mid = self.freshMigration(drawn)
        if mid is None:
            return
        self.commitAndHear(mid, lost=False)
        domain, releases = self.told[mid].domain, len(self.world.releases)
        self.startAwait(domain, None)
        if len(self.world.releases) > releases:  # answered, so claimed
            self.crash()
            self.startAwait(domain, None)
        self.settle()

    @precondition(lambda self: self.INTERLEAVED)
    @rule(
        mids=st.lists(st.sampled_from(IDS), min_size=2, max_size=3),
        domains=st.lists(st.sampled_from(DOMAINS), min_size=3, max_size=3),
        drawn=deviceLists(),
    )
    def preparesTogether(
        self, mids: list[str], domains: list[str], drawn: list[tuple[str, int]]
    ) -> None:
        """Several Prepares arrive before the first's handlers are done."""
        for mid, domain in zip(mids, domains, strict=False):
            self.startPrepare(mid, domain, drawn)
        self.settle()

    # -- the guarantees, after every step ----------------------------------------------

    @invariant()
    def noDomainHasTwoUnfinishedMigrations(self) -> None:
        running = Counter(
            s.domain
            for s in self.target.sessions.values()
            if s.phase.value not in FINAL
        )
        busy = [domain for domain, count in running.items() if count > 1]
        check(not busy, TwoUnfinishedSessions, f"domains {busy} migrate twice at once")

    @invariant()
    def sessionsStayWithinTheLimit(self) -> None:
        running = [
            s for s in self.target.sessions.values() if s.phase.value not in FINAL
        ]
        check(
            len(running) <= MAX_SESSIONS,
            OverSessionLimit,
            f"{len(running)} migrations run at once, the limit is {MAX_SESSIONS}",
        )

    @invariant()
    def eachIdIsPreparedOnce(self) -> None:
        twice = [mid for mid, count in self.accepted.items() if count > 1]
        check(not twice, IdPreparedTwice, f"Prepare of {twice} accepted twice")

    @invariant()
    def everyErrorIsDeclared(self) -> None:
        check(not self.undeclared, UndeclaredError, "; ".join(self.undeclared))

    @invariant()
    def preparedMigrationsAreKnown(self) -> None:
        unknown = [mid for mid in self.told if self.phaseOf(mid) is None]
        check(not unknown, PreparedButUnknown, f"{unknown} answered, then unknown")

    @invariant()
    def committedNeverAborts(self) -> None:
        journal = self.world.journal()
        self.everCommitted |= {
            m for m, r in journal.items() if r["phase"] == "COMMITTED"
        }
        self.everCommitted |= {m for m, told in self.told.items() if told.committed}
        for mid in self.everCommitted:
            phase = self.phaseOf(mid)
            check(
                phase == "COMMITTED",
                CommittedThenAborted,
                f"{mid} was COMMITTED (told or journalled) and now reads {phase}",
            )

    @invariant()
    def abortedNeverCommits(self) -> None:
        for mid, told in self.told.items():
            if told.aborted:
                check(
                    self.phaseOf(mid) == "ABORTED",
                    AbortedThenCommitted,
                    f"{mid} was told ABORTED and now reads {self.phaseOf(mid)}",
                )

    @invariant()
    def aCommitErrorMeansNotCommitted(self) -> None:
        for mid, told in self.told.items():
            if told.commitRefused:
                check(
                    self.phaseOf(mid) != "COMMITTED",
                    CommitErrorButCommitted,
                    f"Commit of {mid} was answered with an error, yet it committed",
                )

    @invariant()
    def aBrokenStreamNeverCommits(self) -> None:
        for mid, told in self.told.items():
            if told.brokenStream:
                check(
                    self.phaseOf(mid) != "COMMITTED",
                    BrokenStreamCommitted,
                    f"{mid} committed though a stream of it was broken",
                )

    @precondition(lambda self: self.quiet)
    @invariant()
    def committedIsWhatWasSent(self) -> None:
        for mid, told in self.told.items():
            if self.phaseOf(mid) != "COMMITTED":
                continue
            for name, device in told.devices.items():
                if device.kind == "file":
                    destination = self.world.destination(mid, name)
                    held = destination.read_bytes() if destination.exists() else None
                else:  # the device that committed (none: before a restart)
                    held = next(
                        (
                            bytes(d.data)
                            for d in self.memory.targets
                            if d.committed
                            and (d.context.migrationId, d.description.name)
                            == (mid, name)
                        ),
                        device.data,
                    )
                check(
                    held == device.data,
                    InstalledContentWrong,
                    f"{mid}'s device {name} committed other bytes than were sent",
                )

    @invariant()
    def aCommitAskedAgainAnswersTheSame(self) -> None:
        check(not self.answerChanges, CommitAnswerChanged, str(self.answerChanges))

    @invariant()
    def eachCommitIsReleasedOnce(self) -> None:
        claims = Counter(r.migrationId for asked, r in self.world.releases if not asked)
        twice = [mid for mid, count in claims.items() if count > 1]
        check(not twice, ReleasedTwice, f"the commits of {twice} were claimed twice")

    @precondition(lambda self: self.AWAIT_ANSWERS_FINISHED)
    @invariant()
    def aFinishedMigrationIsAnsweredAtOnce(self) -> None:
        check(
            not self.unanswered,
            AwaitNotAnswered,
            f"AwaitRestored waited for finished migrations: {self.unanswered}",
        )

    @precondition(lambda self: self.quiet)
    @invariant()
    def onlyCommitsAreReleased(self) -> None:
        for _, release in self.world.releases:
            phase = self.phaseOf(release.migrationId)
            check(
                phase == "COMMITTED",
                ReleaseNotCommitted,
                f"AwaitRestored released {release.migrationId}, which is {phase}",
            )

    def installed(self, mid: str) -> set[str]:
        """The destinations of ``mid``'s file devices that exist."""
        return {
            os.path.realpath(self.world.destination(mid, name))
            for name, device in self.told[mid].devices.items()
            if device.kind == "file" and self.world.destination(mid, name).exists()
        }

    @precondition(lambda self: self.quiet)
    @invariant()
    def whatNeverCommittedInstallsNothing(self) -> None:
        for mid, told in self.told.items():
            if self.phaseOf(mid) != "ABORTED":
                continue
            if told.commitLost or (told.commitSent and not told.commitRefused):
                continue  # a commit in doubt: see abortedListsWhatItInstalled
            memory = [
                d.description.name
                for d in self.memory.targets
                if d.context.migrationId == mid and d.committed
            ]
            found = sorted(self.installed(mid)) + memory
            check(
                not found,
                InstalledThoughAborted,
                f"{mid} is ABORTED (its Commit "
                f"{'answered an error' if told.commitRefused else 'never sent'}) "
                f"and installed {found}",
            )

    @precondition(lambda self: self.quiet)
    @invariant()
    def abortedListsWhatItInstalled(self) -> None:
        for mid in self.told:
            if self.phaseOf(mid) == "ABORTED":
                listed = set(self.target.query(mid)["installed"])
                hidden = sorted(self.installed(mid) - listed)
                check(
                    not hidden,
                    InstalledButHidden,
                    f"{mid} is ABORTED, installed {hidden} and lists {sorted(listed)}",
                )

    @precondition(lambda self: self.quiet)
    @invariant()
    def finishedLeavesNoStaging(self) -> None:
        staging = self.world.stateDir / "staging"
        for status in self.target.list(200):
            mid = status["migration_id"]
            if status["phase"] in FINAL:
                check(
                    not (staging / mid).exists(),
                    StagingLeft,
                    f"{mid} is {status['phase']} and its staging is still there",
                )

    @precondition(lambda self: self.quiet)
    @invariant()
    def runningMigrationsKeepTheirStaging(self) -> None:
        staging = self.world.stateDir / "staging"
        for mid, session in self.target.sessions.items():
            if session.phase.value in FINAL or session.phase is Phase.COMMITTING:
                continue
            for name, slot in session.devices.items():  # each that stages
                check(
                    IStagelessDevice.providedBy(slot.device)
                    or (staging / mid / name).is_dir(),
                    StagingLost,
                    f"{mid} is {session.phase.value} and the staging of {name} is gone",
                )

    @precondition(lambda self: self.quiet)
    @invariant()
    def committingIsBrief(self) -> None:
        self.quietSteps += 1
        committing = {
            mid
            for mid, s in self.target.sessions.items()
            if s.phase is Phase.COMMITTING
        }
        for mid in list(self.committingSince):
            if mid not in committing:
                del self.committingSince[mid]
        for mid in committing:
            since = self.committingSince.setdefault(mid, self.quietSteps)
            check(
                self.quietSteps - since < 2,
                CommittingStuck,
                f"{mid} is COMMITTING with no work left, since {since} steps",
            )

    @precondition(lambda self: self.quiet)
    @invariant()
    def journalAgreesWithTheAnswers(self) -> None:
        # what the directory had no room for stays due, to be written before any
        # later record (doc/sessions.md): the journal is the files and those
        journal = self.world.journal()
        for mid, data in self.target.journal._due.items():
            journal[mid] = json.loads(data)
        # A noted change (RECEIVING, READY) is written within a second: until
        # then the file holds a phase that a restart treats the same way.
        unfinished = {"PREPARED", "RECEIVING", "READY"}
        for mid, data in self.target.journal._noted.items():
            noted, before = json.loads(data), journal.get(mid, {}).get("phase")
            check(
                noted["phase"] in unfinished - {"PREPARED"} and before in unfinished,
                JournalDisagrees,
                f"{mid}: {noted['phase']} is only noted, over {before} on disk",
            )
            journal[mid] = noted
        answers = {s["migration_id"]: s for s in self.target.list(200)}
        for mid in sorted(set(journal) | set(answers)):
            onDisk, answer = journal.get(mid, {}), answers.get(mid, {})
            check(
                (onDisk.get("phase"), onDisk.get("installed"))
                == (answer.get("phase"), answer.get("installed")),
                JournalDisagrees,
                f"{mid}: the journal holds {onDisk.get('phase')} "
                f"{onDisk.get('installed')}, the target answers {answer.get('phase')} "
                f"{answer.get('installed')}",
            )

    @precondition(lambda self: self.quiet)
    @invariant()
    def theHookRunsForEachCommit(self) -> None:
        """At least once; again only after a restart."""
        for mid, record in self.world.journal().items():
            if record["phase"] != "COMMITTED":
                continue
            runs = self.world.hookRuns[mid]
            check(runs > 0, HookNotRun, f"{mid} committed and its hook never ran")
            check(
                runs <= 1 + self.restarts,
                HookRunTwice,
                f"{mid}'s hook ran {runs} times, with {self.restarts} restarts",
            )


# -- the configurations ----------------------------------------------------------------


def machineSettings(shrink: bool = True, examples: int = 60) -> settings:
    """
    Bounded and reproducible: a fixed number of examples (times
    XENMIG_MACHINE_SCALE), derandomized, no database.  A configuration that
    that once failed does not shrink, to keep its time down: its minimal
    sequence is written out below.
    """
    scale = float(os.environ.get("XENMIG_MACHINE_SCALE", "1"))
    return settings(
        max_examples=max(1, int(examples * scale)),
        stateful_step_count=25,
        deadline=None,
        derandomize=True,
        database=None,
        report_multiple_bugs=False,
        phases=ALL_PHASES if shrink else NO_SHRINKING,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


ALL_PHASES = (
    HypothesisPhase.explicit,
    HypothesisPhase.generate,
    HypothesisPhase.shrink,
)
NO_SHRINKING = (HypothesisPhase.explicit, HypothesisPhase.generate)


class InterleavedPrepares(TargetMachine):
    INTERLEAVED = True


class FullStateDirectory(TargetMachine):
    JOURNAL_FAULTS = True


class FailingDeviceCommits(TargetMachine):
    COMMIT_FAULTS = True


class CrashesInCommit(TargetMachine):
    CRASHES_IN_COMMIT = True


class CrashesAfterClaim(TargetMachine):
    CRASHES_AFTER_CLAIM = True


class ConcurrentAwaits(TargetMachine):
    CONCURRENT_AWAITS = True


class AwaitAfterRestart(TargetMachine):
    AWAIT_ANSWERS_FINISHED = True


def test_targetCore() -> None:
    """Commands one at a time, with faults and restarts between them: all hold."""
    run_state_machine_as_test(TargetMachine, settings=machineSettings())


def test_interleavedPrepares() -> None:
    """Prepares whose handlers are still at work when more commands come."""
    run_state_machine_as_test(InterleavedPrepares, settings=machineSettings(False, 30))


def test_fullStateDirectory() -> None:
    """The journal's writes fail on cue (a full or failing state directory)."""
    run_state_machine_as_test(FullStateDirectory, settings=machineSettings(False, 30))


def test_failingDeviceCommits() -> None:
    """Memory devices fail their commit."""
    run_state_machine_as_test(FailingDeviceCommits, settings=machineSettings(False, 30))


def test_crashesInCommit() -> None:
    """The target dies in the middle of a commit."""
    run_state_machine_as_test(CrashesInCommit, settings=machineSettings(False, 30))


def test_crashesAfterClaim() -> None:
    """The target dies right after AwaitRestored answered."""
    run_state_machine_as_test(CrashesAfterClaim, settings=machineSettings(False, 30))


def test_concurrentAwaits() -> None:
    """Two toolstack waiters for one domain's next commit."""
    run_state_machine_as_test(ConcurrentAwaits, settings=machineSettings(False, 30))


def test_awaitAfterRestart() -> None:
    """AwaitRestored naming a finished migration is answered at once, restarts too."""
    run_state_machine_as_test(AwaitAfterRestart, settings=machineSettings(False, 30))


# -- the defects, each in its minimal sequence -----------------------------------------

MEMORY = [("memory", 64)]
FILE = [("file", 64)]


def replay(
    machine: TargetMachine,
    guarantees: list[Callable[[TargetMachine], None]],
    *steps: Callable[[TargetMachine], object],
) -> None:
    """Play ``steps`` on ``machine``, checking ``guarantees`` after each."""
    try:
        for step in steps:
            step(machine)
            for guarantee in guarantees:
                guarantee(machine)
    finally:
        machine.teardown()


def untilCommittedInMemory(machine: TargetMachine) -> None:
    """
    Run m0's commit's thread calls until the target answers COMMITTED: on
    main, while its journal write still waits.
    """
    while machine.phaseOf("m0") != "COMMITTED" and machine.threads.waiting:
        machine.threads.run()


def test_concurrentPreparesOfOneDomain() -> None:
    """Two Prepares of one domain, the second before the first's handlers are done."""
    replay(
        InterleavedPrepares(),
        [TargetMachine.noDomainHasTwoUnfinishedMigrations],
        lambda m: m.prepare("m0", "vm0", MEMORY),
        lambda m: m.prepare("m1", "vm0", MEMORY),
        TargetMachine.settle,
    )


def test_concurrentPreparesBeyondTheLimit() -> None:
    """Three Prepares at once on a host that takes two."""
    replay(
        InterleavedPrepares(),
        [TargetMachine.sessionsStayWithinTheLimit],
        lambda m: m.prepare("m0", "vm0", MEMORY),
        lambda m: m.prepare("m1", "vm1", MEMORY),
        lambda m: m.prepare("m2", "vm2", MEMORY),
        TargetMachine.settle,
    )


def test_concurrentPreparesOfOneId() -> None:
    """Two Prepares of one id: the second, refused, removes the first's staging."""
    replay(
        InterleavedPrepares(),
        [TargetMachine.runningMigrationsKeepTheirStaging],
        lambda m: m.prepare("m0", "vm0", FILE),
        lambda m: m.prepare("m0", "vm1", FILE),
        TargetMachine.settle,
    )


def test_fullStateDirectoryAtPrepare() -> None:
    """Prepare on a full state directory: INTERNAL, and a session nobody journalled."""
    replay(
        FullStateDirectory(),
        [TargetMachine.everyErrorIsDeclared, TargetMachine.journalAgreesWithTheAnswers],
        TargetMachine.fillTheStateDirectory,
        lambda m: m.prepare("m0", "vm0", MEMORY),
    )


def test_fullStateDirectoryAtCommit() -> None:
    """Commit on a full state directory: the session stays COMMITTING for good."""
    replay(
        FullStateDirectory(),
        [TargetMachine.committingIsBrief],
        lambda m: m.prepareAndSend("m0", "vm0", MEMORY),
        TargetMachine.fillTheStateDirectory,
        lambda m: m.commit(0, lost=False),
        lambda m: m.passTime(41.0),
        lambda m: m.passTime(41.0),
    )


def test_committedInMemoryBeforeDurable() -> None:
    """
    The journal's COMMITTED write fails: Commit answers an error (the source
    resumes the VM) while the target answers COMMITTED and released nothing.
    """
    replay(
        FullStateDirectory(),
        [TargetMachine.aCommitErrorMeansNotCommitted],
        lambda m: m.prepareAndSend("m0", "vm0", MEMORY),
        lambda m: m.startCommit("m0", lost=False),
        untilCommittedInMemory,
        TargetMachine.fillTheStateDirectory,
        TargetMachine.settle,
    )


def test_failedCommitLeavesEarlierDevicesInstalled() -> None:
    """A device failing its commit after a file device installed: the file stays."""
    replay(
        FailingDeviceCommits(),
        [TargetMachine.whatNeverCommittedInstallsNothing],
        lambda m: m.migrateWithAFailingDevice(FILE),
    )


def test_crashWhileCommittedOnlyInMemory() -> None:
    """
    A source asks (QueryMigration) while COMMITTED is not yet journalled and
    hears COMMITTED; the target dies and, restarted, answers ABORTED.
    """
    replay(
        CrashesInCommit(),
        [TargetMachine.committedNeverAborts],
        lambda m: m.prepareAndSend("m0", "vm0", MEMORY),
        lambda m: m.startCommit("m0", lost=True),
        untilCommittedInMemory,
        lambda m: m.ask("m0"),
        TargetMachine.crash,
    )


def test_crashHidesAnInstalledFile() -> None:
    """The target dies right after installing a file: ABORTED, installed: nothing."""
    replay(
        CrashesInCommit(),
        [TargetMachine.abortedListsWhatItInstalled],
        lambda m: m.crashDuringCommit(FILE, steps=2, asked=False),
    )


def test_crashBeforeTheHook() -> None:
    """The target dies after COMMITTED is journalled, before the on-commit hook."""
    replay(
        CrashesInCommit(),
        [TargetMachine.theHookRunsForEachCommit],
        lambda m: m.crashDuringCommit(MEMORY, steps=3, asked=False),
    )


def test_crashAfterAClaim() -> None:
    """AwaitRestored answered, the target dies before the claim is journalled."""
    replay(
        CrashesAfterClaim(),
        [TargetMachine.eachCommitIsReleasedOnce],
        lambda m: m.crashAfterAClaim(MEMORY),
    )


def test_twoWaitersOneCommit() -> None:
    """Two AwaitRestored for a domain's next commit: both get the one commit."""
    replay(
        ConcurrentAwaits(),
        [TargetMachine.eachCommitIsReleasedOnce],
        lambda m: m.twoWaitersThenMigrate(MEMORY),
    )


def test_awaitAnAbortedMigrationAfterRestart() -> None:
    """AwaitRestored naming a migration aborted before a restart waits, not fails."""
    replay(
        AwaitAfterRestart(),
        [TargetMachine.aFinishedMigrationIsAnsweredAtOnce],
        lambda m: m.prepare("m0", "vm0", MEMORY),
        lambda m: m.abort(0, locally=True),
        TargetMachine.restart,
        lambda m: m.awaitRestored(0, byId=True),
    )
