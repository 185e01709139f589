"""Running swtpm: its features, the process and its sockets, and raw TPM commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenmig.clients.swtpm import (
    SwtpmError,
    SwtpmNotInstalled,
    SwtpmProtocolError,
    SwtpmStartFailed,
    SwtpmUnavailable,
)
from xenmig.clients.swtpmcontrol import DEFAULT_TIMEOUT, SwtpmControl, controlEndpoint

log = Logger()

#: The oldest swtpm whose control channel has what migration needs.
MIN_VERSION = (0, 6, 0)
_DONE = Failure(ConnectionDone())


@dataclass(frozen=True)
class KeyOption:
    """An AES key in a file, for ``--key`` or ``--migration-key``."""

    path: str
    mode: str = "aes-256-cbc"
    format: str = "binary"

    def argument(self) -> str:
        """The option's value, e.g. ``file=/k,mode=aes-256-cbc,format=binary``."""
        return f"file={self.path},mode={self.mode},format={self.format}"


@dataclass(frozen=True)
class SwtpmFeatures:
    """What the installed swtpm can do."""

    executable: str
    version: tuple[int, ...]
    capabilities: frozenset[str]
    migrationKey: bool


def _version(numbers: tuple[int, ...]) -> str:
    return ".".join(str(n) for n in numbers)


async def swtpmFeatures(reactor: Any, executable: str = "swtpm") -> SwtpmFeatures:
    """
    Find out which swtpm is installed and what it supports.

    @raise SwtpmNotInstalled: if it is missing, does not run, or is too old.
    """
    path = shutil.which(executable)
    if path is None:
        raise SwtpmNotInstalled(
            f"swtpm is not installed (no {executable!r} in PATH): install swtpm "
            f"{_version(MIN_VERSION)} or later (Debian: apt-get install swtpm)"
        )
    out, err, code = await getProcessOutputAndValue(
        path, ["--version"], env=dict(os.environ), reactor=reactor
    )
    version = re.search(rb"version (\d+)\.(\d+)\.(\d+)", out + err)
    if code != 0 or version is None:
        raise SwtpmNotInstalled(f"{path} does not run as swtpm ({err[-200:]!r})")
    numbers = tuple(int(n) for n in version.groups())
    if numbers < MIN_VERSION:
        raise SwtpmNotInstalled(
            f"{path} is swtpm {_version(numbers)}, older than the "
            f"{_version(MIN_VERSION)} xenmig needs: upgrade swtpm"
        )
    helpText, _, _ = await getProcessOutputAndValue(
        path, ["socket", "--help"], reactor=reactor
    )
    capabilities: frozenset[str] = frozenset()
    capsOut, _, capsCode = await getProcessOutputAndValue(
        path, ["socket", "--tpm2", "--print-capabilities"], reactor=reactor
    )
    if capsCode == 0:
        try:
            capabilities = frozenset(json.loads(capsOut).get("features", ()))
        except ValueError:
            pass
    return SwtpmFeatures(path, numbers, capabilities, b"--migration-key" in helpText)


class _SwtpmProcessProtocol(ProcessProtocol):
    """Keeps the tail of swtpm's output and tells its owner when it ends."""

    def __init__(self, ended: Callable[[Failure], None]) -> None:
        self.output = bytearray()
        self._ended = ended

    def outReceived(self, data: bytes) -> None:
        self.output += data
        del self.output[:-4096]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self._ended(reason)


class SwtpmProcess:
    """
    A swtpm (TPM 2) this process runs in the foreground under ``spawnProcess``.

    The TPM command socket is ``SOCKETDIR/tpm.sock`` and the control socket
    ``SOCKETDIR/tpm.sock.ctrl`` (where tpm2-tools' swtpm TCTI looks for it).  It is
    started without INIT, as a migration target must be: INIT through L{control}.
    """

    def __init__(
        self,
        reactor: Any,
        stateDir: str,
        socketDir: str | None = None,
        key: KeyOption | None = None,
        migrationKey: KeyOption | None = None,
        flags: Sequence[str] = (),
        server: bool = True,
        executable: str = "swtpm",
        startTimeout: float = 10.0,
        stopGrace: float = 3.0,
        controlTimeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.stateDir = stateDir
        self._ownSocketDir = socketDir is None and len(stateDir) > 90
        if self._ownSocketDir:
            socketDir = tempfile.mkdtemp(prefix="xenmig-swtpm-")
        self.socketDir = socketDir or stateDir
        self.key, self.migrationKey, self.flags = key, migrationKey, tuple(flags)
        self.server = server
        self.executable = executable
        self.startTimeout, self.stopGrace = startTimeout, stopGrace
        self.serverPath = os.path.join(self.socketDir, "tpm.sock")
        self.ctrlPath = self.serverPath + ".ctrl"
        self.control = SwtpmControl(reactor, self.ctrlPath, controlTimeout)
        self.pid: int | None = None
        self.ended: Failure | None = None
        self._transport: Any = None
        self._waiters: list[Deferred[None]] = []
        self._protocol = _SwtpmProcessProtocol(self._processEnded)

    @property
    def output(self) -> str:
        """The last few KiB swtpm printed, for error messages."""
        return self._protocol.output.decode("utf-8", "replace").strip()

    def arguments(self) -> list[str]:
        """The argument vector swtpm is started with."""
        args = [
            self.executable,
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={self.stateDir}",
            "--ctrl",
            f"type=unixio,path={self.ctrlPath}",
        ]
        if self.server:  # without it, the TPM socket comes over CMD_SET_DATAFD
            args += ["--server", f"type=unixio,path={self.serverPath}"]
        if self.key is not None:
            args += ["--key", self.key.argument()]
        if self.migrationKey is not None:
            args += ["--migration-key", self.migrationKey.argument()]
        if self.flags:
            args += ["--flags", ",".join(self.flags)]
        return args

    def start(self) -> Deferred[SwtpmProcess]:
        """Spawn swtpm; a Deferred firing with self once its control socket answers."""
        return Deferred.fromCoroutine(self._start())

    def spawn(self) -> None:
        """Spawn swtpm without waiting for it (L{start} waits)."""
        path = shutil.which(self.executable)
        if path is None:
            raise SwtpmNotInstalled(
                f"swtpm is not installed (no {self.executable!r} in PATH): install "
                f"swtpm (Debian: apt-get install swtpm)"
            )
        args = self.arguments()
        self._transport = self.reactor.spawnProcess(
            self._protocol, path, args, env=dict(os.environ)
        )
        self.pid = self._transport.pid
        log.debug("started swtpm {pid}: {args}", pid=self.pid, args=args)

    async def _start(self) -> SwtpmProcess:
        self.spawn()
        deadline = self.reactor.seconds() + self.startTimeout
        try:
            while True:
                if self.ended is not None:
                    raise SwtpmStartFailed(
                        f"swtpm for {self.stateDir} exited during start-up "
                        f"({self.ended.value}): {self.output or 'no output'}"
                    )
                try:
                    await self.control.getCapability()
                    return self
                except SwtpmUnavailable:
                    if self.reactor.seconds() >= deadline:
                        raise SwtpmStartFailed(
                            f"swtpm for {self.stateDir} did not open its control "
                            f"socket {self.ctrlPath} within {self.startTimeout:g}s: "
                            f"{self.output or 'no output'}"
                        )
                await deferLater(self.reactor, 0.01)
        except BaseException:
            await self.stop()
            raise

    def _processEnded(self, reason: Failure) -> None:
        self.ended = reason
        self._transport = None
        if self._ownSocketDir:
            shutil.rmtree(self.socketDir, ignore_errors=True)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    @property
    def running(self) -> bool:
        """Whether the swtpm process is still alive."""
        return self.pid is not None and self.ended is None

    def whenEnded(self) -> Deferred[None]:
        """A Deferred firing when the process has exited (now, if it has)."""
        d: Deferred[None] = Deferred()
        if self.ended is not None or self.pid is None:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def signal(self, name: str) -> None:
        """Send a signal (``"TERM"``, ``"KILL"``) if the process still runs."""
        if self._transport is not None:
            try:
                self._transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def stop(self) -> Deferred[None]:
        """SIGTERM, then SIGKILL after the grace period; fires once it exited."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if not self.running:
            return
        ended = self.whenEnded()
        self.signal("TERM")
        timer = self.reactor.callLater(self.stopGrace, self.signal, "KILL")
        try:
            await ended
        finally:
            if timer.active():
                timer.cancel()

    def shutdown(self) -> Deferred[None]:
        """Ask swtpm to end through its control channel (SIGTERM if it will not)."""
        return Deferred.fromCoroutine(self._shutdown())

    async def _shutdown(self) -> None:
        if not self.running:
            return
        try:
            await self.control.shutdown()
        except SwtpmError:
            pass
        ended = self.whenEnded()
        timer = self.reactor.callLater(self.stopGrace, self.stop)
        try:
            await ended
        finally:
            if timer.active():
                timer.cancel()


# -- the TPM command channel ---------------------------------------------------------

_TPM_HEADER = struct.Struct(">HII")  # tag, size, response code


class _TPMExchange(Protocol):
    """Sends one TPM command and collects the response its header announces."""

    transport: Any

    def __init__(self, command: bytes, answered: Deferred[bytes]) -> None:
        self.command = command
        self.answered = answered
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(self.command)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= _TPM_HEADER.size and not self.answered.called:
            size = _TPM_HEADER.unpack_from(self.buffer)[1]
            if len(self.buffer) >= size:
                self.transport.loseConnection()
                self.answered.callback(self.buffer[:size])

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if not self.answered.called:
            self.answered.errback(
                SwtpmProtocolError(f"the TPM closed the connection ({reason.value})")
            )


async def tpmCommand(
    reactor: Any, address: str, command: bytes, timeout: float = DEFAULT_TIMEOUT
) -> bytes:
    """
    Send one raw TPM command to swtpm's TPM socket; the whole response.

    ``address`` is the server socket path (or ``tcp:HOST:PORT``).  The TPM response
    code is the big-endian u32 at offset 6 (see L{responseCode}).
    """
    answered: Deferred[bytes] = Deferred()
    endpoint = controlEndpoint(reactor, address, timeout)
    protocol: Any = await endpoint.connect(
        Factory.forProtocol(lambda: _TPMExchange(command, answered))
    )
    answered.addTimeout(timeout, reactor)
    try:
        return await answered
    finally:
        protocol.transport.loseConnection()


def responseCode(response: bytes) -> int:
    """The response code of a raw TPM response."""
    return _TPM_HEADER.unpack_from(response)[2]


#: TPM2_Startup(TPM_SU_CLEAR): a resumed TPM answers TPM_RC_INITIALIZE (0x100).
TPM2_STARTUP_CLEAR = bytes.fromhex("80010000000c000001440000")
TPM_RC_INITIALIZE = 0x100
