"""The README's "migration by hand" runs as written, on loopback, not two hosts."""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xenmig.clients.processes import freePort

README = Path(__file__).parent.parent / "README.md"


def commands():
    """The shell lines of the README's 'A migration by hand' block, joined."""
    text = README.read_text()
    section = text.split("## A migration by hand", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(shlex.split(line))
    return lines


def localise(argv, tmp, port):
    """The same command for one machine: loopback, a free port, paths in ``tmp``."""
    out = []
    for word in argv:
        word = word.replace("/srv/vms", str(tmp / "srv" / "vms"))
        word = word.replace("/var/lib/xenmig", str(tmp / "state"))
        word = re.sub(r"^target\.example:8002$", f"127.0.0.1:{port}", word)
        out.append(word)
    if out[:3] == ["twistd", "-n", "xenmig"]:
        out = ["twistd", "-n", "--pidfile=", "xenmig", "--interface", "127.0.0.1"]
        out += [w if w != "8002" else str(port) for w in localise(argv[3:], tmp, port)]
    if out[:2] == ["xenmig", "migrate"]:
        out += ["--server-name", "target.example"]  # its certificate's name
    if out[:2] == ["xenmig", "await"]:
        out += ["--state-dir", str(tmp / "state"), "--timeout", "30"]
    if out[0] == "xenmig":
        out = [sys.executable, "-m", "xenmig.cli.main", *out[1:]]
    return out


def waitForPort(port, daemon, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert daemon.poll() is None, daemon.stderr.read()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"the README's daemon did not listen on {port}")


def test_readmeMigrationByHand(tmp_path):
    """The README's commands make certificates, run a daemon, migrate and release."""
    port = freePort()
    vms = tmp_path / "srv" / "vms"
    vms.mkdir(parents=True)
    state = os.urandom(100_000)
    steps = commands()
    assert [s[:2] for s in steps] == [
        ["xenmig", "pki"],
        ["xenmig", "pki"],
        ["xenmig", "pki"],
        ["twistd", "-n"],
        ["xenmig", "migrate"],
        ["xenmig", "await"],
    ]
    for step in steps[:3]:
        subprocess.run(localise(step, tmp_path, port), cwd=tmp_path, check=True)
    daemon = subprocess.Popen(
        localise(steps[3], tmp_path, port),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        waitForPort(port, daemon)
        # The VM's state: the source and the target share /srv/vms here, so the
        # migrated file goes to a name of its own.
        (vms / "vm1.nvram").write_bytes(state)
        migrate = localise(steps[4], tmp_path, port)
        migrate = [
            w.replace(
                "target=" + str(vms / "vm1.nvram"),
                "target=" + str(vms / "vm1-migrated.nvram"),
            )
            for w in migrate
        ]
        done = subprocess.run(
            migrate, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert '"phase": "COMMITTED"' in done.stdout
        released = subprocess.run(
            localise(steps[5], tmp_path, port),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert released.returncode == 0, released.stderr
        assert (vms / "vm1-migrated.nvram").read_bytes() == state
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
