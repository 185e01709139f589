"""
The commit: write-ahead journal, reversal, recovery, the at-least-once hook,
and the source that never guesses.  Faults are injected at the journal's
write; one test fills a real (tmpfs) state directory; one kills a real daemon
between two devices' installs.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test import iosim
from zope.interface import implementer
from zope.interface.verify import verifyObject

from xenmig import amp_commands as commands
from xenmig.digest import hashBytes
from xenmig.errors import (
    CommitFailed,
    CommitInDoubt,
    InternalError,
    InvalidTransition,
    JournalUnavailable,
    MigrationAborted,
    NotAuthorized,
    PhaseTimeout,
)
from xenmig.interfaces import IInstallingDevice, ITargetDevice
from xenmig.model import DeviceDescription
from xenmig.protocol import ControlProtocol
from xenmig.records import DataRecord, EndRecord
from xenmig.source.phase import Phase as SourcePhase
from xenmig.target.config import TargetConfig, Timeouts
from xenmig.target.core import MigrationTarget
from xenmig.target.installs import Install, InstallState, identityOf
from xenmig.target.journal import NOTE_DELAY, Journal
from xenmig.target.recordfiles import SPARES, RecordFiles, readRecords
from xenmig.target.session import Phase
from xenmig.testing import MemoryKind, MemoryTarget

PEER = "source.test"
STATE = b"abc"


# -- a target whose devices install files ----------------------------------------------


@implementer(ITargetDevice, IInstallingDevice)
class PlacingTarget(MemoryTarget):
    """A memory device whose commit puts its state in a file (``at=NAME``)."""

    def __init__(self, description: DeviceDescription, context: Any) -> None:
        super().__init__(description, context)
        self.destination = context.resolveDestination(description.params["at"])

    #: The commit never returns (the daemon stops in the middle of it).
    hang = False

    def commit(self) -> Deferred[list[str]]:
        if self.failCommit is not None:
            raise self.failCommit
        if self.hang:
            return Deferred()
        part = self.destination.siblingExtension(".part")
        part.setContent(bytes(self.data))
        os.rename(part.path, self.destination.path)
        self.committed = True
        return succeed([self.destination.path])


class PlacingKind(MemoryKind):
    kind = "placing"

    def target(self, description: DeviceDescription, context: Any) -> PlacingTarget:
        device = PlacingTarget(description, context)
        self.targets.append(device)
        return device


class FaultyDisk:
    """The journal's writer, failing on cue as a full (or broken) state directory."""

    def __init__(self) -> None:
        self.real: Callable[[RecordFiles, str, bytes], bool] = RecordFiles.write
        self.writes = 0
        self.failAt: set[int] = set()
        self.full = False
        self.errno = errno.ENOSPC

    def __call__(self, files: RecordFiles, migrationId: str, data: bytes) -> bool:
        self.writes += 1
        if self.full or self.writes in self.failAt:
            raise OSError(self.errno, os.strerror(self.errno))
        return self.real(files, migrationId, data)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> FaultyDisk:
    faulty = FaultyDisk()
    monkeypatch.setattr(RecordFiles, "write", lambda files, *args: faulty(files, *args))
    return faulty


class Hooks:
    """A hook runner that records each run; each run ends when the test says."""

    def __init__(self) -> None:
        self.runs: list[tuple[dict[str, str], Deferred[int]]] = []

    def __call__(self, command: str, env: dict[str, str], mid: str) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.runs.append((env, d))
        return d


class Host:
    """A target in memory on a state directory that outlives it (restarts)."""

    def __init__(self, root: Path, state: Path | None = None) -> None:
        self.state = state or root / "state"
        self.dest = root / "dest"
        self.dest.mkdir(parents=True, exist_ok=True)
        self.clock = task.Clock()
        self.kind = PlacingKind()
        self.hooks = Hooks()
        self.target = self.start()

    def start(self) -> MigrationTarget:
        """A target (again) on the same state directory, recovered."""
        self.clock = task.Clock()
        self.hooks = Hooks()
        config = TargetConfig(
            FilePath(str(self.state)),
            allowedRoots=(FilePath(str(self.dest)),),
            onCommit="tell the toolstack",
            timeouts=Timeouts(commit=5),
        )
        self.target = MigrationTarget(
            self.clock, config, {"placing": self.kind}, maybeDeferred, self.hooks
        )
        self.target.recover()
        return self.target

    def ready(self, mid: str = "m1", names: tuple[str, ...] = ("a", "b")) -> Any:
        """Prepare ``mid`` of vm1 and deliver every device: READY."""
        devices = [placing(name) for name in names]
        result(self.target.prepare(PEER, mid, "vm1", 1, devices))
        session = self.target.sessions[mid]
        for name in names:
            session.streamStarted(name)
            session.recordReceived(name, DataRecord(0, STATE))
            digest = hashBytes(STATE)
            session.streamEnded(name, EndRecord(digest.size, "blake3", digest.digest))
        assert session.phase is Phase.READY
        return session

    def commit(self, mid: str = "m1") -> Any:
        return result(self.target.commit(PEER, mid))

    def journal(self, mid: str = "m1") -> dict[str, Any]:
        return json.loads(readRecords(str(self.state / "sessions"))[mid])

    def installed(self) -> list[str]:
        return sorted(p.name for p in self.dest.iterdir())


def result(work: Any) -> Any:
    """The result of work that finishes at once (a coroutine or Deferred)."""
    d = Deferred.fromCoroutine(work) if not isinstance(work, Deferred) else work
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the work waited for something"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def failure(work: Any) -> BaseException:
    """The exception of work that fails at once."""
    try:
        result(work)
    except BaseException as e:
        return e
    raise AssertionError("it did not fail")


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


# -- the write-ahead commit ------------------------------------------------------------


def test_commitJournalsEachStepAhead(host: Host, disk: FaultyDisk) -> None:
    """COMMITTING (every install INSTALLING), then COMMITTED (all INSTALLED)."""
    host.ready()
    seen: list[tuple[str, list[str]]] = []
    real = disk.real

    def spy(files: RecordFiles, mid: str, data: bytes) -> bool:
        record = json.loads(data)
        states = [i["state"] for i in record.get("installs", [])]
        seen.append((record["phase"], states))
        return real(files, mid, data)

    disk.real = spy
    assert host.commit() == [str(host.dest / "a.img"), str(host.dest / "b.img")]
    # Two records, whatever the number of devices: the VM waits for each.
    assert seen == [
        ("COMMITTING", ["INSTALLING", "INSTALLING"]),
        ("COMMITTED", ["INSTALLED", "INSTALLED"]),
    ]
    record = host.journal()
    assert record["hook"] == "pending"
    assert [d["state"] for d in record["devices"]] == ["COMMITTED", "COMMITTED"]
    assert record["installs"][0]["after"] == list(identityOf(str(host.dest / "a.img")))


def test_onlyPreparedAndTheCommitWaitForTheDisk(host: Host, disk: FaultyDisk) -> None:
    """
    RECEIVING and READY recover as PREPARED does, so they are only noted: a
    migration that commits within NOTE_DELAY writes PREPARED, COMMITTING and
    COMMITTED; one that waits has READY on disk once NOTE_DELAY has passed.
    """
    written: list[tuple[str, str]] = []
    real = disk.real

    def spy(files: RecordFiles, mid: str, data: bytes) -> bool:
        record = json.loads(data)
        written.append((record["migration_id"], record["phase"]))
        return real(files, mid, data)

    disk.real = spy
    host.ready("m1", ("a",))
    host.commit("m1")
    assert written == [("m1", "PREPARED"), ("m1", "COMMITTING"), ("m1", "COMMITTED")]
    del written[:]
    host.ready("m2", ("b",))
    assert written == [("m2", "PREPARED")] and host.journal("m2")["phase"] == "PREPARED"
    host.clock.advance(NOTE_DELAY)
    assert written == [("m2", "PREPARED"), ("m2", "READY")]
    assert host.journal("m2")["phase"] == "READY"
    host.start()  # a restart finds it unfinished, as it would have PREPARED
    assert host.target.query("m2")["reason"] == (
        "the target daemon restarted while the migration was READY"
    )


@pytest.mark.parametrize("full", [False, True], ids=["one-write", "stays-full"])
@pytest.mark.parametrize("which", range(1, 3))
def test_aJournalFailureInTheCommitEndsItAborted(
    host: Host, disk: FaultyDisk, which: int, full: bool
) -> None:
    """
    A state directory failing at any journal write of a commit answers
    COMMIT_FAILED, ends the session ABORTED with nothing installed and nothing
    released, frees the domain, and a restart agrees.
    """
    session = host.ready()
    waiter = host.target.awaitRestored("vm1", 60)
    failures: list[Failure] = []
    waiter.addErrback(failures.append)
    disk.failAt = {disk.writes + which}
    if full:
        disk.failAt = set(range(disk.writes + which, disk.writes + 100))

    error = failure(host.target.commit(PEER, "m1"))

    assert isinstance(error, CommitFailed), error
    assert "did not commit: the journal could not record" in str(error)
    assert "it may resume on the source" in str(error)
    assert session.phase is Phase.ABORTED
    assert "No space left on device" in session.reason
    assert host.installed() == []
    assert failures and failures[0].check(MigrationAborted)
    assert host.hooks.runs == []
    assert not host.target.hasActiveWork(["m1"])  # the domain is free
    # Asked again, the same answer.
    again = failure(host.target.commit(PEER, "m1"))
    assert type(again) is CommitFailed and str(again) == str(error)
    # Abort now: ABORTED, the commit's reason kept.
    assert result(host.target.abort(PEER, "m1", "give up")) == "ABORTED"
    assert session.reason.startswith("the journal could not record")
    # The disk heals: the domain takes a new migration, which commits.
    disk.failAt, disk.full = set(), False
    host.ready("m2", ("a",))
    assert host.journal("m1")["phase"] == "ABORTED"  # written before m2's records
    assert host.commit("m2") == [str(host.dest / "a.img")]
    # A restart agrees: m1 ABORTED, m2 COMMITTED and installed.
    host.start()
    assert host.target.query("m1")["phase"] == "ABORTED"
    assert host.target.query("m2")["phase"] == "COMMITTED"
    assert host.installed() == ["a.img"]


BROKEN = [errno.ENOSPC, errno.EROFS, errno.EIO]


@pytest.mark.parametrize("code", BROKEN, ids=[errno.errorcode[c] for c in BROKEN])
def test_aBrokenStateDirectoryFailsTheCommit(
    host: Host, disk: FaultyDisk, code: int
) -> None:
    """Full, read-only or failing: COMMIT_FAILED naming the error, ABORTED."""
    session = host.ready()
    disk.errno, disk.full = code, True
    error = failure(host.target.commit(PEER, "m1"))
    assert isinstance(error, CommitFailed) and os.strerror(code) in str(error)
    assert session.phase is Phase.ABORTED and host.installed() == []


@pytest.mark.parametrize("code", BROKEN, ids=[errno.errorcode[c] for c in BROKEN])
def test_anAbortTheJournalCannotRecordStillEnds(
    host: Host, disk: FaultyDisk, code: int
) -> None:
    """Abort answers ABORTED, tells the gate, frees the domain; the record follows."""
    session = host.ready()
    waiter = host.target.awaitRestored("vm1", 60)
    failures: list[Failure] = []
    waiter.addErrback(failures.append)
    disk.errno, disk.full = code, True
    assert result(host.target.abort(PEER, "m1", "the toolstack gave up")) == "ABORTED"
    assert session.phase is Phase.ABORTED
    assert failures and failures[0].check(MigrationAborted)
    assert not host.target.hasActiveWork(["m1"])
    assert host.journal()["phase"] == "PREPARED"  # READY was only noted
    disk.full = False
    host.ready("m2", ("a",))
    assert host.journal()["phase"] == "ABORTED"
    assert host.journal()["reason"] == f"aborted by {PEER}: the toolstack gave up"


def test_aCrashWhileTheJournalIsFullReversesAtRestart(
    host: Host, disk: FaultyDisk
) -> None:
    """With the state directory still full, a restart reverses the commit."""
    host.ready()
    disk.failAt = set(range(disk.writes + 2, disk.writes + 100))  # after the installs
    assert isinstance(failure(host.target.commit(PEER, "m1")), CommitFailed)
    assert host.journal()["phase"] == "COMMITTING"  # ABORTED could not be written
    assert host.installed() == []
    disk.failAt = set()
    host.start()
    record = host.journal()
    assert record["phase"] == "ABORTED"
    assert "the target daemon stopped during the commit" in record["reason"]
    assert host.installed() == []


def test_aStopInTheMiddleOfTheCommitIsReversedAtRestart(host: Host) -> None:
    """
    The daemon stops while the second device installs: at restart what the
    first installed is removed, and the second's destination, which its
    install never reached, keeps what it held.
    """
    (host.dest / "b.img").write_text("someone's")
    host.ready()
    host.kind.targets[1].hang = True
    pending = Deferred.fromCoroutine(host.target.commit(PEER, "m1"))
    assert not pending.called
    assert host.installed() == ["a.img", "b.img"]
    record = host.journal()
    assert record["phase"] == "COMMITTING"
    assert [i["state"] for i in record["installs"]] == ["INSTALLING", "INSTALLING"]
    host.start()  # the daemon again, on the same state directory
    record = host.journal()
    assert record["phase"] == "ABORTED"
    assert host.installed() == ["b.img"]
    assert (host.dest / "b.img").read_text() == "someone's"
    assert [i["state"] for i in record["installs"]] == ["REVERSED", "REVERSED"]


def test_anInstallFailureReversesWhatWasInstalled(host: Host) -> None:
    """A device failing to install removes what the others installed: ABORTED."""
    session = host.ready()
    host.kind.targets[1].failCommit = OSError("disk gone")
    error = failure(host.target.commit(PEER, "m1"))
    assert isinstance(error, CommitFailed)
    assert host.installed() == []
    assert session.reason == (
        f"commit of device b failed: disk gone; the commit was reversed: removed "
        f"{host.dest / 'a.img'}"
    )
    record = host.journal()
    assert record["phase"] == "ABORTED" and record["installed"] == []
    assert [i["state"] for i in record["installs"]] == ["REVERSED", "REVERSED"]
    assert host.kind.targets[1].aborted and not host.kind.targets[0].aborted


def test_aSlowInstallIsBounded(host: Host) -> None:
    """A handler's commit past --commit-timeout fails the commit, reversed."""
    session = host.ready()
    host.kind.targets[1].commit = lambda: Deferred()
    committing = Deferred.fromCoroutine(host.target.commit(PEER, "m1"))
    assert session.phase is Phase.COMMITTING
    host.clock.advance(5)
    failures: list[Failure] = []
    committing.addErrback(failures.append)
    assert failures[0].check(CommitFailed)
    assert "did not finish within 5 seconds" in session.reason
    assert session.phase is Phase.ABORTED and host.installed() == []
    assert not host.clock.getDelayedCalls()


def test_abortAndCommitWhileCommitting(host: Host) -> None:
    """During COMMITTING Abort is refused clearly; a second Commit waits for it."""
    session = host.ready()
    installing: Deferred[list[str]] = Deferred()
    host.kind.targets[1].commit = lambda: installing
    first = Deferred.fromCoroutine(host.target.commit(PEER, "m1"))
    second = Deferred.fromCoroutine(host.target.commit(PEER, "m1"))
    error = failure(host.target.abort(PEER, "m1", "stop"))
    assert isinstance(error, InvalidTransition)
    assert "COMMITTING; it cannot be aborted: the commit itself ends it" in str(error)
    assert not first.called and not second.called
    assert host.target.query("m1")["phase"] == "COMMITTING"
    installing.callback(["b installed"])
    assert result(first) == result(second) == [str(host.dest / "a.img"), "b installed"]
    assert session.phase is Phase.COMMITTED


def test_closingWaitsForACommitUnderWay(host: Host) -> None:
    """A daemon stopping lets a commit under way end before it stops."""
    host.ready()
    installing: Deferred[list[str]] = Deferred()
    host.kind.targets[1].commit = lambda: installing
    Deferred.fromCoroutine(host.target.commit(PEER, "m1"))
    closed = host.target.closeAll("the target daemon is stopping")
    assert not closed.called
    installing.callback([])
    assert closed.called
    assert host.journal()["phase"] == "COMMITTED"


def test_aCommitAskedAgainAfterARestartAnswersTheSame(host: Host) -> None:
    """A committed migration answers Commit with its list, after a restart too."""
    host.ready()
    installed = host.commit()
    host.start()
    assert host.commit() == installed
    assert isinstance(failure(host.target.commit("other", "m1")), NotAuthorized)


def test_commitOverTheWire(host: Host, disk: FaultyDisk) -> None:
    """The source sees COMMIT_FAILED as CommitFailed; Abort then says ABORTED."""
    client, server, pump = iosimConnect(host.target)
    host.ready()
    disk.failAt = {disk.writes + 1}
    answers: list[Any] = []
    client.callRemote(commands.Commit, migration_id="m1").addBoth(answers.append)
    pump.flush()
    assert isinstance(answers[0], Failure) and answers[0].check(CommitFailed)
    client.callRemote(commands.Abort, migration_id="m1", reason="x").addBoth(
        answers.append
    )
    pump.flush()
    assert answers[1] == {"phase": "ABORTED"}


def iosimConnect(target: MigrationTarget) -> tuple[amp.AMP, Any, Any]:
    client, server, pump = iosim.connectedServerAndClient(
        ServerClass=lambda: ControlProtocol(target, tls=False),
        ClientClass=amp.AMP,
        greet=True,
    )
    server.peer = PEER
    return client, server, pump


# -- the resume gate's claim -----------------------------------------------------------


def test_aClaimThatCannotBeRecordedIsNotAnswered(host: Host, disk: FaultyDisk) -> None:
    """AwaitRestored fails JOURNAL_UNAVAILABLE if its claim cannot be recorded; the
    commit stays unclaimed for the next waiter, across a restart too."""
    host.ready()
    host.commit()
    disk.full = True
    error = failure(host.target.awaitRestored("vm1", 60))
    assert isinstance(error, JournalUnavailable)
    assert "claim could not be recorded" in str(error)
    disk.full = False
    host.start()
    release = result(host.target.awaitRestored("vm1", 60))
    assert release.migrationId == "m1"
    assert host.journal()["claimed"] is True
    host.start()
    with pytest.raises(PhaseTimeout):
        waiting = host.target.awaitRestored("vm1", 1)
        host.clock.advance(1)
        result(waiting)


# -- the hook, at least once -----------------------------------------------------------


def test_theHookRunsAgainAfterACrash(host: Host) -> None:
    """A hook that had not completed before a crash runs after the restart, once."""
    host.ready()
    host.commit()
    [(env, running)] = host.hooks.runs
    host.start()  # the daemon died while the hook ran
    assert host.hooks.runs == []
    host.clock.advance(0)
    assert len(host.hooks.runs) == 1, "the hook did not run again"
    [(again, running)] = host.hooks.runs
    assert host.journal()["hook"] == "pending"
    assert (
        again
        == env
        == {
            "XENMIG_MIGRATION_ID": "m1",
            "XENMIG_DOMAIN": "vm1",
            "XENMIG_PEER": PEER,
            "XENMIG_INSTALLED": f"{host.dest / 'a.img'}\n{host.dest / 'b.img'}",
        }
    )
    running.callback(1)  # its exit status does not matter: it ran
    assert host.journal()["hook"] == "done"
    host.start()
    host.clock.advance(0)
    assert host.hooks.runs == []


def test_noHookForAFailedCommit(host: Host) -> None:
    """A commit that failed runs no hook, before or after a restart."""
    host.ready()
    host.kind.targets[0].failCommit = OSError("no")
    failure(host.target.commit(PEER, "m1"))
    host.start()
    host.clock.advance(0)
    assert host.hooks.runs == []


# -- recovery --------------------------------------------------------------------------


def test_recoveryReversesOnlyWhatTheCommitPutThere(tmp_path: Path) -> None:
    """
    A COMMITTING record: an INSTALLING destination that changed and an
    INSTALLED one still holding what it put are removed; a PLANNED one, one
    unchanged since before, and one outside the roots are left.
    """
    root = tmp_path / "dest"
    root.mkdir()
    paths = {n: root / n for n in ("installing", "installed", "planned", "same")}
    for path in paths.values():
        path.write_text(path.name)
    outside = tmp_path / "outside"
    outside.write_text("x")
    installs = [
        Install("a", str(paths["installing"]), None, None, InstallState.INSTALLING),
        Install(
            "b",
            str(paths["installed"]),
            None,
            identityOf(str(paths["installed"])),
            InstallState.INSTALLED,
        ),
        Install("c", str(paths["planned"]), None, None, InstallState.PLANNED),
        Install(
            "d",
            str(paths["same"]),
            identityOf(str(paths["same"])),
            None,
            InstallState.INSTALLING,
        ),
        Install("e", str(outside), None, None, InstallState.INSTALLING),
    ]
    journal = Journal(FilePath(str(tmp_path / "sessions")), maybeDeferred, task.Clock())
    journal.write(
        "m1",
        {
            "migration_id": "m1",
            "phase": "COMMITTING",
            "installs": [i.toJSON() for i in installs],
            "installed": [str(paths["installed"])],
            "devices": [{"name": n, "state": "READY"} for n in "abcde"],
        },
    )
    [record] = journal.recover(now=5, roots=[FilePath(str(root))])
    assert sorted(p.name for p in root.iterdir()) == ["planned", "same"]
    assert outside.exists()
    assert record["phase"] == "ABORTED"
    assert record["installed"] == []
    assert [i["state"] for i in record["installs"]] == [
        "REVERSED",
        "REVERSED",
        "PLANNED",
        "REVERSED",
        "INSTALLING",
    ]
    assert f"removed {paths['installing']}, {paths['installed']}" in record["reason"]
    assert f"COULD NOT REMOVE {outside}" in record["reason"]


def test_theBuiltInKindsSayWhereTheyInstall(tmp_path: Path) -> None:
    """The file kind's target provides IInstallingDevice (as disk, vtpm, devmodel)."""
    from xenmig.devices.devmodel.target import DevmodelTarget
    from xenmig.devices.disk.target import DiskTarget
    from xenmig.devices.file import FileTarget
    from xenmig.devices.vtpm.target import VTPMTarget
    from xenmig.testing import FakeTargetContext

    for cls in (FileTarget, DiskTarget, VTPMTarget, DevmodelTarget):
        assert IInstallingDevice.implementedBy(cls), cls
    context = FakeTargetContext(reactor, [str(tmp_path)])
    description = DeviceDescription("file", "f", 3, {"target": "out"})
    device = FileTarget(description, context)
    assert verifyObject(IInstallingDevice, device)
    assert device.destination == FilePath(str(tmp_path / "out"))
    context.cleanup()


# -- the source never guesses ----------------------------------------------------------

from test_sourcemigration import FakeClient, prepared, run  # noqa: E402


def sourceCommit(answer: Any, status: Any = None) -> tuple[FakeClient, Any]:
    """A source migration READY, then committed against ``answer``."""
    client = FakeClient({"memory": MemoryKind()})
    migration = prepared(client)
    run(migration.transfer())
    client.answers[commands.Commit] = answer
    if status is not None:
        client.answers[commands.QueryMigration] = lambda kw: {"status": status}
    return client, migration


def raising(error: BaseException) -> Any:
    def answer(kw: dict[str, Any]) -> Any:
        raise error

    return answer


def test_anInternalErrorIsNotARefusal() -> None:
    """Commit answered INTERNAL while the target committed: the source commits."""
    client, migration = sourceCommit(
        raising(InternalError("journal")), {"phase": "COMMITTED", "installed": ["/x"]}
    )
    assert run(migration.commit()) == ["/x"]
    assert migration.phase is SourcePhase.COMMITTED
    [device] = migration.devices.values()
    assert device.device.released and not device.device.rolledBack
    assert b"xenmig-abort" not in [name for name, _ in client.sent]


@pytest.mark.parametrize(
    "answer",
    [
        raising(InternalError("disk full")),
        raising(InvalidTransition("is COMMITTING")),
        raising(PhaseTimeout("commit did not finish within 120 s")),
        raising(ConnectionResetError("lost")),
        lambda kw: {"nothing": "useful"},
    ],
    ids=["internal", "invalid-transition", "time-out", "connection-lost", "garbled"],
)
def test_anythingButARefusalIsInDoubtUntilTheTargetSays(answer: Any) -> None:
    """No definite answer and the target still COMMITTING: IN-DOUBT, no rollback."""
    client, migration = sourceCommit(answer, {"phase": "COMMITTING"})
    with pytest.raises(CommitInDoubt, match="is COMMITTING on the target"):
        run(migration.commit())
    assert migration.phase is SourcePhase.IN_DOUBT
    [device] = migration.devices.values()
    assert not device.device.rolledBack and not device.device.released


@pytest.mark.parametrize("error", [CommitFailed, MigrationAborted])
def test_aDefiniteRefusalRollsBack(error: type[Exception]) -> None:
    """COMMIT_FAILED or MIGRATION_ABORTED: rolled back, no need to ask."""
    client, migration = sourceCommit(raising(error("did not commit")))
    with pytest.raises(error):
        run(migration.commit())
    assert migration.phase is SourcePhase.ABORTED
    [device] = migration.devices.values()
    assert device.device.rolledBack
    assert b"xenmig-query" not in [name for name, _ in client.sent]


def test_noAbortDuringACommit() -> None:
    """abort() while the commit is under way is refused and rolls nothing back."""
    pending: Deferred[dict[str, Any]] = Deferred()

    class Slow(FakeClient):
        async def callWithin(self, seconds: float, what: str, *a: Any, **kw: Any):
            answer = self._answer(a[1], kw)
            return await answer if isinstance(answer, Deferred) else answer

    client = Slow({"memory": MemoryKind()})
    migration = prepared(client)
    run(migration.transfer())
    client.answers[commands.Commit] = lambda kw: pending
    committing = Deferred.fromCoroutine(migration.commit())
    assert migration.phase is SourcePhase.COMMITTING
    with pytest.raises(CommitInDoubt, match="COMMITTING; it cannot be aborted"):
        run(migration.abort("the operator pressed ^C"))
    pending.callback({"installed": ["/x"]})
    assert result(committing) == ["/x"]
    [device] = migration.devices.values()
    assert device.device.released and not device.device.rolledBack


# -- a real full filesystem ------------------------------------------------------------


@pytest.fixture
def smallStateDir(tmp_path: Path) -> Iterator[Path]:
    """
    A 1 MiB tmpfs for a state directory, where a L{Daemon} in ``tmp_path /
    "daemon"`` keeps it (root and mount(8); else skip, but fail under CI).
    """
    mountpoint = tmp_path / "daemon" / "state"
    mountpoint.mkdir(parents=True)
    mounted = (
        os.geteuid() == 0
        and not subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
            capture_output=True,
        ).returncode
    )
    if not mounted:
        reason = "needs root and mount(8) for a small tmpfs"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run this test: {reason}")
        pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its filesystem is full; the file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_aStateDirectoryThatFillsAfterPrepareStillRecordsTheCommit(
    tmp_path: Path, smallStateDir: Path
) -> None:
    """
    A session's records are written in its own blocks, made before its Prepare
    was answered: a state directory that fills up between READY and Commit
    still records the commit, which survives a restart.  New sessions take the
    spare files made ahead; once they are gone, a Prepare is refused with the
    disk's error, and nothing of it is kept.
    """
    host = Host(tmp_path, smallStateDir)
    host.ready()
    filler = fill(smallStateDir)
    assert host.commit("m1") == [str(host.dest / "a.img"), str(host.dest / "b.img")]
    spares = host.target.journal.files.spares
    assert spares == SPARES - 1  # m1 took one; more are made once half are gone
    for n in range(spares):
        result(host.target.prepare(PEER, f"s{n}", f"vm-s{n}", 1, [placing("s")]))
    error = failure(host.target.prepare(PEER, "late", "vm-late", 1, [placing("s")]))
    assert isinstance(error, JournalUnavailable)
    assert "No space left on device" in str(error)
    assert "late" not in host.target.sessions
    assert not list((smallStateDir / "sessions").glob("*.tmp"))
    filler.unlink()
    host.start()
    assert host.target.query("m1")["phase"] == "COMMITTED"
    assert [host.target.query(f"s{n}")["phase"] for n in range(spares)] == [
        "ABORTED"
    ] * spares
    assert host.target.journal.files.spares == SPARES  # made again at start-up


def test_aStateDirectoryGoneReadOnlyFailsTheCommit(
    tmp_path: Path, smallStateDir: Path
) -> None:
    """
    A state directory that cannot be written at all (remounted read-only, as
    ext4 does on an I/O error): COMMIT_FAILED, ABORTED, nothing installed;
    writable again, a restart aborts the session and the same VM commits.
    """
    host = Host(tmp_path, smallStateDir)
    session = host.ready()
    remount(smallStateDir, "ro")
    try:
        error = failure(host.target.commit(PEER, "m1"))
    finally:
        remount(smallStateDir, "rw")
    assert isinstance(error, CommitFailed)
    assert "Read-only file system" in str(error)
    assert session.phase is Phase.ABORTED and host.installed() == []
    host.start()
    assert host.target.query("m1")["phase"] == "ABORTED"
    host.ready("m2", ("a",))
    assert host.commit("m2") == [str(host.dest / "a.img")]
    assert host.journal("m1")["phase"] == "ABORTED"


def placing(name: str) -> dict[str, Any]:
    return {
        "kind": "placing",
        "name": name,
        "size": 3,
        "precopy": False,
        "params": {"at": f"{name}.img"},
    }


def remount(mountpoint: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mountpoint)], check=True)


def test_theCommandLineWhenTheStateDirectoryFails(
    tmp_path: Path, smallStateDir: Path
) -> None:
    """
    A daemon whose state directory goes read-only while the VM is paused:
    ``xenmig migrate`` says the target did not commit, resumes the VM, exits
    1; the target says ABORTED, and once it is writable again the same
    migration commits.
    """
    from daemons import PKI, Daemon
    from test_cli import fileDevice, sourceFile, tlsArgs, xenmig

    daemon = Daemon(tmp_path / "daemon", PKI(tmp_path / "pki")).start()
    try:
        source, destination = sourceFile(tmp_path), daemon.dest / "vm.img"
        resumed = tmp_path / "resumed"
        migrate = [
            "migrate",
            *tlsArgs(daemon),
            "--domain",
            "vm-full",
            "--device",
            fileDevice(source, destination),
            "--json",
        ]
        result = xenmig(
            *migrate,
            "--live",
            "--pause-command",
            f"mount -o remount,ro {smallStateDir}",
            "--resume-command",
            f"touch {resumed}",
        )
        assert result.returncode == 1, result.stderr
        assert "did not commit: the journal could not record" in result.stderr
        assert "Read-only file system" in result.stderr
        assert "the target did not commit: it removed what it had" in result.stderr
        assert resumed.exists() and not destination.exists()
        mid = json.loads(result.stdout)["migration_id"]
        status = subprocess.run(
            ["python3", "-m", "xenmig.cli.main", "status", mid, *tlsArgs(daemon)],
            capture_output=True,
            text=True,
        )
        assert "ABORTED" in status.stdout, status.stdout + status.stderr
        remount(smallStateDir, "rw")
        again = xenmig(*migrate)
        assert again.returncode == 0, again.stderr
        assert destination.read_bytes() == source.read_bytes()
        assert daemon.journal(mid)["phase"] == "ABORTED"
    finally:
        remount(smallStateDir, "rw")
        daemon.stop()
