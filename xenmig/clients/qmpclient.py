"""A QMP client for QEMU: connecting, its commands, migrating through a descriptor."""

from __future__ import annotations

import errno
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenmig.clients.qmp import (
    EventCallback,
    JSONObject,
    QEMUMigrationFailed,
    QMPConnectionError,
    QMPError,
    QMPProtocol,
    QMPTimeout,
)

log = Logger()
T = TypeVar("T")

#: QEMU's own default migration bandwidth cap (128 MiB/s) applies even to a
#: stopped VM; callers pass something larger to ``migrateToFD``.
UNLIMITED_BANDWIDTH = 2**62


class QMPClient:
    """
    A connected, negotiated QMP session and the calls the device model needs.

    Built by L{connectQMP}.  Polling uses the injected reactor; nothing blocks.
    """

    def __init__(
        self, reactor: IReactorTime, protocol: QMPProtocol, pollInterval: float = 0.05
    ) -> None:
        self._reactor = reactor
        self.protocol = protocol
        self.pollInterval = pollInterval

    @property
    def greeting(self) -> JSONObject | None:
        return self.protocol.greeting

    def execute(
        self, command: str, arguments: JSONObject | None = None
    ) -> Deferred[Any]:
        """See L{QMPProtocol.execute}."""
        return self.protocol.execute(command, arguments)

    def sendFD(self, fd: int, name: str) -> Deferred[Any]:
        """See L{QMPProtocol.sendFD}."""
        return self.protocol.sendFD(fd, name)

    def onEvent(self, name: str, callback: EventCallback) -> Callable[[], None]:
        """See L{QMPProtocol.onEvent}."""
        return self.protocol.onEvent(name, callback)

    def waitEvent(
        self, name: str, timeout: float | None = None
    ) -> Deferred[JSONObject]:
        """See L{QMPProtocol.waitEvent}."""
        return self.protocol.waitEvent(name, timeout)

    def queryStatus(self) -> Deferred[str]:
        """A Deferred firing with the VM's run state (``running``, ``paused``, ...)."""
        return self.execute("query-status").addCallback(lambda info: info["status"])

    def stop(self) -> Deferred[Any]:
        """Pause the VM's vCPUs; a Deferred firing when QEMU has."""
        return self.execute("stop")

    def cont(self) -> Deferred[Any]:
        """Resume the VM's vCPUs; a Deferred firing when QEMU has."""
        return self.execute("cont")

    def quit(self) -> Deferred[Any]:
        """Ask QEMU to exit; succeeds also when QEMU closes without answering."""
        return self.execute("quit")

    def close(self) -> Deferred[None]:
        """Close the connection (QEMU keeps running); fires once closed."""
        if self.protocol.transport is not None and not self.protocol.closed:
            self.protocol.transport.loseConnection()
        return self.protocol.whenClosed()

    def migrateToFD(self, fd: int, maxBandwidth: int) -> Deferred[JSONObject]:
        """
        Have QEMU write its migration stream into ``fd`` (stopping is the caller's).

        Sets ``max-bandwidth`` (bytes/s), passes ``fd`` with ``getfd``, runs
        ``migrate fd:NAME`` and polls ``query-migrate``.  The caller keeps ``fd``
        open until this fires and closes its copy afterwards.

        @return: a Deferred firing with the final ``query-migrate`` answer, or
            failing with L{QEMUMigrationFailed} (QEMU's ``error-desc`` word for
            word) or L{QMPError}.  Cancelling it sends ``migrate_cancel``.
        """
        return Deferred.fromCoroutine(self._migrateToFD(fd, maxBandwidth))

    async def migrateStart(self, fd: int, maxBandwidth: int) -> None:
        """
        Set ``max-bandwidth``, pass ``fd`` (``getfd``) and run ``migrate fd:NAME``;
        return once QEMU took the command (the migration runs on; follow it with
        ``query-migrate``).
        """
        await self.execute("migrate-set-parameters", {"max-bandwidth": maxBandwidth})
        name = await self._passFD(fd)
        await self._consumeFD(name, "migrate", {"uri": f"fd:{name}"})

    async def _migrateToFD(self, fd: int, maxBandwidth: int) -> JSONObject:
        await self.migrateStart(fd, maxBandwidth)
        try:
            return await self._pollMigration()
        except CancelledError:
            self.execute("migrate_cancel").addErrback(
                lambda f: log.warn("migrate_cancel failed: {e}", e=f.getErrorMessage())
            )
            raise

    def migrateIncomingFromFD(self, fd: int) -> Deferred[str]:
        """
        Have a QEMU started with ``-incoming defer`` load its state from ``fd``.

        @return: a Deferred firing with the run state once the load completed
            (``paused`` when the source was stopped or QEMU runs with ``-S``),
            or failing with L{QEMUMigrationFailed}; QEMU 7.2 exits when a load
            fails and prints the reason on its standard error.  Cancelling it
            stops the wait only: kill the target QEMU to stop the load.
        """
        return Deferred.fromCoroutine(self._migrateIncomingFromFD(fd))

    async def _migrateIncomingFromFD(self, fd: int) -> str:
        await self.startIncomingFromFD(fd)
        return await self.awaitIncoming()

    async def startIncomingFromFD(self, fd: int) -> None:
        """
        Have a QEMU started with ``-incoming defer`` begin to load its state from
        ``fd`` (``getfd`` + ``migrate-incoming``), and return at once: QEMU reads
        the descriptor as the caller writes into its other end.
        """
        name = await self._passFD(fd)
        await self._consumeFD(name, "migrate-incoming", {"uri": f"fd:{name}"})

    async def awaitIncoming(self) -> str:
        """
        Wait until an incoming migration completed; the run state then.

        @raise QEMUMigrationFailed: it failed, or QEMU exited while loading.
        """
        try:
            await self._pollMigration()
            while (status := await self.queryStatus()) == "inmigrate":
                await deferLater(self._reactor, self.pollInterval, lambda: None)
        except QMPConnectionError:
            raise QEMUMigrationFailed(
                "the target QEMU exited while loading the state "
                "(QEMU prints the reason on its standard error)"
            )
        return status

    async def _passFD(self, fd: int) -> str:
        name = f"xenmig-{uuid.uuid4().hex[:12]}"
        await self.sendFD(fd, name)
        return name

    async def _consumeFD(self, name: str, command: str, arguments: JSONObject) -> None:
        try:
            await self.execute(command, arguments)
        except QMPError:
            # The command failed before taking the descriptor: do not leak it.
            self.execute("closefd", {"fdname": name}).addErrback(lambda f: None)
            raise

    async def _pollMigration(self) -> JSONObject:
        while True:
            info: JSONObject = await self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QEMUMigrationFailed(
                    info.get("error-desc", f"the migration was {status}")
                )
            await deferLater(self._reactor, self.pollInterval, lambda: None)


def connectQMP(reactor: Any, path: str, timeout: float = 10.0) -> Deferred[QMPClient]:
    """
    Connect to QEMU's QMP socket at ``path`` and negotiate capabilities.

    @param reactor: provides L{IReactorUNIX} and L{IReactorTime}.
    @return: a Deferred firing with a L{QMPClient}, or failing with
        L{QMPConnectionError} when the socket is missing, refuses, or gives no
        greeting within ``timeout`` seconds.  Cancelling it closes the socket.
    """

    async def connect() -> QMPClient:
        protocol = QMPProtocol(reactor)
        try:
            await connectProtocol(UNIXClientEndpoint(reactor, path), protocol)
        except ConnectError as e:
            raise QMPConnectionError(_describeConnectError(path, e))
        await protocol.whenReady()
        return QMPClient(reactor, protocol)

    def timedOut(result: object, seconds: float) -> Failure:
        return Failure(
            QMPConnectionError(
                f"no QMP greeting from {path} within {seconds}s "
                "(is QEMU hung, or another client holding its monitor?)"
            )
        )

    d = Deferred.fromCoroutine(connect())
    d.addTimeout(timeout, reactor, onTimeoutCancel=timedOut)
    return d


def _describeConnectError(path: str, error: ConnectError) -> str:
    code = getattr(error, "osError", None)
    if code == errno.ENOENT:
        return (
            f"no QMP socket at {path} "
            f"(is QEMU running with -qmp unix:{path},server=on,wait=off?)"
        )
    if code == errno.ECONNREFUSED:
        return f"QMP socket {path} refused the connection (has QEMU exited?)"
    return f"cannot connect to the QMP socket {path}: {error}"


def qmpSession(
    reactor: Any,
    path: str,
    seconds: float,
    work: Callable[[QMPClient], Awaitable[T]],
    what: str,
) -> Deferred[T]:
    """
    Connect to the QMP socket ``path``, run ``work(client)``, hang up: all within
    ``seconds`` (then it is cancelled and fails with L{QMPTimeout} naming
    ``what``).  QEMU serves one QMP client at a time, so nobody holds on to one.
    """

    async def run() -> T:
        client = await connectQMP(reactor, path, seconds)
        try:
            return await work(client)
        finally:
            await client.close()

    def timedOut(_: object, timeout: float) -> Failure:
        return Failure(QMPTimeout(f"{what} did not answer within {timeout:g} s"))

    d = Deferred.fromCoroutine(run())
    return d.addTimeout(seconds, reactor, onTimeoutCancel=timedOut)


async def executeAll(
    qmp: QMPClient, commands: Sequence[tuple[str, JSONObject]]
) -> list[Any]:
    """
    Send ``commands`` at once: QEMU runs a connection's commands one after
    another, in order, so they cost one round trip, not one each.  Their
    answers in order, a refused command's L{QMPError} in its place (those
    after it still ran); anything else (the connection lost) is raised.
    """
    answers = await DeferredList(
        [qmp.execute(command, arguments) for command, arguments in commands],
        consumeErrors=True,
    )
    results: list[Any] = []
    for ok, answer in answers:
        if ok:
            results.append(answer)
        elif answer.check(QMPError):
            results.append(answer.value)
        else:
            answer.raiseException()
    return results
