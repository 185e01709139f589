"""xend's device-migration steps mapped onto one xenmig migration per domain."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import PKI, Daemon, MiB, sparseFile

from xenmig.digest import hashFile
from xenmig.errors import (
    CommitInDoubt,
    DeviceRefused,
    InvalidTransition,
    StreamError,
)
from xenmig.model import DeviceSpec
from xenmig.toolstack.xend import (
    DEV_MIGRATE_STEP1,
    DEV_MIGRATE_STEP2,
    DEV_MIGRATE_STEP3,
    DEV_MIGRATE_TEST,
    XendMigrationHooks,
)

STEPS = (DEV_MIGRATE_TEST, DEV_MIGRATE_STEP1, DEV_MIGRATE_STEP2, DEV_MIGRATE_STEP3)
#: Two devices as xend's controllers know them (their sxp configurations).
CONFIGS = [["vtpm", ["instance", 1]], ["device_model", ["qmp", "/run/vm1.qmp"]]]


class FakeMigration:
    """A BlockingMigration that records its steps."""

    def __init__(self, calls: list[str], **failures: BaseException) -> None:
        self.migrationId = "m-1"
        self.calls = calls
        self.failures = failures
        self.transferred = threading.Event()

    def _do(self, name: str, result: Any = None) -> Any:
        self.calls.append(name)
        if name in self.failures:
            raise self.failures[name]
        return result

    def precopy(self, policy: Any = None) -> dict[str, list[int]]:
        return self._do("precopy", {})

    def paused(self) -> None:
        self._do("paused")

    def transfer(self) -> dict[str, Any]:
        try:
            return self._do("transfer", {})
        finally:
            self.transferred.set()

    def commit(self) -> list[str]:
        return self._do("commit", ["/installed"])

    def abort(self, reason: str) -> None:
        self._do("abort")

    def report(self) -> dict[str, Any]:
        return {"migration_id": self.migrationId}


class FakeClient:
    """A BlockingMigrationClient whose prepare hands out FakeMigrations."""

    def __init__(self, refuse: str = "", **failures: BaseException) -> None:
        self.calls: list[str] = []
        self.refuse = refuse
        self.failures = failures
        self.prepared: list[tuple[str, list[DeviceSpec]]] = []
        self.bandwidths: list[int | None] = []

    def prepare(
        self, domain: str, specs: list[DeviceSpec], bandwidth: int | None = None
    ) -> FakeMigration:
        self.calls.append("prepare")
        self.prepared.append((domain, list(specs)))
        self.bandwidths.append(bandwidth)
        if self.refuse:
            raise DeviceRefused(self.refuse)
        return FakeMigration(self.calls, **self.failures)


SPECS = [
    DeviceSpec.parse("vtpm:tpm0:ctrl=/run/tpm.ctrl,target-ctrl=/run/t.ctrl"),
    DeviceSpec.parse("devmodel:qemu:qmp=/run/vm1.qmp,target-qmp=/run/t.qmp"),
]


def hooks(client: FakeClient) -> tuple[XendMigrationHooks, list[str]]:
    hosts: list[str] = []

    def connect(host: str) -> FakeClient:
        hosts.append(host)
        return client

    return XendMigrationHooks(connect, lambda domain: SPECS), hosts


def step(h: XendMigrationHooks, number: int, network: bool = True) -> list[int]:
    """xend's migrateDevices: the step for every device of vm1, in order."""
    return [h.migrate(c, network, "hostb", number, "vm1") for c in CONFIGS]


def test_stepsMakeOneMigration() -> None:
    """Each step runs once for the whole domain; commit comes after step 3."""
    client = FakeClient()
    h, hosts = hooks(client)
    for number in STEPS:
        assert step(h, number) == [0, 0]
    assert h.commit("vm1") == ["/installed"]
    assert client.calls == ["prepare", "precopy", "paused", "transfer", "commit"]
    assert hosts == ["hostb"]
    assert client.prepared == [("vm1", SPECS)]
    assert h.commit("vm1") == ["/installed"]  # asked again: the same answer


def test_bandwidthReachesPrepare() -> None:
    """The hooks' bandwidth is the migration's: prepare is given it."""
    client = FakeClient()
    h = XendMigrationHooks(lambda host: client, lambda domain: SPECS, bandwidth=2**20)
    assert step(h, DEV_MIGRATE_TEST) == [0, 0]
    assert client.bandwidths == [2**20]


def test_refusalAtStep0() -> None:
    """A refused device answers -1 at step 0; a new attempt prepares again."""
    client = FakeClient(refuse="device tpm0: the target swtpm already runs a TPM")
    h, _ = hooks(client)
    assert step(h, DEV_MIGRATE_TEST) == [-1, -1]
    assert client.calls == ["prepare"]
    assert "already runs a TPM" in h.reason("vm1")
    client.refuse = ""
    assert step(h, DEV_MIGRATE_TEST) == [0, 0]  # xend tries again later
    assert client.calls == ["prepare", "prepare"]


def test_failedTransferIsRecoveredOnce() -> None:
    """A transfer that fails fails step 3; recovery aborts the migration once."""
    lost = StreamError("the stream of device qemu was lost")
    client = FakeClient(transfer=lost)
    h, _ = hooks(client)
    for number in STEPS[:3]:
        step(h, number)
    with pytest.raises(StreamError, match="was lost"):
        h.migrate(CONFIGS[0], True, "hostb", DEV_MIGRATE_STEP3, "vm1")
    for config in CONFIGS:  # xend's recovery loop
        assert h.recover_migrate(config, True, "hostb", 2, "vm1") == 0
    assert client.calls == ["prepare", "precopy", "paused", "transfer", "abort"]
    with pytest.raises(InvalidTransition, match="aborted"):
        h.commit("vm1")


def test_commitInDoubtNeverRecovers() -> None:
    """After a commit in doubt, recovery refuses: the domain must not resume."""
    client = FakeClient(commit=CommitInDoubt("no answer to the commit"))
    h, _ = hooks(client)
    for number in STEPS:
        step(h, number)
    with pytest.raises(CommitInDoubt):
        h.commit("vm1")
    with pytest.raises(CommitInDoubt, match="do not resume the domain here"):
        h.recover_migrate(CONFIGS[0], True, "hostb", 3, "vm1")
    assert "abort" not in client.calls


def test_localSaveIsNotAMigration() -> None:
    """A save to a local file (network False) does nothing."""
    client = FakeClient()
    h, _ = hooks(client)
    for number in STEPS:
        assert step(h, number, network=False) == [0, 0]
    assert client.calls == []


def test_stepsInOrder() -> None:
    """A step out of order, or a commit before step 3, is an error."""
    h, _ = hooks(FakeClient())
    step(h, DEV_MIGRATE_TEST)
    with pytest.raises(InvalidTransition, match="step 2 for domain vm1 after step 0"):
        h.migrate(CONFIGS[0], True, "hostb", DEV_MIGRATE_STEP2, "vm1")
    with pytest.raises(InvalidTransition, match="commit needs step 3"):
        h.commit("vm1")


# -- with a real daemon, from a process without Twisted code ---------------------------

#: xend's own sequence, driven from a plain thread as xend's would be.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from xenmig.source.blocking import shutdown
    from xenmig.model import DeviceSpec
    from xenmig.toolstack.xend import XendMigrationHooks, awaitRestored, tlsConnector

    pki, port, stateDir, first, second, inside = sys.argv[1:7]
    specs = {
        "vm-xend": [
            DeviceSpec.parse(f"file:a:path={first},target={inside}/a"),
            DeviceSpec.parse(f"file:b:path={second},target={inside}/b"),
        ],
        "vm-refused": [DeviceSpec.parse(f"file:a:path={first},target=/etc/a")],
    }
    connect = tlsConnector(
        f"{pki}/ca.pem", f"{pki}/source.test.pem", f"{pki}/source.test.key", int(port)
    )
    hooks = XendMigrationHooks(connect, specs.__getitem__)
    results = {"steps": []}
    for step in range(4):
        results["steps"].append(
            [hooks.migrate(c, True, "127.0.0.1", step, "vm-xend") for c in ("a", "b")]
        )
    results["installed"] = hooks.commit("vm-xend")
    client = connect("127.0.0.1")
    results["kept"] = [client is connect("127.0.0.1"), len(client._client.idle)]
    results["report"] = hooks.report("vm-xend")
    results["restored"] = awaitRestored(
        "vm-xend", stateDir, 30, results["report"]["migration_id"]
    )
    results["refused"] = hooks.migrate("a", True, "127.0.0.1", 0, "vm-refused")
    results["reason"] = hooks.reason("vm-refused")
    shutdown()
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    certs = PKI(tmp_path_factory.mktemp("pki"))
    running = Daemon(tmp_path_factory.mktemp("daemon"), certs).start()
    yield running
    running.stop()


def test_xendSequenceThroughADaemon(daemon: Daemon, tmp_path: Path) -> None:
    """xend's steps, commit and the target's awaitRestored over a real daemon."""
    first = sparseFile(tmp_path / "first", 2 * MiB, [(0, MiB)])
    second = sparseFile(tmp_path / "second", MiB, [(0, MiB)])
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(daemon.pki.ca),
            str(daemon.port),
            str(daemon.stateDir),
            str(first),
            str(second),
            str(daemon.dest),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results["steps"] == [[0, 0]] * 4
    assert sorted(results["installed"]) == [
        str(daemon.dest / "a"),
        str(daemon.dest / "b"),
    ]
    assert sorted(results["restored"]) == sorted(results["installed"])
    assert results["report"]["paused_window"] > 0
    assert hashFile(str(daemon.dest / "a")) == hashFile(str(first))
    assert results["refused"] == -1
    assert "outside the allowed roots" in results["reason"]
    # One client per host, keeping the committed migration's connection.
    assert results["kept"] == [True, 1]


# -- the example of doc/toolstacks.md ------------------------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "doc" / "examples"))
xend_save = importlib.import_module("xend_save")


class FakeDomain:
    """A domain as xend's example drives it: suspended, then resumed or destroyed."""

    def __init__(self, calls: list[str]) -> None:
        self.name = "vm1"
        self.calls = calls

    def suspend(self) -> None:
        self.calls.append("suspend")

    def resume(self) -> None:
        self.calls.append("resume")

    def destroy(self) -> None:
        self.calls.append("destroy")


def memory(calls: list[str], failAt: bool | None = None) -> Any:
    def send(final: bool) -> None:
        calls.append("memory final" if final else "memory live")
        if final is failAt:
            raise OSError("the memory stream broke")

    return send


def test_exampleMigratesThenDestroys() -> None:
    """The example commits after the last memory and then destroys the domain."""
    client = FakeClient()
    h, _ = hooks(client)
    xend_save.migrateDomain(
        h, FakeDomain(client.calls), CONFIGS, "hostb", memory(client.calls)
    )
    assert client.calls == [
        "prepare", "precopy", "memory live", "suspend", "paused", "transfer",
        "memory final", "commit", "destroy",
    ]  # fmt: skip


def test_exampleResumesWhenTheMemoryFails() -> None:
    """A memory stream that breaks after the devices: abort, and resume the domain."""
    client = FakeClient()
    h, _ = hooks(client)
    with pytest.raises(OSError, match="the memory stream broke"):
        xend_save.migrateDomain(
            h, FakeDomain(client.calls), CONFIGS, "hostb", memory(client.calls, True)
        )
    assert client.calls[-3:] == ["memory final", "abort", "resume"]
    assert "commit" not in client.calls


def test_exampleNeitherResumesNorDestroysInDoubt() -> None:
    """A commit in doubt leaves the domain suspended for the operator."""
    client = FakeClient(commit=CommitInDoubt("no answer"))
    h, _ = hooks(client)
    with pytest.raises(CommitInDoubt):
        xend_save.migrateDomain(
            h, FakeDomain(client.calls), CONFIGS, "hostb", memory(client.calls)
        )
    assert client.calls[-1] == "commit"
