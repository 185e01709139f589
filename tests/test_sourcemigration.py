"""The source's phase machine: every move the steps make is in its one table."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from xenmig import amp_commands as commands
from xenmig.digest import hashBytes
from xenmig.errors import (
    CommitFailed,
    CommitInDoubt,
    DeviceError,
    DeviceRefused,
    DigestMismatch,
    InvalidTransition,
    MigrationAborted,
    PhaseTimeout,
)
from xenmig.interfaces import IDeviceKind, ISourceDevice
from xenmig.limits import AnnouncedLimits
from xenmig.model import DeviceDescription, DeviceSpec, RoundResult
from xenmig.source.connection import ClientTimeouts
from xenmig.source.convergence import FixedRounds
from xenmig.source.idlepool import IdleConnections
from xenmig.source.migration import SourceMigration
from xenmig.source.phase import FINAL, TRANSITIONS, Phase, leadingTo
from xenmig.testing import MemoryKind, MemorySource

DOC = Path(__file__).resolve().parent.parent / "doc"

Answer = Callable[[dict[str, Any]], dict[str, Any]]


class FakeSender:
    """A stream that takes every record and remembers whether it was aborted."""

    unsent = 0

    def __init__(self, device: str) -> None:
        self.device = device
        self.bytesWritten = 0
        self.dataBytes = 0
        self.aborted = False

    def writeRound(self, round: int, final: bool) -> Deferred[None]:
        return succeed(None)

    def writeData(self, offset: int, data: bytes) -> Deferred[None]:
        self.bytesWritten += len(data)
        self.dataBytes += len(data)
        return succeed(None)

    def writeZero(self, offset: int, length: int) -> Deferred[None]:
        self.bytesWritten += length
        return succeed(None)

    def writeMetadata(self, metadata: dict[str, Any]) -> Deferred[None]:
        return succeed(None)

    def finish(self, digest: Any) -> Deferred[None]:
        return succeed(None)

    def abort(self) -> None:
        self.aborted = True


class FakeControl:
    """A control connection already gone: hanging up does nothing."""

    transport = None


class FakeClient:
    """
    A MigrationClient stand-in whose target answers from a script: each AMP
    command maps to a function of its arguments (raise to fail the call).
    """

    def __init__(self, kinds: dict[str, IDeviceKind]) -> None:
        self.reactor = Clock()
        self.timeouts = ClientTimeouts()
        self.limits = AnnouncedLimits()
        self.retries: Counter[str] = Counter()
        self.kinds = kinds
        self.sent: list[tuple[bytes, dict[str, Any]]] = []
        self.idle = IdleConnections(self.reactor, 0, self.hangUp)  # keeps none
        self.answers: dict[type, Answer] = {
            commands.Prepare: self._offers,
            commands.OpenStream: lambda kw: {"token": b"token"},
            commands.DeviceReady: self._verified,
            commands.Commit: lambda kw: {"installed": ["/vms/blob"]},
            commands.Abort: lambda kw: {"phase": "ABORTED"},
            commands.QueryMigration: lambda kw: {"status": {"phase": "READY"}},
        }

    def _offers(self, kw: dict[str, Any]) -> dict[str, Any]:
        offers = [
            {"name": d["name"], "accepted": True, "reason": "", "params": {}}
            for d in kw["devices"]
        ]
        return {"protocol_version": 1, "offers": offers}

    def _verified(self, kw: dict[str, Any]) -> dict[str, Any]:
        kind = self.kinds["memory"]
        assert isinstance(kind, MemoryKind)
        [source] = [s for s in kind.sources if s.spec.name == kw["device"]]
        digest = hashBytes(source.data)
        return {
            "size": digest.size,
            "algorithm": digest.algorithm,
            "digest": digest.digest,
        }

    def _answer(self, command: type, kw: dict[str, Any]) -> dict[str, Any]:
        self.sent.append((command.commandName, kw))  # type: ignore[attr-defined]
        return self.answers[command](kw)

    async def connect(self) -> FakeControl:
        return FakeControl()

    async def prepareRemote(self, **kw: Any) -> tuple[FakeControl, dict[str, Any]]:
        return FakeControl(), self._answer(commands.Prepare, kw)

    async def pacedCall(
        self,
        slots: Any,
        seconds: float,
        what: str,
        protocol: Any,
        command: type,
        /,
        **kw: Any,
    ) -> dict[str, Any]:
        return self._answer(command, kw)

    async def call(self, protocol: Any, command: type, **kw: Any) -> dict[str, Any]:
        return self._answer(command, kw)

    async def callWithin(
        self, seconds: float, what: str, protocol: Any, command: type, /, **kw: Any
    ) -> dict[str, Any]:
        return self._answer(command, kw)

    def hangUp(self, protocol: Any) -> None:
        pass

    async def query(self, migrationId: str) -> dict[str, Any]:
        answer = self._answer(commands.QueryMigration, {"migration_id": migrationId})
        return answer["status"]

    def streamSender(
        self, device: str, bandwidth: Any = None, queue: int | None = None
    ) -> FakeSender:
        return FakeSender(device)

    async def openStream(
        self, control: Any, migrationId: str, sender: Any, slots: Any = None
    ) -> None:
        self._answer(commands.OpenStream, {"device": sender.device})


@implementer(ISourceDevice)
class RoundsSource(MemorySource):
    """A memory source that can pre-copy; ``fail-round=1`` makes its round fail."""

    precopy = True

    def describe(self) -> Deferred[DeviceDescription]:
        return succeed(
            DeviceDescription("memory", self.spec.name, len(self.data), precopy=True)
        )

    def sendRound(self, writer: Any, round: int) -> Deferred[RoundResult]:
        if self.spec.params.get("fail-round"):
            raise DeviceError(f"device {self.spec.name}: the round failed")
        return succeed(RoundResult(0, 0))


class RoundsKind(MemoryKind):
    """The ``memory`` kind, its sources able to pre-copy."""

    def source(self, spec: DeviceSpec, context: Any) -> RoundsSource:
        device = RoundsSource(spec, context)
        self.sources.append(device)
        return device


def run(coroutine: Any) -> Any:
    """Run a step whose Deferreds all fire at once; its result, or raise."""
    outcome: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(outcome.append)
    assert outcome, "the step waited for something"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[tuple[Phase, Phase]]]:
    """Every move any SourceMigration asks for, legal or not."""
    made: set[tuple[Phase, Phase]] = set()
    original = SourceMigration._moveTo

    def recording(self: SourceMigration, phase: Phase) -> None:
        made.add((self.phase, phase))
        original(self, phase)

    monkeypatch.setattr(SourceMigration, "_moveTo", recording)
    yield made


def prepared(client: FakeClient, *specs: str) -> SourceMigration:
    migration = SourceMigration(client, "vm1", "m1")
    run(migration.prepare([DeviceSpec.parse(s) for s in specs or ["memory:a:data=x"]]))
    return migration


def lostCommit(kw: dict[str, Any]) -> dict[str, Any]:
    raise PhaseTimeout("commit did not finish within 120 s")


def statusIs(status: dict[str, Any]) -> Answer:
    return lambda kw: {"status": status}


def unreachable(kw: dict[str, Any]) -> dict[str, Any]:
    raise ConnectionRefusedError("no route to the target")


def whole(client: FakeClient) -> SourceMigration:
    migration = prepared(client, "memory:a:data=state")
    run(migration.precopy(FixedRounds(2)))
    run(migration.transfer())
    run(migration.commit())
    return migration


def scenarios() -> list[tuple[str, Callable[[FakeClient], Any], type | None]]:
    """(name, what it does with a fresh client, the exception it ends in)."""

    def refuse(client: FakeClient) -> None:
        def refused(kw: dict[str, Any]) -> dict[str, Any]:
            offer = {"name": "a", "accepted": False, "reason": "no", "params": {}}
            return {"protocol_version": 1, "offers": [offer]}

        client.answers[commands.Prepare] = refused
        prepared(client)

    def commitWith(answer: Answer, query: Answer | None = None) -> Callable:
        def scenario(client: FakeClient) -> None:
            migration = prepared(client)
            run(migration.transfer())
            client.answers[commands.Commit] = answer
            if query is not None:
                client.answers[commands.QueryMigration] = query
            run(migration.commit())

        return scenario

    def failedCommit(kw: dict[str, Any]) -> dict[str, Any]:
        raise CommitFailed("commit of device a failed")

    def abortReady(client: FakeClient) -> None:
        migration = prepared(client)
        run(migration.transfer())
        run(migration.abort("the toolstack changed its mind"))

    def abortPrecopied(client: FakeClient) -> None:
        migration = prepared(client)
        run(migration.precopy())
        run(migration.abort("the guest crashed"))

    def mismatch(client: FakeClient) -> None:
        migration = prepared(client)
        client.answers[commands.DeviceReady] = lambda kw: {
            "size": 0,
            "algorithm": "blake3",
            "digest": b"",
        }
        run(migration.transfer())

    return [
        ("pre-copy and commit", whole, None),
        ("commit", commitWith(lambda kw: {"installed": []}), None),
        ("refused at prepare", refuse, DeviceRefused),
        ("abort prepared", lambda c: run(prepared(c).abort("changed my mind")), None),
        ("abort pre-copied", abortPrecopied, None),
        ("abort ready", abortReady, None),
        (
            "failed round",
            lambda c: run(prepared(c, "memory:a:fail-round=1").precopy()),
            DeviceError,
        ),
        ("digest mismatch", mismatch, DigestMismatch),
        ("commit refused", commitWith(failedCommit), CommitFailed),
        (
            "commit lost, committed",
            commitWith(lostCommit, statusIs({"phase": "COMMITTED"})),
            None,
        ),
        (
            "commit lost, aborted",
            commitWith(lostCommit, statusIs({"phase": "ABORTED"})),
            MigrationAborted,
        ),
        ("commit lost, target unsure", commitWith(lostCommit), CommitInDoubt),
        (
            "commit lost, target gone",
            commitWith(lostCommit, unreachable),
            CommitInDoubt,
        ),
    ]


TABLE = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}


def play(scenario: Callable[[FakeClient], Any], raises: type | None) -> None:
    """Run one scenario on a fresh client; it must end as expected."""
    client = FakeClient({"memory": RoundsKind()})
    if raises is None:
        scenario(client)
    else:
        with pytest.raises(raises):
            scenario(client)


@pytest.mark.parametrize(
    "scenario, raises",
    [(s, r) for _, s, r in scenarios()],
    ids=[name for name, _, _ in scenarios()],
)
def test_everyMoveIsInTheTable(
    moves: set[tuple[Phase, Phase]],
    scenario: Callable[[FakeClient], Any],
    raises: type | None,
) -> None:
    """Each outcome of a migration moves its phase only along the table's edges."""
    play(scenario, raises)
    assert moves and moves <= TABLE


def test_theStepsMakeEveryMoveOfTheTable(moves: set[tuple[Phase, Phase]]) -> None:
    """Together the outcomes use every edge of the table: none is dead."""
    for _, scenario, raises in scenarios():
        play(scenario, raises)
    assert moves == TABLE


def test_theTableEndsInTheFinalPhases() -> None:
    """Every phase has its row; only COMMITTED, IN-DOUBT and ABORTED lead nowhere."""
    assert set(TRANSITIONS) == set(Phase)
    assert {p for p, targets in TRANSITIONS.items() if not targets} == FINAL
    assert leadingTo(Phase.TRANSFER) == [Phase.PREPARED, Phase.PRECOPIED]


def test_anIllegalMoveRaises() -> None:
    """A move the table lacks raises InvalidTransition and leaves the phase alone."""
    migration = prepared(FakeClient({"memory": MemoryKind()}))
    with pytest.raises(InvalidTransition, match="from PREPARED to COMMITTED"):
        migration._moveTo(Phase.COMMITTED)
    assert migration.phase is Phase.PREPARED
    run(migration.abort("done"))
    with pytest.raises(InvalidTransition, match="from ABORTED to READY"):
        migration._moveTo(Phase.READY)
    assert migration.phase is Phase.ABORTED


def test_aStepInTheWrongPhaseIsRefused() -> None:
    """commit before transfer raises MigrationAborted naming the phase it needs."""
    migration = prepared(FakeClient({"memory": MemoryKind()}))
    with pytest.raises(MigrationAborted, match="is PREPARED; this step needs READY"):
        run(migration.commit())
    assert migration.phase is Phase.PREPARED
    run(migration.abort("gave up"))
    with pytest.raises(
        MigrationAborted, match=r"\(gave up\); this step needs PREPARED"
    ):
        run(migration.transfer())


def test_anAbortRollsBackAndDropsTheStreams() -> None:
    """An abort after pre-copy tells the target, drops the stream, rolls back."""
    client = FakeClient({"memory": RoundsKind()})
    migration = prepared(client)
    run(migration.precopy(FixedRounds(1)))
    run(migration.abort("the guest crashed"))
    [run_] = migration.devices.values()
    assert migration.phase is Phase.ABORTED and migration.reason == "the guest crashed"
    assert run_.sender is not None and run_.sender.aborted  # type: ignore[union-attr]
    assert run_.device.rolledBack  # type: ignore[attr-defined]
    assert (b"xenmig-abort", {"migration_id": "m1", "reason": "the guest crashed"}) in (
        client.sent
    )


def test_anAbortedReportKeepsItsDurations() -> None:
    """An aborted migration's report has its total and the steps it made."""
    client = FakeClient({"memory": RoundsKind()})
    ticks = iter(range(100))
    migration = SourceMigration(client, "vm1", "m1", monotonic=lambda: next(ticks))
    run(migration.prepare([DeviceSpec.parse("memory:a:data=abc")]))
    run(migration.abort("the operator changed her mind"))
    report = migration.report()
    assert report["phase"] == "ABORTED"
    assert report["durations"]["prepare"] == 1
    assert report["durations"]["total"] is not None and report["durations"]["total"] > 1
    assert report["durations"]["commit"] is None


def test_aCommitInDoubtRefusesAbort() -> None:
    """IN-DOUBT refuses abort: the VM may already run on the target."""
    client = FakeClient({"memory": MemoryKind()})
    migration = prepared(client)
    run(migration.transfer())
    client.answers[commands.Commit] = lostCommit
    with pytest.raises(CommitInDoubt):
        run(migration.commit())
    assert migration.phase == "IN-DOUBT"
    with pytest.raises(CommitInDoubt, match="is IN-DOUBT; it cannot be aborted"):
        run(migration.abort("resume it"))


def test_thePhaseReadsAsItsName() -> None:
    """The phase compares equal to its name; the report gives that name as a str."""
    client = FakeClient({"memory": RoundsKind()})
    ticks = iter(range(100))
    migration = SourceMigration(client, "vm1", "m1", monotonic=lambda: next(ticks))
    assert migration.phase == "NEW"
    run(migration.prepare([DeviceSpec.parse("memory:a:data=abc")]))
    run(migration.transfer())
    run(migration.commit())
    report = migration.report()
    assert migration.phase == "COMMITTED"
    assert type(report["phase"]) is str and report["phase"] == "COMMITTED"
    assert report["installed"] == ["/vms/blob"]
    # The injected clock moves one second at each reading: the ninth is the commit's.
    assert report["durations"]["total"] == 8 and report["paused_window"] == 6
    assert [d["bytes"] for d in report["devices"]] == [3]


# -- the picture in doc/protocol.md ----------------------------------------------------


def block(marker: str) -> str:
    text = (DOC / "protocol.md").read_text()
    found = re.search(
        re.escape(f"<!-- {marker} -->") + r"\n```[a-z]*\n(.*?)```", text, re.DOTALL
    )
    assert found, f"no code block after <!-- {marker} -->"
    return found.group(1)


def test_protocolDocListsTheSourceEdges() -> None:
    """The edge list in protocol.md is exactly the source's transition table."""
    listed = block("edges of xenmig.source.phase.TRANSITIONS").splitlines()
    table = {f"{a.value} -> {b.value}" for a, bs in TRANSITIONS.items() for b in bs}
    assert len(listed) == len(set(listed)) and set(listed) == table


def test_protocolDocDrawsEverySourcePhase() -> None:
    """The diagram in protocol.md names every phase of the source."""
    diagram = block("diagram of xenmig.source.phase.TRANSITIONS")
    named = set(re.findall(r"\b[A-Z][A-Z-]+[A-Z]\b", diagram))
    assert named == {phase.value for phase in Phase}
