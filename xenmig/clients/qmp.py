"""QEMU's machine protocol (QMP): JSON lines, replies matched by id, events, errors."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IReactorTime, IUNIXTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from xenmig.errors import DeviceError

log = Logger()

#: What QEMU sends and takes: a decoded JSON object.
JSONObject = dict[str, Any]
EventCallback = Callable[[JSONObject], object]


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
        # Taken first: failing the pending qmp_capabilities below fails the
        # ready waiters too, and each must fire once.
        ready, self._readyWaiters = self._readyWaiters, []
        for d in ready:
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
