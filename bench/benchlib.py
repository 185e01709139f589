"""
What the end-to-end benchmarks share: where they work, the dense source file
they copy, a throwaway ``twistd
xenmig`` daemon, the ``xenmig`` command line, a process's figures from
``/proc``, running swtpms, an sshd of their own for ``scp`` and ``rsync``, and
the plain-socket copy they measure against.

Run as a script, it is the copy's two child processes:
``benchlib.py _receive PORT OUTPUT`` and ``benchlib.py _send PORT SOURCE``.
"""

from __future__ import annotations

import json
import os
import pstats
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from xenmig.clients.processes import daemonArgv, freePort, logSaysReady

MiB = 1024 * 1024
HERE = Path(__file__).resolve()
#: The ``xenmig`` command line, run by this interpreter (so the same xenmig).
XENMIG = [sys.executable, "-m", "xenmig.cli.main"]


def tmpfsOr(path: str, fallback: str) -> str:
    """``path`` if its parent exists (``/dev/shm``, RAM), else ``fallback``."""
    return path if os.path.isdir(os.path.dirname(path)) else fallback


#: Where the dense random source file is kept between runs (RAM: ``rm -r`` it).
DENSE_CACHE = tmpfsOr("/dev/shm/xenmig-bench-cache", "/tmp/xenmig-bench-cache")


def sourceFile(cache: Path, size: int) -> Path:
    """The dense random file of ``size`` bytes, made once and then reused."""
    path = cache / f"dense-{size // MiB}MiB.bin"
    if path.exists() and path.stat().st_size == size:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    need = size + 64 * MiB
    if shutil.disk_usage(cache).free < need:
        raise SystemExit(f"bench: {cache} has less than {need // MiB} MiB free")
    print(f"making {path} ({size // MiB} MiB of random data) ...", flush=True)
    partial = path.with_suffix(".part")
    with open(partial, "wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(os.urandom(8 * MiB))
        f.write(os.urandom(size % (8 * MiB)))
    partial.rename(path)
    return path


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
    go before ``xenmig`` (e.g. profiling), ``options`` after the others of
    ``xenmig`` (e.g. limits).
    """

    def __init__(
        self,
        work: Path,
        twistdOptions: Sequence[str] = (),
        options: Sequence[str] = (),
    ) -> None:
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
            *options,
        ]
        argv = daemonArgv(options, str(self.log), twistdOptions)
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, cwd=work)
        deadline = time.monotonic() + 30
        while not logSaysReady(self.log):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench: the daemon did not start:\n" + self.logText())
            time.sleep(0.05)

    def logText(self) -> str:
        """Blocking: the daemon's log so far."""
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


# -- a process's figures, from /proc ------------------------------------------------


def _status(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def peakRSS(pid: int) -> int:
    """VmHWM (the peak resident memory) of a live process, in bytes."""
    return _status(pid, "VmHWM")


def residentRSS(pid: int) -> int:
    """VmRSS (the resident memory now) of a live process, in bytes."""
    return _status(pid, "VmRSS")


def cpuSeconds(pid: int) -> float:
    """User + system CPU time of a live process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def childrenCPU(pid: int) -> float:
    """The CPU time of the reaped children of a live process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def waitForChildren(pid: int, seconds: float = 10.0) -> None:
    """Blocking: wait until the live process ``pid`` has no child left."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tasks = Path(f"/proc/{pid}/task")
        if not any((task / "children").read_text().strip() for task in tasks.iterdir()):
            return
        time.sleep(0.01)


# -- profiles ------------------------------------------------------------------------


def showProfile(
    what: str, path: Path, limit: int = 25, out: IO[str] | None = None
) -> None:
    """Print a cProfile file (the main thread only), by own and cumulative time."""
    out = out or sys.stdout
    if not path.exists():
        print(f"\n(no {what} profile: {path} is missing)", file=out)
        return
    stats = pstats.Stats(str(path), stream=out)
    print(f"\n== {what} profile ({path}): by own time ==", file=out)
    stats.sort_stats("tottime").print_stats(limit)
    print("== by cumulative time ==", file=out)
    stats.sort_stats("cumulative").print_stats(limit)


# -- swtpm ---------------------------------------------------------------------------


async def startSwtpm(reactor: Any, state: str, running: bool = True) -> Any:
    """
    A swtpm (L{xenmig.clients.swtpmprocess.SwtpmProcess}) on the new directory
    ``state``: running (initialised, ``TPM2_Startup`` done) as the VM's on a
    source host, or fresh (not initialised) as a target toolstack starts it.
    """
    from xenmig.clients.swtpmprocess import (
        TPM2_STARTUP_CLEAR,
        SwtpmProcess,
        responseCode,
        tpmCommand,
    )

    os.mkdir(state)
    swtpm = SwtpmProcess(reactor, state)
    await swtpm.start()
    if running:
        await swtpm.control.init()
        answer = await tpmCommand(reactor, swtpm.serverPath, TPM2_STARTUP_CLEAR)
        assert responseCode(answer) == 0, answer.hex()
    return swtpm


# -- sshd and scp ---------------------------------------------------------------------

#: The OpenSSH server the scp references run.
SSHD = "/usr/sbin/sshd"


class SSH:
    """An sshd of our own on 127.0.0.1, and the options to reach it."""

    def __init__(self, work: Path) -> None:
        self.dir = work / "ssh"
        self.dir.mkdir(mode=0o700)
        for name in ("host", "client"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f"]
                + [str(self.dir / name)],
                check=True,
            )
        (self.dir / "authorized_keys").write_text((self.dir / "client.pub").read_text())
        self.port = freePort()
        config = self.dir / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1\n"
            f"HostKey {self.dir / 'host'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            f"PidFile {self.dir / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
            "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
        )
        # sshd wants its privilege separation directory (the package's service
        # makes it at boot); an empty root-owned directory, left in place.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.log = open(self.dir / "sshd.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config), "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.options = [
            "-i",
            str(self.dir / "client"),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]
        self.user = os.environ.get("USER") or "root"
        deadline = time.monotonic() + 20
        while True:
            probe = subprocess.run(
                ["ssh", "-p", str(self.port), *self.options]
                + [f"{self.user}@127.0.0.1", "true"],
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.log.flush()
                raise SystemExit(
                    "bench: our sshd does not answer: "
                    + probe.stderr
                    + (self.dir / "sshd.log").read_text()
                )
            time.sleep(0.1)

    def scp(self, source: Path, target: Path, cipher: str | None = None) -> float:
        """``scp`` (with ``cipher``, or its default) and an fsync; the seconds."""
        return self.scpFigures(source, target, cipher)["wall"]

    def scpFigures(
        self, source: Path, target: Path, cipher: str | None = None
    ) -> dict[str, float]:
        """
        ``scp`` and an fsync: ``wall`` seconds, ``sender_cpu`` (scp and its
        ssh, from their rusage) and ``receiver_cpu`` (the session's sshd and
        ``scp -t``, reaped by the listening sshd) in CPU seconds.
        """
        before = childrenCPU(self.process.pid)
        argv = ["scp", "-q", "-P", str(self.port), *self.options]
        argv += ["-c", cipher] if cipher else []
        started = time.perf_counter()
        child = subprocess.Popen(
            [*argv, str(source), f"{self.user}@127.0.0.1:{target}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, status, usage = os.wait4(child.pid, 0)
        if status != 0:
            assert child.stderr is not None
            raise SystemExit(f"bench: scp failed: {child.stderr.read().decode()}")
        fsyncPath(target)
        wall = time.perf_counter() - started
        waitForChildren(self.process.pid)
        return {
            "wall": wall,
            "sender_cpu": usage.ru_utime + usage.ru_stime,
            "receiver_cpu": childrenCPU(self.process.pid) - before,
        }

    def rsync(self, source: Path, target: Path, *extra: str) -> float:
        shell = " ".join(["ssh", "-p", str(self.port), *self.options])
        return timed(
            ["rsync", *extra, "-e", shell, str(source)]
            + [f"{self.user}@127.0.0.1:{target}"],
            target,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.log.close()


def timed(argv: list[str], output: Path) -> float:
    """Run a copy command, then fsync its output; the seconds both took."""
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    fsyncPath(output)
    return time.perf_counter() - started


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
