"""The blocking client, driven from plain threads of a process without Twisted code."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import CLIENT, PKI, Daemon, MiB, sparseFile

from xenmig.digest import hashFile

#: Run in a fresh interpreter: the blocking client owns that process's reactor
#: (pytest-twisted owns the reactor of the test process).
SCRIPT = textwrap.dedent(
    """
    import json, sys, threading
    from twisted.internet import reactor
    from xenmig import tls
    from xenmig.source.blocking import BlockingMigrationClient, shutdown
    from xenmig.source.client import tlsArguments
    from xenmig.errors import DeviceRefused
    from xenmig.model import DeviceSpec

    pki, port, source, inside, outside = sys.argv[1:6]
    arguments = tlsArguments(
        "127.0.0.1",
        tls.loadIdentity(f"{pki}/{CLIENT}.pem", f"{pki}/{CLIENT}.key"),
        tls.loadAuthority(f"{pki}/ca.pem"),
    )
    options = arguments["tls"]
    results = {}

    def migrate():
        client = BlockingMigrationClient(
            "127.0.0.1", int(port), **arguments, resume=True
        )
        # the state streams send from their own threads; a broken link reconnects
        results["streams"] = client._client.streamEndpoint.serverName
        results["resume"] = client._client.resume
        spec = DeviceSpec.parse(f"file:blob:path={source},target={inside}")
        migration = client.prepare("vm-blocking", [spec], "blocking-1")
        results["prepared"] = migration.phase
        migration.paused()
        results["digest"] = migration.transfer()["blob"].hex
        results["installed"] = migration.commit()
        results["report"] = migration.report()
        results["target"] = client.query("blocking-1")["phase"]
        refused = DeviceSpec.parse(f"file:blob:path={source},target={outside}")
        try:
            client.prepare("vm-blocking-2", [refused])
        except DeviceRefused as e:
            results["refused"] = str(e)

    worker = threading.Thread(target=migrate)
    worker.start()
    worker.join(60)

    def fromReactorThread():
        try:
            BlockingMigrationClient("127.0.0.1", int(port), tls=options).query("x")
        except RuntimeError as e:
            results["reactorThread"] = str(e)

    # A child whose pipes close before it exits: reaped without SIGCHLD handlers.
    from twisted.internet.utils import getProcessOutputAndValue
    from xenmig.source.blocking import _THREAD

    child = _THREAD.call(
        getProcessOutputAndValue, "/bin/sh", ["-c", "echo hi; sleep 0.05"],
        reactor=reactor,
    )
    results["child"] = [child[0].decode(), child[2]]

    done = threading.Event()
    reactor.callFromThread(lambda: (fromReactorThread(), done.set()))
    done.wait(10)
    shutdown()
    print(json.dumps(results))
    """
).replace("{CLIENT}", CLIENT)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    certs = PKI(tmp_path_factory.mktemp("pki"))
    running = Daemon(tmp_path_factory.mktemp("daemon"), certs).start()
    yield running
    running.stop()


def test_blocking_client_migrates_from_a_thread(daemon: Daemon, tmp_path: Path) -> None:
    """A plain thread prepares, transfers and commits a file with blocking calls."""
    source = sparseFile(tmp_path / "state.img", 3 * MiB, [(0, MiB), (2 * MiB, 3 * MiB)])
    inside = daemon.dest / "blocking.img"
    outside = tmp_path / "elsewhere.img"
    script = tmp_path / "blocking.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(daemon.pki.ca),
            str(daemon.port),
            str(source),
            str(inside),
            str(outside),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    digest = hashFile(str(source))
    assert results["prepared"] == "PREPARED"
    assert results["streams"] == "127.0.0.1"
    assert results["resume"] is True
    assert results["digest"] == digest.hex
    assert results["installed"] == [str(inside)]
    assert results["report"]["phase"] == "COMMITTED"
    assert results["target"] == "COMMITTED"
    assert hashFile(str(inside)) == digest
    assert "outside the allowed roots" in results["refused"]
    assert not outside.exists()
    assert "from the reactor thread" in results["reactorThread"]
    assert results["child"] == ["hi\n", 0]
