"""
What the end-to-end benchmarks share: where they work, a throwaway ``twistd
xenmig`` daemon, and the plain-socket copy they measure against.

Run as a script, it is the copy's two child processes:
``benchlib.py _receive PORT OUTPUT`` and ``benchlib.py _send PORT SOURCE``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xenmig.clients.processes import daemonArgv, freePort, logSaysReady

MiB = 1024 * 1024
HERE = Path(__file__).resolve()


def tmpfsOr(path: str, fallback: str) -> str:
    """``path`` if its parent exists (``/dev/shm``, RAM), else ``fallback``."""
    return path if os.path.isdir(os.path.dirname(path)) else fallback


def fsyncPath(path: str | Path) -> None:
    """Blocking: fsync the file at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Daemon:
    """
    A ``twistd -n xenmig`` on 127.0.0.1 with a throwaway CA (``pki/``: the
    target ``target.test`` and the client ``source.test``), its state in
    ``work/state`` and its one allowed root ``work/dest``; ``twistdOptions``
    go before ``xenmig`` (e.g. profiling).
    """

    def __init__(self, work: Path, twistdOptions: Sequence[str] = ()) -> None:
        from xenmig.cli import pki

        self.work = work
        self.pki = work / "pki"
        pki.initCA(self.pki)
        pki.issueHost(self.pki, "target.test", ["127.0.0.1"])
        pki.issueHost(self.pki, "source.test")
        self.dest = work / "dest"
        self.dest.mkdir()
        self.state = work / "state"
        self.port = freePort()
        self.log = work / "daemon.log"
        options = [
            f"--port={self.port}",
            "--interface=127.0.0.1",
            f"--state-dir={self.state}",
            f"--allow-root={self.dest}",
            f"--ca={self.pki / 'ca.pem'}",
            f"--cert={self.pki / 'target.test.pem'}",
            f"--key={self.pki / 'target.test.key'}",
        ]
        argv = daemonArgv(options, str(self.log), twistdOptions)
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, cwd=work)
        deadline = time.monotonic() + 30
        while not logSaysReady(self.log):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench: the daemon did not start:\n" + self._log())
            time.sleep(0.05)

    def _log(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def clientOptions(self) -> list[str]:
        """The options of ``xenmig migrate`` that reach this daemon."""
        return [
            f"--target=127.0.0.1:{self.port}",
            f"--ca={self.pki / 'ca.pem'}",
            f"--cert={self.pki / 'source.test.pem'}",
            f"--key={self.pki / 'source.test.key'}",
        ]

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM (which also writes a profile), SIGKILL after ``grace`` s."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


# -- the plain-socket copy -----------------------------------------------------------


def receive(port: int, output: str) -> None:
    """
    Child: accept one connection, write what arrives to ``output``, fsync; print
    the bytes, the seconds from accept to fsync and the peak RSS as JSON.
    """
    listener = socket.create_server(("127.0.0.1", port))
    print("listening", flush=True)
    connection, _ = listener.accept()
    started = time.monotonic()
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    total = 0
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    while n := connection.recv_into(buffer):
        os.write(fd, view[:n])
        total += n
    os.fsync(fd)
    os.close(fd)
    elapsed = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"bytes": total, "seconds": elapsed, "rss": usage.ru_maxrss}))


def send(port: int, source: str) -> None:
    """Child: stream ``source`` to 127.0.0.1:``port``."""
    with socket.create_connection(("127.0.0.1", port)) as connection:
        with open(source, "rb", buffering=0) as f:
            buffer = bytearray(MiB)
            while n := f.readinto(buffer):
                connection.sendall(memoryview(buffer)[:n])


def plainCopy(source: Path, output: Path) -> dict[str, Any]:
    """
    A sender and a receiver process over plain TCP on 127.0.0.1 (no TLS, no
    framing, no hashing): the receiver's figures (see L{receive}), and
    ``wall``, the seconds from starting the processes to the receiver's exit.
    """
    port = freePort()
    started = time.perf_counter()
    receiver = subprocess.Popen(
        [sys.executable, str(HERE), "_receive", str(port), str(output)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    assert receiver.stdout.readline().strip() == "listening"
    subprocess.run(
        [sys.executable, str(HERE), "_send", str(port), str(source)], check=True
    )
    figures: dict[str, Any] = json.loads(receiver.stdout.read())
    if receiver.wait() != 0:
        raise SystemExit("bench: the plain-socket receiver failed")
    figures["wall"] = time.perf_counter() - started
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["_receive"]:
        receive(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1:2] == ["_send"]:
        send(int(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit("benchlib.py: _receive PORT OUTPUT | _send PORT SOURCE")
