"""
Shared pytest set-up: tests/ on sys.path for the helper modules kept there, and
the fixtures more than one module uses.
"""

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from daemons import PKI, Daemon  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from nethosts import network  # noqa: E402, F401  (namespaced hosts, for any test)

from xenmig.clients.processes import freePort  # noqa: E402
from xenmig.testing import requirePrograms  # noqa: E402

MiB = 1024 * 1024


@pytest.fixture(scope="session", autouse=True)
def noUserClientConfig(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The command lines the tests run read no client.toml of the user running them."""
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))


@pytest.fixture(scope="session")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """
    An XFS with reflinks (``mkfs.xfs -m reflink=1``), 1 GiB sparse, loop-mounted
    for the session; as root.  Skips where it cannot be made (fails under CI).
    """
    requirePrograms("mkfs.xfs", "mount", "umount")
    backing = tmp_path_factory.mktemp("xfs") / "xfs.img"
    with open(backing, "wb") as f:
        f.truncate(1024 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(backing)], check=True)
    mountpoint = tmp_path_factory.mktemp("xfs-mount")
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(backing), str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        reason = mounted.stderr.strip()
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"cannot loop-mount an XFS on CI: {reason}")
        pytest.skip(f"cannot loop-mount an XFS here: {reason}")
    try:
        yield mountpoint
    finally:
        # a process a failed test left behind may still hold a file there: detach
        # the mount lazily then, so no mount outlives the session (the loop device
        # goes with it)
        if subprocess.run(["umount", str(mountpoint)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)
        backing.unlink()


@pytest.fixture
def space(xfs: Path, request: Any) -> Iterator[Path]:
    """A directory of its own on the XFS, emptied afterwards."""
    directory = xfs / request.node.name
    directory.mkdir()
    yield directory
    for path in directory.rglob("*"):
        if path.is_file():
            path.unlink()


@pytest.fixture
def daemons(tmp_path: Path, certs: PKI) -> Iterator[Callable[..., Daemon]]:
    """
    Make daemons (not started) with extra options, with the module's ``certs``;
    all are stopped afterwards.
    """
    made: list[Daemon] = []

    def make(*extra: str) -> Daemon:
        made.append(Daemon(tmp_path / f"daemon{len(made)}", certs, *extra))
        return made[-1]

    yield make
    for daemon in made:
        daemon.stop()


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[Callable[[Daemon], FaultProxy]]:
    """Fault proxies on 127.0.0.1 in front of daemons; all stopped afterwards."""
    started: list[FaultProxy] = []

    def start(daemon: Daemon) -> FaultProxy:
        listen = f"127.0.0.1:{freePort()}"
        control = str(tmp_path / f"proxy{len(started)}.sock")
        here = os.path.join(os.path.dirname(__file__), "faultproxy.py")
        process = subprocess.Popen(
            [sys.executable, here, "--listen", listen, "--connect",
             f"127.0.0.1:{daemon.port}", "--control", control],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "ready" in line, line + process.stdout.read()
        started.append(FaultProxy(process, listen, control))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()
