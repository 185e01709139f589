"""
The commands of doc/toolstacks.md's "A QEMU-based toolstack", run as written: the
source VM, the target's swtpm, incoming QEMU and ``xenmig await --resume``, and
``xenmig migrate``.  Only paths, host names and certificates are put in place.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import CLIENT, PKI, Daemon

from xenmig.testing import requirePrograms

DOC = Path(__file__).parent.parent / "doc" / "toolstacks.md"


def blocks() -> list[list[list[str]]]:
    """The section's code blocks, each as its command lines (split into words)."""
    text = DOC.read_text()
    section = text[text.index("## A QEMU-based toolstack") :]
    section = section[: section.index("\n## ", 10)]
    found = []
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        joined = block.replace("\\\n", " ")
        found.append([shlex.split(line) for line in joined.splitlines() if line])
    return found


@pytest.fixture
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    requirePrograms("qemu-system-x86_64", "swtpm")
    pki = PKI(tmp_path_factory.mktemp("pki"))
    daemon = Daemon(tmp_path_factory.mktemp("target"), pki).start()
    source = Path(tempfile.mkdtemp(prefix="xm-doc-"))
    children: list[subprocess.Popen[bytes]] = []
    try:
        yield {"daemon": daemon, "source": source, "children": children}
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        daemon.stop()
        subprocess.run(["rm", "-rf", str(source)], check=False)


def localized(words: list[str], hosts: dict[str, Any], onSource: bool) -> list[str]:
    """``words`` with the doc's hosts and paths replaced by this test's."""
    daemon: Daemon = hosts["daemon"]
    source: Path = hosts["source"]
    ca = daemon.pki.ca
    replace = {
        "hostb.example": f"127.0.0.1:{daemon.port}",
        "ca.pem": str(ca / "ca.pem"),
        "hosta.pem": str(ca / f"{CLIENT}.pem"),
        "hosta.key": str(ca / f"{CLIENT}.key"),
        "/var/lib/xenmig": str(daemon.stateDir),
        "accel=kvm:tcg": "accel=tcg",  # KVM is not usable on these machines
    }
    out = []
    for word in words:
        for old, new in replace.items():
            word = (
                word.replace(old, new)
                if old.startswith(("/", "acc"))
                else (new if word == old else word)
            )
        # The source's image is on the source host; every other /srv/vms is the
        # target's (the daemon's allowed root).
        word = re.sub(r"(?<=disk:vda:path=)/srv/vms", str(source), word)
        word = word.replace("/srv/vms", str(source if onSource else daemon.dest))
        word = word.replace("/run", str(source))
        out.append(word)
    return out


def run(words: list[str], hosts: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Start one command line of the doc (``&`` and ``2>>FILE`` as a shell would)."""
    background = words[-1] == "&"
    words = [w for w in words if w != "&"]
    stderr: Any = subprocess.PIPE
    for word in list(words):
        if word.startswith("2>>"):
            words.remove(word)
            stderr = open(word[3:], "ab")  # noqa: SIM115 (the child holds it)
    if words[0] == "xenmig":
        words = [sys.executable, "-m", "xenmig.cli.main", *words[1:]]
    if words[0] == "swtpm":
        state = words[words.index("--tpmstate") + 1].split("=", 1)[1]
        os.makedirs(state, exist_ok=True)
    child = subprocess.Popen(words, stdout=subprocess.PIPE, stderr=stderr)
    hosts["children"].append(child)
    if words[0] == "swtpm":  # the QEMU after it connects to its control socket
        control = words[-1].split("path=", 1)[1]
        waitFor(lambda: os.path.exists(control), "the swtpm's socket")
    if not background and words[0] != sys.executable:
        child.wait(30)
    return child


def waitFor(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


def qmp(path: str, *commands: tuple[str, dict[str, Any]]) -> list[Any]:
    """Blocking: run QMP ``commands`` on the socket at ``path``; their answers."""
    answers = []
    with socket.socket(socket.AF_UNIX) as s, s.makefile("rw") as lines:
        s.connect(path)
        lines.readline()
        for name, arguments in (("qmp_capabilities", {}), *commands):
            lines.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
            lines.flush()
            while "event" in (answer := json.loads(lines.readline())):
                pass
            answers.append(answer.get("return", answer))
    return answers[1:]


def test_theQEMUToolstackCommandsMoveTheVM(hosts: dict[str, Any]) -> None:
    """The doc's commands, as written, move a QEMU VM with its disk and TPM."""
    sourceBlock, targetBlock, migrateBlock = blocks()
    source, daemon = hosts["source"], hosts["daemon"]
    with open(source / "vm1.raw", "wb") as image:  # the VM's 1 GiB disk
        image.write(os.urandom(1 << 20))
        image.truncate(1 << 30)
    for words in sourceBlock:
        run(localized(words, hosts, onSource=True), hosts)
    for words in targetBlock:
        child = run(localized(words, hosts, onSource=False), hosts)
    awaiting = child
    inQMP = str(daemon.dest / "vm1-in.qmp")
    waitFor(lambda: os.path.exists(inQMP), "the incoming QEMU's start")
    [migrate] = migrateBlock
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenmig.cli.main",
            *localized(migrate, hosts, False)[1:],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["phase"] == "COMMITTED"
    assert awaiting.wait(30) == 0, awaiting.communicate()
    status, nodes = qmp(
        inQMP, ("query-status", {}), ("query-named-block-nodes", {"flat": True})
    )
    assert status["status"] == "running"
    files = {n["node-name"]: n["file"] for n in nodes}
    installed = str(daemon.dest / "vm1.raw")
    assert files["vda"] == installed and "vda-placeholder" not in files
    with open(installed, "rb") as image, open(source / "vm1.raw", "rb") as original:
        assert image.read(1 << 20) == original.read(1 << 20)
