"""The target session's state machine, its journal, and recovery after a restart."""

import json
import os

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.python.filepath import FilePath

from xenmig.digest import hashBytes
from xenmig.errors import CommitFailed, InvalidTransition, MigrationAborted
from xenmig.model import DeviceDescription, DeviceOffer
from xenmig.records import DataRecord, EndRecord
from xenmig.target.commit import CommitHost, SessionCommit
from xenmig.target.config import TargetConfig
from xenmig.target.core import MigrationTarget
from xenmig.target.journal import Journal
from xenmig.target.migrationrecord import MigrationRecord
from xenmig.target.recordfiles import readRecords
from xenmig.target.session import (
    DEVICE_TRANSITIONS,
    TRANSITIONS,
    DeviceState,
    Phase,
    TargetDeviceSlot,
    TargetSession,
)
from xenmig.testing import MemoryTarget


def sync(function, *args, **kw):
    return maybeDeferred(function, *args, **kw)


def makeSession(clock, names=("a",), deadlines=None, changes=None):
    slots = []
    for name in names:
        description = DeviceDescription("memory", name, 3)
        slots.append(TargetDeviceSlot(MemoryTarget(description), description, clock))
    record = changes.append if changes is not None else (lambda s: None)
    return TargetSession(
        "m1",
        "vm1",
        "source.test",
        slots,
        clock,
        deadlines or {},
        lambda s: record(s.phase),
    )


def commit(session):
    """Commit ``session`` with a journal that records nothing; its Deferred."""
    host = CommitHost(
        recordOf=MigrationRecord.ofSession,
        write=lambda record: succeed(None),
        runInThread=sync,
        finished=lambda s: succeed(None),
        roots=(),
    )
    running = SessionCommit(session, host)
    running.start()
    return running.result()


def deliver(session, name, data=b"abc"):
    session.streamStarted(name)
    session.recordReceived(name, DataRecord(0, data))
    digest = hashBytes(data)
    return session.streamEnded(name, EndRecord(digest.size, "blake3", digest.digest))


def test_transitionTable():
    """Final phases lead nowhere; every phase before commit can abort."""
    assert TRANSITIONS[Phase.COMMITTED] == frozenset()
    assert TRANSITIONS[Phase.ABORTED] == frozenset()
    for phase in (Phase.PREPARED, Phase.RECEIVING, Phase.READY, Phase.COMMITTING):
        assert Phase.ABORTED in TRANSITIONS[phase]
    assert DEVICE_TRANSITIONS[DeviceState.COMMITTED] == frozenset()


def test_readyOnlyWhenAllDevicesVerified():
    """The session is READY only after every device has been verified."""
    clock = task.Clock()
    changes = []
    session = makeSession(clock, ("a", "b"), changes=changes)
    deliver(session, "a")
    assert session.phase is Phase.RECEIVING
    deliver(session, "b")
    assert session.phase is Phase.READY
    assert changes == [Phase.RECEIVING, Phase.READY]


def test_commitThenAbortIsRefused():
    """After commit, abort is an illegal transition that changes nothing."""
    clock = task.Clock()
    session = makeSession(clock)
    deliver(session, "a")
    installed = []
    commit(session).addCallback(installed.append)
    assert session.phase is Phase.COMMITTED
    assert installed == [["memory:a"]]
    with pytest.raises(InvalidTransition, match="cannot be aborted"):
        session.abort("too late")
    assert session.phase is Phase.COMMITTED


def test_abortIsIdempotent():
    """Aborting twice keeps the first reason and aborts each device once."""
    clock = task.Clock()
    session = makeSession(clock)
    session.abort("first")
    session.abort("second")
    assert session.reason == "first"
    assert session.devices["a"].device.aborted
    with pytest.raises(MigrationAborted, match="first"):
        session.checkActive()


def test_streamAfterAbortRefused():
    """A stream cannot start on an aborted session."""
    clock = task.Clock()
    session = makeSession(clock)
    session.abort("gone")
    with pytest.raises(MigrationAborted):
        session.streamStarted("a")


def test_readyDeadline():
    """A READY session not committed in time aborts, naming READY."""
    clock = task.Clock()
    session = makeSession(clock, deadlines={Phase.READY: 5})
    deliver(session, "a")
    clock.advance(5)
    assert session.phase is Phase.ABORTED
    assert "READY phase did not finish within 5 seconds" in session.reason
    assert not clock.getDelayedCalls()


def test_commitFailureAborts():
    """A device failing to install aborts the session with the reason and what was
    installed."""
    clock = task.Clock()
    session = makeSession(clock, ("a", "b"))
    deliver(session, "a")
    deliver(session, "b")
    session.devices["b"].device.failCommit = OSError("disk gone")
    failures = []
    commit(session).addErrback(failures.append)
    assert failures and failures[0].check(CommitFailed)
    assert "not released on the target and never will be" in str(failures[0].value)
    assert session.phase is Phase.ABORTED
    assert session.reason.startswith("commit of device b failed: disk gone; ")
    assert "left in place, never released: memory:a" in session.reason
    assert [s.state for s in session.devices.values()] == [DeviceState.ABORTED] * 2
    assert session.devices["b"].device.aborted  # its staging is discarded
    assert not session.devices["a"].device.aborted  # installed: the gate keeps it


def test_journalWriteAndRecover(tmp_path):
    """Recovery aborts unfinished sessions, removes their staging, keeps committed."""
    journal = Journal(FilePath(str(tmp_path / "sessions")), sync, task.Clock())
    staging = tmp_path / "staging" / "m-open"
    staging.mkdir(parents=True)
    (staging / "dev.part").write_bytes(b"half")
    external = tmp_path / ".out.xenmig-m-open.part"
    external.write_bytes(b"half")
    journal.write(
        "m-open",
        {
            "migration_id": "m-open",
            "phase": "RECEIVING",
            "staging": [str(staging), str(external)],
            "devices": [{"name": "dev", "state": "RECEIVING"}],
            "started": 1,
        },
    )
    journal.write(
        "m-done",
        {"migration_id": "m-done", "phase": "COMMITTED", "staging": [], "started": 2},
    )
    records = Journal(FilePath(str(tmp_path / "sessions")), sync, task.Clock()).recover(
        now=10
    )
    byId = {r["migration_id"]: r for r in records}
    assert byId["m-open"]["phase"] == "ABORTED"
    assert "restarted while the migration was RECEIVING" in byId["m-open"]["reason"]
    assert byId["m-open"]["devices"][0]["state"] == "ABORTED"
    assert byId["m-done"]["phase"] == "COMMITTED"
    assert not staging.exists() and not external.exists()
    onDisk = json.loads(readRecords(str(tmp_path / "sessions"))["m-open"])
    assert onDisk["phase"] == "ABORTED"


def test_journalWritesTheNewestOfWaitingRecords(tmp_path):
    """Records written while one is under way land as one write: the newest."""
    started = []  # (data, Deferred) of each write handed to the "thread"

    def held(function, *args):
        done = Deferred()
        started.append((args, done, lambda: function(*args)))
        return done

    journal = Journal(FilePath(str(tmp_path / "sessions")), held, task.Clock())
    first = journal.write("m1", {"migration_id": "m1", "phase": "RECEIVING"})
    second = journal.write("m1", {"migration_id": "m1", "phase": "READY"})
    third = journal.write("m1", {"migration_id": "m1", "phase": "COMMITTING"})
    assert len(started) == 1  # the first is under way; the others wait
    _, done, run = started[0]
    run()
    done.callback(None)
    assert first.called and not second.called and not third.called
    assert len(started) == 2  # one write for both waiting records: the newest
    _, done, run = started[1]
    run()
    done.callback(None)
    assert second.called and third.called
    onDisk = json.loads(readRecords(str(tmp_path / "sessions"))["m1"])
    assert onDisk["phase"] == "COMMITTING"


def test_corruptJournalRemoved(tmp_path):
    """An unreadable journal record is removed rather than stopping the daemon."""
    directory = tmp_path / "sessions"
    directory.mkdir()
    (directory / "bad.json").write_text("{not json")
    assert Journal(FilePath(str(directory)), sync, task.Clock()).recover(now=1) == []
    assert not (directory / "bad.json").exists()


def test_targetRecoverCleansStaging(tmp_path):
    """A restarted target removes every staging directory and reports old sessions."""
    state = tmp_path / "state"
    (state / "staging" / "orphan").mkdir(parents=True)
    journal = Journal(FilePath(str(state / "sessions")), sync, task.Clock())
    journal.write("m9", {"migration_id": "m9", "phase": "READY", "started": 1})
    target = MigrationTarget(task.Clock(), TargetConfig(FilePath(str(state))), {}, sync)
    target.recover()
    assert os.listdir(state / "staging") == []
    assert target.query("m9")["phase"] == "ABORTED"
    with pytest.raises(MigrationAborted, match="restarted while the migration was"):
        target.session("m9")


# -- the record of a migration ------------------------------------------------------


def recordJSON(**extra):
    """A journal record as the daemon writes it (a committed session)."""
    return {
        "migration_id": "m1",
        "domain": "vm1",
        "phase": "COMMITTED",
        "peer": "source.test",
        "reason": "",
        "started": 1.5,
        "updated": 9.0,
        "installed": ["memory:a"],
        "devices": [
            {
                "name": "a",
                "kind": "memory",
                "state": "COMMITTED",
                "bytes_done": 3,
                "bytes_expected": 3,
                "rate": 0.5,
                "digest": "blake3:00",
                "reason": "",
            }
        ],
        **extra,
    }


@pytest.mark.parametrize(
    "extra",
    [{}, {"staging": ["/s/m1"]}, {"staging": [], "claimed": True}, {"refused": True}],
)
def test_recordJSONRoundTrip(extra):
    """A record's JSON reads back into the same record and writes the same JSON."""
    data = recordJSON(**extra)
    record = MigrationRecord.fromJSON(data)
    assert record.phase is Phase.COMMITTED and record.committed
    assert record.toJSON() == data
    assert MigrationRecord.fromJSON(record.toJSON()) == record


def test_recordOfSession():
    """A session's record is its status (as the wire shows it) plus its staging."""
    clock = task.Clock()
    session = makeSession(clock)
    deliver(session, "a")
    record = MigrationRecord.ofSession(session, ["/s/m1"])
    assert record.phase is Phase.READY
    assert record.toJSON() == {**session.status().toJSON(), "staging": ["/s/m1"]}
    assert "staging" not in MigrationRecord.ofSession(session).toJSON()


def test_refusalRecord():
    """A refused Prepare's record names each refused device REFUSED, with its reason."""
    descriptions = [DeviceDescription("memory", n, 3) for n in ("a", "b")]
    offers = [DeviceOffer("a", True, ""), DeviceOffer("b", False, "device b: full")]
    record = MigrationRecord.refusal("m1", "vm1", "src", descriptions, offers, 7.0)
    data = record.toJSON()
    assert (data["phase"], data["refused"], data["staging"]) == ("ABORTED", True, [])
    assert data["reason"] == "refused at Prepare: device b: full"
    assert [(d["state"], d["reason"]) for d in data["devices"]] == [
        (DeviceState.ABORTED.value, ""),
        (DeviceState.REFUSED.value, "device b: full"),
    ]


def test_restartAbortsAnInterruptedCommit():
    """An interrupted commit's record becomes ABORTED, every device ABORTED."""
    data = recordJSON(phase="COMMITTING", installed=["memory:a"])
    data["devices"] = [{**d, "state": "READY"} for d in data["devices"]]
    data["devices"].append({**data["devices"][0], "name": "b"})
    record = MigrationRecord.fromJSON(data).abortedByRestart(now=20.0)
    assert record.phase is Phase.ABORTED and record.updated == 20.0
    assert "stopped during the commit, before COMMITTED was recorded" in record.reason
    assert record.installed == ("memory:a",)  # held by a component, not released
    assert [d.state for d in record.devices] == ["ABORTED", "ABORTED"]
