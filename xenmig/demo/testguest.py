"""A tiny real QEMU guest that counts in memory, for device-model migration tests."""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from xenmig.clients.qmp import QMPConnectionError
from xenmig.clients.qmpclient import QMPClient, connectQMP

QEMU = "qemu-system-x86_64"

#: Physical address of the guest's 32-bit little-endian counter.
COUNTER_ADDRESS = 0x500

# The guest is a 64 KiB firmware image given to QEMU with ``-bios``: no disk (so
# no image locking between a source and a target QEMU on one host), no SeaBIOS,
# and the counter runs from the first instruction.  QEMU maps the image at
# 0xF0000 (and at 0xFFFF0000); the CPU starts in real mode at F000:FFF0.
#
# The counting loop, at image offset 0 (physical 0xF0000):
_COUNTER_LOOP = bytes(
    [
        0xFA,  # 00: cli                     no interrupts, nothing else runs
        0x31, 0xC0,  # 01: xor ax, ax        ax = 0
        0x8E, 0xD8,  # 03: mov ds, ax        data segment 0: [x] is physical x
        # 05: mov dword [0x500], 0           start the counter at zero
        0x66, 0xC7, 0x06, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00,
        # 0E: inc dword [0x500]              the count (0x66: 32-bit operand)
        0x66, 0xFF, 0x06, 0x00, 0x05,
        0x31, 0xC9,  # 13: xor cx, cx        delay: cx = 0 means 65536 turns,
        0xE2, 0xFE,  # 15: loop 15           so 32 bits last days, not seconds
        0xEB, 0xF5,  # 17: jmp 0E            0x19 - 0x0B = 0x0E
    ]
)  # fmt: skip

# The dirtying variant counts once per sweep over 512 KiB of RAM (physical
# 0x10000-0x8FFFF, 128 pages), which it fills with the count: memory that a live
# migration must send again and again.
_DIRTYING_LOOP = bytes(
    [
        0xFA, 0xFC,  # 00: cli; cld           string stores go upwards
        0x31, 0xC0,  # 02: xor ax, ax
        0x8E, 0xD8,  # 04: mov ds, ax
        0x66, 0xC7, 0x06, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00,  # 06: [0x500] = 0
        0x66, 0xFF, 0x06, 0x00, 0x05,  # 0F: inc dword [0x500]      the count
        0xBB, 0x00, 0x10,  # 14: mov bx, 0x1000        first segment
        0x8E, 0xC3,  # 17: mov es, bx
        0x31, 0xFF,  # 19: xor di, di
        0xB9, 0x00, 0x80,  # 1B: mov cx, 0x8000        64 KiB in words
        0xA1, 0x00, 0x05,  # 1E: mov ax, [0x500]
        0xF3, 0xAB,  # 21: rep stosw             fill the segment
        0x81, 0xC3, 0x00, 0x10,  # 23: add bx, 0x1000
        0x81, 0xFB, 0x00, 0x90,  # 27: cmp bx, 0x9000
        0x72, 0xEA,  # 2B: jb 17                 next segment
        0xEB, 0xE0,  # 2D: jmp 0F                next sweep
    ]
)  # fmt: skip

# At the reset vector, image offset 0xFFF0 (physical 0xFFFF0 / 0xFFFFFFF0):
_RESET_VECTOR = bytes([0xEA, 0x00, 0x00, 0x00, 0xF0])  # jmp far F000:0000

IMAGE_SIZE = 64 * 1024  # QEMU wants a firmware image in whole 64 KiB units


def guestImage(dirtying: bool = False) -> bytes:
    """
    The firmware image: the counting loop (``dirtying``: the loop that also
    rewrites 512 KiB of RAM per count), and a jump to it at reset.
    """
    loop = _DIRTYING_LOOP if dirtying else _COUNTER_LOOP
    image = bytearray(b"\xff" * IMAGE_SIZE)
    image[: len(loop)] = loop
    image[0xFFF0 : 0xFFF0 + len(_RESET_VECTOR)] = _RESET_VECTOR
    return bytes(image)


def writeGuestImage(path: str, dirtying: bool = False) -> None:
    """Write the guest's firmware image (64 KiB) to ``path``."""
    with open(path, "wb") as f:
        f.write(guestImage(dirtying))


def tcgRAM(mib: int) -> str:
    """
    QEMU's ``-m`` (and a memory backend's ``size``) for a TCG guest of ``mib``
    MiB that QEMU 7.2 migrates live without losing its writes: 8 KiB more.

    Before 9.0 (commit 03bfc2188f, "physmem: Fix migration dirty bitmap
    coherency with TCG memory access"), QEMU syncs the dirty bitmap of a RAM
    block that is a whole number of 64-page words with a fast path that leaves
    TCG's TLB entries writable without tracking: a store through one after a
    sync is never marked dirty, and the target gets the page as it was.  A block
    of any other size takes the page-by-page path, which resets those entries.
    See doc/devmodel.md, "TCG caveat".
    """
    return f"{tcgRAMBytes(mib) // 1024}k"


def tcgRAMBytes(mib: int) -> int:
    """L{tcgRAM} in bytes: the size of a file backing that RAM."""
    return mib * 1024 * 1024 + 8 * 1024


def qemuCommand(image: str, qmpSocket: str, incoming: bool = False) -> list[str]:
    """
    The command line of a QEMU running the counting guest.

    With ``incoming``, QEMU waits for ``migrate-incoming`` (``-incoming defer``)
    and stays paused after loading (``-S``) until ``cont``.  Source and target
    must use the same image.
    """
    command = [
        QEMU,
        "-machine", "pc,accel=tcg",
        "-m", tcgRAM(16),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-serial", "none",
        "-bios", image,
        "-qmp", f"unix:{qmpSocket},server=on,wait=off",
    ]  # fmt: skip
    if incoming:
        command += ["-S", "-incoming", "defer"]
    return command


def qemuIOWrite(node: str, offset: int, length: int, pattern: int) -> str:
    """The HMP command line writing ``length`` bytes of ``pattern`` at ``offset``."""
    return f'qemu-io {node} "write -P {pattern} {offset} {length}"'


def writeThroughQEMU(
    qmp: QMPClient, node: str, offset: int, length: int, pattern: int
) -> Deferred[Any]:
    """
    A write through QEMU's block layer on ``node``, as a guest's would be, so that
    its dirty bitmaps see it (``qemu-io`` prints its report on QEMU's standard
    output, not in the answer).
    """
    line = qemuIOWrite(node, offset, length, pattern)
    return qmp.execute("human-monitor-command", {"command-line": line})


def guestWrites(
    qmpSocket: str, writes: list[tuple[int, int, int]], node: str = "disk0"
) -> None:
    """
    Blocking, for a child process (a test's or a benchmark's pause command):
    write ``(offset, length, pattern)`` through QEMU's block layer on ``node``
    (HMP ``qemu-io``, so that its dirty bitmaps see them), as a guest's last
    writes before its pause, then stop the VM (QMP ``stop``).
    """
    import json
    import socket

    with socket.socket(socket.AF_UNIX) as qmp, qmp.makefile("rw") as lines:
        qmp.connect(qmpSocket)

        def execute(command: str, **arguments: Any) -> None:
            lines.write(json.dumps({"execute": command, "arguments": arguments}))
            lines.write("\n")
            lines.flush()
            while "event" in (answer := json.loads(lines.readline())):
                pass
            if "return" not in answer:
                raise RuntimeError(f"QEMU refused {command}: {answer}")

        lines.readline()  # the greeting
        execute("qmp_capabilities")
        for offset, length, pattern in writes:
            line = qemuIOWrite(node, offset, length, pattern)
            execute("human-monitor-command", **{"command-line": line})
        execute("stop")


def findQEMU() -> str | None:
    """The path of ``qemu-system-x86_64``, or None when it is not installed."""
    return shutil.which(QEMU)


_XP_LINE = re.compile(r"^\s*[0-9a-fA-F]+:\s*0x([0-9a-fA-F]+)\s*$")


def readCounter(qmp: QMPClient) -> Deferred[int]:
    """A Deferred firing with the guest's counter, read with HMP ``xp``."""

    def parse(output: str) -> int:
        match = _XP_LINE.match(output)
        if match is None:
            raise ValueError(f"unexpected xp output from QEMU: {output!r}")
        return int(match.group(1), 16)

    return qmp.execute(
        "human-monitor-command", {"command-line": f"xp /1wx {COUNTER_ADDRESS:#x}"}
    ).addCallback(parse)


class GuestProcess(ProcessProtocol):
    """A spawned QEMU: collects its standard error, tells when it has ended."""

    def __init__(self) -> None:
        self.stderr = bytearray()
        self.ended: Failure | None = None
        self._endWaiters: list[Deferred[None]] = []

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        self.ended = reason
        waiters, self._endWaiters = self._endWaiters, []
        for d in waiters:
            d.callback(None)

    def whenEnded(self) -> Deferred[None]:
        """A Deferred firing when the process has exited and been reaped."""
        if self.ended is not None:
            return succeed(None)
        d: Deferred[None] = Deferred(self._endWaiters.remove)
        self._endWaiters.append(d)
        return d


class RunningGuest:
    """A counting guest in its own QEMU, with a QMP connection to it."""

    def __init__(self, reactor: Any, process: GuestProcess, qmp: QMPClient) -> None:
        self._reactor = reactor
        self.process = process
        self.qmp = qmp

    @property
    def pid(self) -> int:
        return self.process.transport.pid  # type: ignore[union-attr, attr-defined]

    def readCounter(self) -> Deferred[int]:
        """See L{readCounter}."""
        return readCounter(self.qmp)

    def terminate(self, grace: float = 5.0) -> Deferred[None]:
        """Close QMP, then end QEMU: SIGTERM, and SIGKILL after ``grace`` s."""
        self.qmp.close()
        return terminate(self._reactor, self.process, grace)


def terminate(
    reactor: Any, process: GuestProcess, grace: float = 5.0
) -> Deferred[None]:
    """End a QEMU this process spawned: SIGTERM, then SIGKILL after ``grace``."""

    async def run() -> None:
        if process.ended is not None:
            return
        process.transport.signalProcess("TERM")  # type: ignore[union-attr]
        try:
            await process.whenEnded().addTimeout(grace, reactor)
        except Exception:
            if process.ended is None:
                process.transport.signalProcess("KILL")  # type: ignore[union-attr]
                await process.whenEnded()

    return Deferred.fromCoroutine(run())


def startGuest(
    reactor: Any,
    image: str,
    qmpSocket: str,
    incoming: bool = False,
    timeout: float = 10.0,
) -> Deferred[RunningGuest]:
    """
    Spawn QEMU running the counting guest and connect to its QMP socket.

    @return: a Deferred firing with a L{RunningGuest}; on failure QEMU is
        ended and the error carries its standard error.
    """
    return startQEMU(
        reactor, qemuCommand(image, qmpSocket, incoming), qmpSocket, timeout
    )


def startQEMU(
    reactor: Any, command: list[str], qmpSocket: str, timeout: float = 10.0
) -> Deferred[RunningGuest]:
    """
    Spawn QEMU with ``command`` (whose ``-qmp`` serves ``qmpSocket``) and connect
    to its QMP socket.

    @return: a Deferred firing with a L{RunningGuest}; on failure QEMU is
        ended and the error carries its standard error.
    """

    async def start() -> RunningGuest:
        process = GuestProcess()
        reactor.spawnProcess(process, findQEMU() or QEMU, command, env=os.environ)
        try:
            qmp = await _connectWhenListening(reactor, process, qmpSocket, timeout)
        except BaseException:
            await terminate(reactor, process)
            raise
        return RunningGuest(reactor, process, qmp)

    return Deferred.fromCoroutine(start())


async def _connectWhenListening(
    reactor: Any, process: GuestProcess, qmpSocket: str, timeout: float
) -> QMPClient:
    # QEMU creates the socket file at bind(), a moment before listen(): a
    # refusal in between is retried until the deadline or QEMU's exit.
    deadline = reactor.seconds() + timeout
    while True:
        if process.ended is not None:
            raise QMPConnectionError(
                f"QEMU exited before serving {qmpSocket}: "
                f"{process.stderr.decode(errors='replace').strip()}"
            )
        remaining = deadline - reactor.seconds()
        if os.path.exists(qmpSocket):
            try:
                return await connectQMP(reactor, qmpSocket, max(remaining, 0.1))
            except QMPConnectionError:
                if remaining <= 0:
                    raise
        elif remaining <= 0:
            raise QMPConnectionError(f"QEMU did not open {qmpSocket} in {timeout}s")
        await deferLater(reactor, 0.02, lambda: None)
