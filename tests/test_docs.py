"""The documentation in doc/: its examples run, and it matches the code it describes."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    UNIXClientEndpoint,
    UNIXServerEndpoint,
    connectProtocol,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import capturedLogs, globalLogPublisher
from twisted.protocols import amp
from twisted.python.filepath import FilePath

from xenmig import amp_commands, tap
from xenmig.digest import hashBytes
from xenmig.errors import (
    WIRE_ERRORS,
    DeviceRefused,
    PathNotAllowed,
    StreamError,
)
from xenmig.factories import ControlFactory, LocalControlFactory
from xenmig.model import DeviceDescription, DeviceSpec
from xenmig.records import DataRecord, EndRecord, RecordParser, ZeroRecord
from xenmig.source.client import MigrationClient
from xenmig.target.config import TargetConfig
from xenmig.target.core import MigrationTarget
from xenmig.target.hooks import runHook
from xenmig.target.logobserver import daemonObserver, eventAsJSON
from xenmig.target.session import DEVICE_TRANSITIONS, TRANSITIONS, Phase, TargetSession
from xenmig.target.summary import DeviceTotal, MigrationSummary
from xenmig.testing import FakeSourceContext, FakeTargetContext, PipeWriter

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "doc"
EXAMPLES = DOC / "examples"

sys.path.insert(0, str(EXAMPLES))
example_kind = importlib.import_module("example_kind")
migrate_example = importlib.import_module("migrate_example")
stream_example = importlib.import_module("stream_example")


def read(name: str) -> str:
    return (DOC / name).read_text()


def blockAfter(text: str, marker: str) -> str:
    """The fenced code block that follows the HTML comment ``marker``."""
    found = re.search(
        re.escape(f"<!-- {marker} -->") + r"\n```[a-z]*\n(.*?)```", text, re.DOTALL
    )
    assert found, f"no code block after <!-- {marker} -->"
    return found.group(1)


def edges(table: dict) -> set[str]:
    return {f"{a.value} -> {b.value}" for a, targets in table.items() for b in targets}


# -- the stream format -----------------------------------------------------------------


def test_streamListingIsTheScriptOutput():
    """The hex listing in stream-format.md is what stream_example.py prints."""
    script = EXAMPLES / "stream_example.py"
    output = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    marker = "output of doc/examples/" + script.name
    listing = blockAfter(read("stream-format.md"), marker)
    assert listing == output


def test_streamExampleParses():
    """xenmig's parser reads the example stream back into its records and digest."""
    stream = stream_example.exampleStream()
    parser = RecordParser()
    records = []
    for i in range(0, len(stream), 5):  # in small pieces, as a network would
        records.extend(parser.feed(stream[i : i + 5]))
    assert records == stream_example.exampleRecords()
    assert parser.bytesParsed == len(stream) and len(stream) % 8 == 0
    content = bytearray(records[-1].size)
    for record in records:
        if isinstance(record, DataRecord):
            content[record.offset : record.offset + len(record.data)] = record.data
        elif isinstance(record, ZeroRecord):
            content[record.offset : record.offset + record.length] = bytes(
                record.length
            )
    end = records[-1]
    assert isinstance(end, EndRecord)
    assert bytes(content) == stream_example.CONTENT
    assert (end.size, end.algorithm, end.digest) == (
        32,
        "blake3",
        hashBytes(bytes(content)).digest,
    )


# -- the control protocol --------------------------------------------------------------


def commands():
    return [
        value
        for value in vars(amp_commands).values()
        if inspect.isclass(value)
        and issubclass(value, amp.Command)
        and value.__module__ == amp_commands.__name__
    ]


def test_protocolDocumentsEveryCommand():
    """protocol.md has a section per command with its pinned name, arguments, answer."""
    text = read("protocol.md")
    assert len(commands()) == 16
    for command in commands():
        heading = f"### {command.__name__} — `{command.commandName.decode()}`"
        assert heading in text, heading
        section = text.split(heading, 1)[1].split("\n### ", 1)[0]
        for name, _ in command.arguments + command.response:
            assert f"`{name.decode()}`" in section, (command.__name__, name)


def test_protocolDocumentsEveryErrorCode():
    """Every wire error code appears in protocol.md's table next to its class."""
    text = read("protocol.md")
    for error, code in WIRE_ERRORS.items():
        assert f"| `{code.decode()}` | `{error.__name__}` |" in text, code


def test_protocolDocumentsVersions():
    """protocol.md names the protocol version and what a target accepts."""
    text = read("protocol.md")
    assert f"`PROTOCOL_VERSION` = {amp_commands.PROTOCOL_VERSION}" in text
    accepted = ", ".join(map(str, sorted(amp_commands.ACCEPTED_PROTOCOL_VERSIONS)))
    assert f"today only `{{{accepted}}}`" in text


# -- the state machines ----------------------------------------------------------------


@pytest.mark.parametrize(
    "table, name",
    [(TRANSITIONS, "TRANSITIONS"), (DEVICE_TRANSITIONS, "DEVICE_TRANSITIONS")],
)
def test_stateEdgesMatchTheTables(table, name):
    """The edge lists in sessions.md are exactly the edges of the transition tables."""
    text = read("sessions.md")
    listed = blockAfter(text, f"edges of xenmig.target.session.{name}").splitlines()
    assert len(listed) == len(set(listed))
    assert set(listed) == edges(table)


@pytest.mark.parametrize(
    "table, name",
    [(TRANSITIONS, "TRANSITIONS"), (DEVICE_TRANSITIONS, "DEVICE_TRANSITIONS")],
)
def test_stateDiagramsNameEveryState(table, name):
    """Each ASCII diagram in sessions.md names every state of its machine."""
    diagram = blockAfter(
        read("sessions.md"), f"diagram of xenmig.target.session.{name}"
    )
    named = set(re.findall(r"\b[A-Z]{5,}\b", diagram))
    assert named == {state.value for state in table}


# -- the daemon ------------------------------------------------------------------------


def options():
    """Every option of ``twistd xenmig``: (name, default)."""
    found = [(p[0], p[2]) for p in tap.Options.optParameters]
    found += [(f[0], None) for f in tap.Options.optFlags]
    return found + [("allow-root", None)]


def test_daemonDocumentsEveryOption():
    """Every option of tap.Options has a row in daemon.md, with its default."""
    rows = [line for line in read("daemon.md").splitlines() if line.startswith("| `--")]
    for name, default in options():
        row = [line for line in rows if line.startswith(f"| `--{name}")]
        assert len(row) == 1, name
        if default not in (None, ""):
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            assert f"| `{shown}` |" in row[0], (name, shown)
    assert len(rows) == len(options())


def commandLines(text: str, program: str) -> list[list[str]]:
    """The argument lists of ``program`` command lines in the doc's code blocks."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            words = shlex.split(line.split("=", 1)[1] if "ExecStart=" in line else line)
            while words and re.match(r"[A-Z_]+=", words[0]):  # environment
                words.pop(0)
            if words and words[0].endswith(program):
                lines.append(words)
    return lines


def test_daemonCommandLinesParse(tmp_path):
    """
    Every ``twistd ... xenmig`` line in daemon.md parses; one with ``--config``
    reads the doc's example file (its /etc/xenmig files made in a temp dir).
    """
    example = (ROOT / "doc" / "examples" / "xenmigd.toml").read_text()
    for name in ("ca.pem", "node2.pem", "node2.key"):
        (tmp_path / name).write_text("")
    config = tmp_path / "xenmigd.toml"
    config.write_text(example.replace("/etc/xenmig/", f"{tmp_path}/"))
    found = commandLines(read("daemon.md"), "twistd")
    assert len(found) == 4
    for words in found:
        assert "xenmig" in words, words
        arguments = words[words.index("xenmig") + 1 :]
        if "--config" in arguments:
            assert arguments == ["--config", "/etc/xenmig/xenmigd.toml"]
            arguments = ["--config", str(config)]
        options = tap.Options()
        options.parseOptions(arguments)
        assert options["port"] == 8002


def test_jsonLogCarriesMigrationIds(tmp_path):
    """The JSON log of daemon.md (--log-format json) writes events with their id."""
    path = tmp_path / "xenmig.json"
    clock = task.Clock()
    observer = daemonObserver("info", "json", {"logfile": str(path)}, clock)
    globalLogPublisher.addObserver(observer)
    try:
        TargetSession("m-42", "vm1", "source.test", [], clock, {Phase.PREPARED: 5})
        clock.advance(5)
    finally:
        globalLogPublisher.removeObserver(observer)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    events = [e for e in events if e["namespace"].startswith("xenmig.")]
    assert {e["namespace"] for e in events} == {"xenmig.target.session"}
    assert len(events) == 1  # the abort (its phase change is written at debug)
    assert all(e["migration_id"] == "m-42" for e in events)
    assert "did not finish within 5 seconds" in events[0]["reason"]
    assert not clock.getDelayedCalls()


def test_theSummaryExampleHasTheFieldsOfASummary():
    """daemon.md's JSON summary line has the fields a real summary line has."""
    example = json.loads(blockAfter(read("daemon.md"), "a summary line"))
    summary = MigrationSummary(
        "m-1",
        "vm1",
        "node1.example.org",
        "COMMITTED",
        "",
        (DeviceTotal("file", "blob", 3),),
        ((Phase.PREPARED, 0.5),),
        0.5,
        0.25,
    )
    with capturedLogs() as events:
        summary.log()
    [line] = [json.loads(eventAsJSON(e)) for e in events]
    assert list(example) == list(line)
    assert example["namespace"] == line["namespace"] == "xenmig.target.summary"
    assert {d["kind"] for d in example["devices"]} == {"file"}


# -- the example device kind -----------------------------------------------------------


def answerNow(target, method, payload):
    """The target handler's answer to a request (FakeSourceContext wants a value)."""
    answers = []
    target.handleRequest(method, payload).addCallback(answers.append)
    return answers[0]


async def counterPair(tmp_path, state=b'{"packets": 7, "drops": 0}'):
    """The two sides of a counter device over fakes, as the framework builds them."""
    (tmp_path / "vms").mkdir(exist_ok=True)
    source = tmp_path / "counters.json"
    source.write_bytes(state)
    spec = DeviceSpec.parse(f"counter:ctr:path={source},target=ctr.json")
    targets = []  # the source's requests go to the target device, built below
    sourceContext = FakeSourceContext(
        reactor, peer=lambda method, payload: answerNow(targets[0], method, payload)
    )
    sourceDevice = example_kind.counterKind.source(spec, sourceContext)
    # The framework adds the spec's target keys to what describe() says.
    description = (await sourceDevice.describe()).withTargetParams(spec)
    context = FakeTargetContext(
        reactor, [str(tmp_path / "vms")], stagingDir=str(tmp_path / "staging")
    )
    targets.append(example_kind.counterKind.target(description, context))
    return sourceDevice, targets[0]


@pytest_twisted.ensureDeferred
async def test_counterKindMigrates(tmp_path):
    """The counter kind moves its state, installed only at commit, source released."""
    source, target = await counterPair(tmp_path)
    source.accepted(await target.accept())
    writer = PipeWriter(target)
    sent = await source.sendFinal(writer)
    assert await writer.finish(sent) == sent  # what the framework checks
    destination = tmp_path / "vms" / "ctr.json"
    assert not destination.exists()
    assert await target.commit() == [str(destination)]
    await source.release()
    assert json.loads(destination.read_bytes()) == {"packets": 7, "drops": 0}
    assert os.listdir(tmp_path / "staging") == []
    assert (tmp_path / "counters.json.migrated").exists()
    assert not (tmp_path / "counters.json").exists()


@pytest_twisted.ensureDeferred
async def test_counterKindAbortLeavesNothing(tmp_path):
    """An abort after the state was staged leaves no destination and no staging."""
    source, target = await counterPair(tmp_path)
    await target.accept()
    writer = PipeWriter(target)
    await writer.finish(await source.sendFinal(writer))
    assert os.listdir(tmp_path / "staging") != []
    await target.abort()
    await source.rollback()
    assert not (tmp_path / "vms" / "ctr.json").exists()
    assert os.listdir(tmp_path / "staging") == []
    assert sorted(os.listdir(tmp_path)) == ["counters.json", "staging", "vms"]


@pytest_twisted.ensureDeferred
async def test_counterKindRefuses(tmp_path):
    """The counter target refuses an existing destination and one outside the roots."""
    (tmp_path / "vms").mkdir()
    (tmp_path / "vms" / "ctr.json").write_bytes(b"{}")
    source, target = await counterPair(tmp_path)
    with pytest.raises(DeviceRefused, match="already exists"):
        await target.accept()
    context = FakeTargetContext(reactor, [str(tmp_path / "vms")])
    description = DeviceDescription("counter", "c", 2, {"target": "../x", "format": 1})
    with pytest.raises(PathNotAllowed):
        example_kind.counterKind.target(description, context)
    context.cleanup()


@pytest_twisted.ensureDeferred
async def test_counterKindVerifies(tmp_path):
    """State that is not an object of integer counters fails the target's finish."""
    source, target = await counterPair(tmp_path)
    await target.accept()
    (tmp_path / "counters.json").write_bytes(b'{"packets": "many"}')
    writer = PipeWriter(target)
    sent = await source.sendFinal(writer)
    with pytest.raises(StreamError, match="not an object of integer counters"):
        await writer.finish(sent)


def test_dropinRegistersTheKind(tmp_path):
    """The dropin of handlers.md, placed in a plugin directory, makes the kind found."""
    import twisted.plugins
    from xenmig.plugins import deviceKinds

    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    shutil.copy(EXAMPLES / "counter_dropin.py", plugins / "counter_dropin.py")
    twisted.plugins.__path__.append(str(plugins))
    try:
        kinds = deviceKinds()
    finally:
        twisted.plugins.__path__.remove(str(plugins))
        sys.modules.pop("twisted.plugins.counter_dropin", None)
    assert kinds["counter"] is example_kind.counterKind
    assert "file" in kinds


def test_docsQuoteTheExamples():
    """Every code block marked as a quote is, verbatim, in the file it names."""
    quoted = 0
    for doc in DOC.glob("*.md"):
        text = doc.read_text()
        for name, block in re.findall(
            r"<!-- quoted from (\S+) -->\n```[a-z]*\n(.*?)```", text, re.S
        ):
            assert block in (ROOT / name).read_text(), (doc.name, name)
            quoted += 1
    assert quoted >= 8


MINE = [
    "index",
    "architecture",
    "protocol",
    "stream-format",
    "sessions",
    "gate-model",
    "handlers",
    "daemon",
]


def slug(heading: str) -> str:
    """The anchor a Markdown renderer makes of a heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


@pytest.mark.parametrize("page", MINE)
def test_linksResolve(page):
    """Every relative link of the page reaches a file, and every anchor a heading."""
    others = {"cli.md", "vtpm.md", "disk.md"}  # other authors' pages, maybe not yet
    for target in re.findall(r"\]\(([^)]+)\)", read(page + ".md")):
        if target.startswith("http"):
            continue
        path, _, anchor = target.partition("#")
        if path in others:
            continue
        resolved = (DOC / path) if path else DOC / (page + ".md")
        assert resolved.exists(), target
        if anchor:
            headings = re.findall(r"^#+ (.*)$", resolved.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, target


# -- the example kind and the toolstack example through a daemon -----------------------


class Daemon:
    """A target daemon in this process: plaintext on loopback, local socket, hook."""

    def __init__(self, tmp_path: Path) -> None:
        self.roots = tmp_path / "vms"
        self.roots.mkdir(exist_ok=True)
        # A short path: a unix socket's path is limited to about 100 bytes.
        self.state = Path(tempfile.mkdtemp(prefix="xenmig-doc-"))
        self.hookOutput = tmp_path / "hook.env"
        self.hooks: list[Deferred[int]] = []
        config = TargetConfig(
            FilePath(str(self.state)),
            allowedRoots=(FilePath(str(self.roots)),),
            onCommit=f"env | grep ^XENMIG_ | sort > {self.hookOutput}",
        )
        self.target = MigrationTarget(
            reactor,
            config,
            {"counter": example_kind.counterKind},
            lambda f, *a, **kw: deferToThreadPool(
                reactor, reactor.getThreadPool(), f, *a, **kw
            ),
            self.runHook,
        )
        self.target.recover()

    def runHook(
        self, command: str, env: dict[str, str], migrationId: str
    ) -> Deferred[int]:
        d = runHook(reactor, command, env, migrationId)
        self.hooks.append(d)
        return d

    async def start(self) -> None:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(ControlFactory(self.target, tls=False))
        socket = str(self.state / "control.sock")
        self.local = await UNIXServerEndpoint(reactor, socket).listen(
            LocalControlFactory(self.target)
        )
        self.toolstack = await connectProtocol(
            UNIXClientEndpoint(reactor, socket), amp.AMP()
        )

    def client(self) -> MigrationClient:
        port = self.port.getHost().port
        return MigrationClient(
            reactor, "127.0.0.1", port, kinds={"counter": example_kind.counterKind}
        )

    async def stop(self) -> None:
        self.toolstack.transport.loseConnection()
        await self.port.stopListening()
        await self.local.stopListening()
        shutil.rmtree(self.state, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_migrateExampleCommits(tmp_path):
    """The toolstack example moves a counter device through a daemon; the gate opens."""
    daemon = Daemon(tmp_path)
    await daemon.start()
    try:
        source = tmp_path / "counters.json"
        source.write_bytes(b'{"packets": 7}')
        spec = DeviceSpec.parse(f"counter:ctr:path={source},target=ctr.json")
        restored = daemon.toolstack.callRemote(
            amp_commands.AwaitRestored, domain="vm1", timeout=60.0
        )
        steps = []

        async def pause():
            steps.append("pause")

        async def resume():
            steps.append("resume")

        client = daemon.client()
        installed = await migrate_example.migrate(client, "vm1", [spec], pause, resume)
        gate = await restored
        await gatherResults(daemon.hooks)
        destination = str(daemon.roots / "ctr.json")
        assert installed == [destination] == gate["installed"]
        assert steps == ["pause"]
        assert Path(destination).read_bytes() == b'{"packets": 7}'
        assert (tmp_path / "counters.json.migrated").exists()
        status = await client.query(gate["migration_id"])
        assert status["phase"] == "COMMITTED"
        assert [d["state"] for d in status["devices"]] == ["COMMITTED"]
        assert daemon.hookOutput.read_text().splitlines() == [
            "XENMIG_DOMAIN=vm1",
            f"XENMIG_INSTALLED={destination}",
            f"XENMIG_MIGRATION_ID={gate['migration_id']}",
            "XENMIG_PEER=plaintext:127.0.0.1",
        ]
        assert os.listdir(daemon.state / "staging") == []
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_migrateExampleAborts(tmp_path):
    """State the target rejects aborts the session; the example resumes the VM here."""
    daemon = Daemon(tmp_path)
    await daemon.start()
    try:
        source = tmp_path / "counters.json"
        source.write_bytes(b'{"packets": 7}')
        spec = DeviceSpec.parse(f"counter:ctr:path={source},target=ctr.json")
        answer = daemon.toolstack.callRemote(
            amp_commands.AwaitRestored, domain="vm1", timeout=60.0
        )
        # Handled at once: its failure may come before the migration's own, and
        # AMP drops a connection whose call fails unhandled.
        restored: Deferred = Deferred()
        answer.addBoth(restored.callback)
        steps = []

        async def pauseAndSpoil():
            steps.append("pause")
            source.write_bytes(b"[1, 2]")  # the toy device wrote garbage

        async def resume():
            steps.append("resume")

        client = daemon.client()
        with pytest.raises(StreamError, match="not an object of integer counters"):
            await migrate_example.migrate(client, "vm1", [spec], pauseAndSpoil, resume)
        assert steps == ["pause", "resume"]
        with pytest.raises(Exception, match="aborted"):
            await restored
        [status] = await client.listMigrations()
        assert status["phase"] == "ABORTED"
        assert "not an object of integer counters" in status["reason"]
        assert not (daemon.roots / "ctr.json").exists()
        assert not (tmp_path / "counters.json.migrating").exists()
        assert os.listdir(daemon.state / "staging") == []
        assert not daemon.hooks
    finally:
        await daemon.stop()
