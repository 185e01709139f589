"""A small native Twisted client for QEMU's machine protocol (QMP) on a unix socket."""

from __future__ import annotations

import errno
import itertools
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    fail,
    succeed,
)
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime, IUNIXTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from xenmig.errors import DeviceError

log = Logger()
T = TypeVar("T")

#: What QEMU sends and takes: a decoded JSON object.
JSONObject = dict[str, Any]
EventCallback = Callable[[JSONObject], object]

#: QEMU's own default migration bandwidth cap (128 MiB/s) applies even to a
#: stopped VM; callers pass something larger to ``migrateToFD``.
UNLIMITED_BANDWIDTH = 2**62


class QMPError(DeviceError):
    """
    QEMU answered a command with an error.

    The message holds the command's name and QEMU's ``desc`` word for word;
    ``errorClass`` is QEMU's class (``GenericError``, ``CommandNotFound``, ...).
    """

    def __init__(self, command: str, errorClass: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command!r}: {desc}")
        self.command = command
        self.errorClass = errorClass
        self.desc = desc


class QMPConnectionError(DeviceError):
    """The QMP socket is missing, refused, silent, spoke garbage, or closed."""


class QMPTimeout(DeviceError):
    """An awaited QMP event did not arrive in time."""


class QEMUMigrationFailed(DeviceError):
    """
    QEMU reported a migration as failed or cancelled.

    ``desc`` is QEMU's ``error-desc`` word for word (also in the message).
    """

    def __init__(self, desc: str) -> None:
        super().__init__(f"QEMU migration failed: {desc}")
        self.desc = desc


class QMPProtocol(LineOnlyReceiver):
    """
    QMP framing and matching: JSON objects one per line, replies matched by id.

    After the greeting it negotiates capabilities; ``whenReady`` fires then.
    Events go to callbacks registered with ``onEvent`` and to ``waitEvent``.
    """

    delimiter = b"\n"
    #: ``query-qmp-schema`` and large HMP output are single lines of a few
    #: hundred KiB; anything past this is not QEMU talking.
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, Deferred[Any]]] = {}
        self._handlers: dict[str, list[EventCallback]] = {}
        self._waiters: dict[str, list[Deferred[JSONObject]]] = {}
        self._readyWaiters: list[Deferred[JSONObject]] = []
        self._closedWaiters: list[Deferred[None]] = []
        self._fdLock = DeferredLock()
        self._brokenBy: Exception | None = None
        self.greeting: JSONObject | None = None
        self.ready = False
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------

    def whenReady(self) -> Deferred[JSONObject]:
        """A Deferred firing with the greeting once capabilities are negotiated."""
        if self.ready:
            assert self.greeting is not None
            return succeed(self.greeting)
        if self.closed:
            return fail(self._closedError("the greeting"))

        def cancel(d: Deferred[JSONObject]) -> None:
            self._readyWaiters.remove(d)
            self._abort()

        d: Deferred[JSONObject] = Deferred(cancel)
        self._readyWaiters.append(d)
        return d

    def whenClosed(self) -> Deferred[None]:
        """A Deferred firing with None once the connection is closed."""
        if self.closed:
            return succeed(None)
        d: Deferred[None] = Deferred(self._closedWaiters.remove)
        self._closedWaiters.append(d)
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        for d in self._readyWaiters:
            d.errback(self._closedError("the greeting"))
        for commandId, (command, d) in sorted(self._pending.items()):
            del self._pending[commandId]
            if command == "quit":
                # QEMU may exit before it answers ``quit``: that is success.
                d.callback({})
            else:
                d.errback(self._closedError(f"{command!r}"))
        for name, waiters in self._waiters.items():
            for d in waiters:
                d.errback(self._closedError(f"a {name} event"))
        self._readyWaiters, self._waiters = [], {}
        closed, self._closedWaiters = self._closedWaiters, []
        for waiter in closed:
            waiter.callback(None)

    def _closedError(self, what: str) -> Exception:
        if self._brokenBy is not None:
            return self._brokenBy
        return QMPConnectionError(
            f"QEMU closed the QMP connection before {what} (has QEMU exited?)"
        )

    def _breakConnection(self, error: Exception) -> None:
        log.error("QMP connection broken: {error}", error=str(error))
        self._brokenBy = error
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- parsing -----------------------------------------------------------------

    def lineLengthExceeded(self, line: bytes) -> None:
        self._breakConnection(
            QMPConnectionError(
                f"QEMU sent a QMP line longer than {self.MAX_LENGTH} bytes"
            )
        )

    def lineReceived(self, line: bytes) -> None:
        line = line.strip()
        if not line or self._brokenBy is not None:
            return
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self._breakConnection(
                QMPConnectionError(
                    f"QEMU sent a QMP line that is not JSON: {line!r:.200}"
                )
            )
            return
        if "QMP" in message:
            self._greetingReceived(message)
        elif "event" in message:
            self._eventReceived(message)
        elif "return" in message or "error" in message:
            self._replyReceived(message)
        else:
            log.warn("ignoring unexpected QMP message {message!r}", message=message)

    def _greetingReceived(self, greeting: JSONObject) -> None:
        if self.greeting is not None:
            self._breakConnection(QMPConnectionError("QEMU sent a second QMP greeting"))
            return
        self.greeting = greeting
        self._send("qmp_capabilities", None).addCallbacks(
            self._negotiated, self._negotiationFailed
        )

    def _negotiated(self, result: object) -> None:
        assert self.greeting is not None
        self.ready = True
        waiters, self._readyWaiters = self._readyWaiters, []
        for d in waiters:
            d.callback(self.greeting)

    def _negotiationFailed(self, failure: Failure) -> None:
        waiters, self._readyWaiters = self._readyWaiters, []
        for d in waiters:
            d.errback(failure)
        if not self.closed and isinstance(failure.value, Exception):
            self._breakConnection(failure.value)

    def _replyReceived(self, reply: JSONObject) -> None:
        commandId = reply.get("id")
        entry = None
        if isinstance(commandId, int):
            entry = self._pending.pop(commandId, None)
        if entry is None:
            # No id: QEMU could not parse a command.  Unknown id: cancelled.
            log.warn("dropping QMP reply for no waiting command: {r!r}", r=reply)
            return
        command, d = entry
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            d.errback(
                QMPError(
                    command,
                    str(error.get("class", "GenericError")),
                    str(error.get("desc", reply["error"])),
                )
            )
        else:
            d.callback(reply["return"])

    def _eventReceived(self, event: JSONObject) -> None:
        name = event["event"]
        for callback in list(self._handlers.get(name, [])):
            try:
                callback(event)
            except Exception:
                log.failure("QMP event callback for {name} failed", name=name)
        for d in self._waiters.pop(name, []):
            d.callback(event)

    # -- commands and events -----------------------------------------------------

    def _send(self, command: str, arguments: JSONObject | None) -> Deferred[Any]:
        commandId = next(self._ids)
        message: JSONObject = {"execute": command, "id": commandId}
        if arguments is not None:
            message["arguments"] = arguments
        # Cancelling stops the wait only: QMP cannot take a command back, and
        # a late reply is dropped.
        d: Deferred[Any] = Deferred(lambda _: self._forget(commandId))
        self._pending[commandId] = (command, d)
        assert self.transport is not None
        self.transport.write(json.dumps(message).encode("utf-8") + b"\n")
        return d

    def _forget(self, commandId: int) -> None:
        self._pending.pop(commandId, None)

    def execute(
        self, command: str, arguments: JSONObject | None = None
    ) -> Deferred[Any]:
        """
        Run one QMP command.

        @return: a Deferred firing with QEMU's ``return`` value, or failing with
            L{QMPError} (QEMU's error) or L{QMPConnectionError} (no connection).
        """
        if self.closed:
            return fail(self._closedError(f"{command!r} was sent"))
        if not self.ready:
            return fail(
                QMPConnectionError(
                    f"QMP is not ready (no greeting yet) for {command!r}"
                )
            )
        return self._send(command, arguments)

    def sendFD(self, fd: int, name: str) -> Deferred[Any]:
        """
        Hand QEMU a file descriptor as ``name`` (``getfd`` with SCM_RIGHTS).

        The caller keeps ``fd`` open until the Deferred fires and closes its own
        copy afterwards; QEMU holds a duplicate.  One descriptor is in flight at
        a time, so each ``getfd`` takes the descriptor sent with it.
        """
        if not IUNIXTransport.providedBy(self.transport):
            return fail(
                QMPConnectionError("file descriptors can only go over a unix socket")
            )
        return self._fdLock.run(self._sendFD, fd, name)

    def _sendFD(self, fd: int, name: str) -> Deferred[Any]:
        if self.ready and not self.closed:
            # Twisted attaches a queued descriptor to the next unsent byte: of
            # this getfd line, or of a command still buffered before it.  QEMU
            # keeps it until a getfd takes it; the lock makes that this one.
            self.transport.sendFileDescriptor(fd)  # type: ignore[union-attr]
        return self.execute("getfd", {"fdname": name})

    def onEvent(self, name: str, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback(event)`` on each ``name`` event; returns an unsubscriber."""
        handlers = self._handlers.setdefault(name, [])
        handlers.append(callback)

        def unsubscribe() -> None:
            if callback in handlers:
                handlers.remove(callback)

        return unsubscribe

    def waitEvent(
        self, name: str, timeout: float | None = None
    ) -> Deferred[JSONObject]:
        """
        Wait for the next ``name`` event.

        @return: a Deferred firing with the event (``event``, ``data``,
            ``timestamp``), failing with L{QMPTimeout} after ``timeout`` seconds
            or L{QMPConnectionError} if the connection closes first.
        """
        if self.closed:
            return fail(self._closedError(f"a {name} event"))
        d: Deferred[JSONObject] = Deferred(self._waiters.setdefault(name, []).remove)
        self._waiters[name].append(d)
        if timeout is not None:

            def timedOut(result: object, seconds: float) -> Failure:
                return Failure(QMPTimeout(f"no {name} event from QEMU in {seconds}s"))

            d.addTimeout(timeout, self._clock, onTimeoutCancel=timedOut)
        return d


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

    async def _migrateToFD(self, fd: int, maxBandwidth: int) -> JSONObject:
        await self.execute("migrate-set-parameters", {"max-bandwidth": maxBandwidth})
        name = await self._passFD(fd)
        try:
            await self._consumeFD(name, "migrate", {"uri": f"fd:{name}"})
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
        name = await self._passFD(fd)
        await self._consumeFD(name, "migrate-incoming", {"uri": f"fd:{name}"})
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
