"""The client of swtpm's control channel: a connection per command or per operation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from xenmig.clients.swtpm import (
    BLOB_NAMES,
    BLOB_TYPES,
    CMD_GET_CAPABILITY,
    CMD_GET_CONFIG,
    CMD_GET_STATEBLOB,
    CMD_GET_TPMESTABLISHED,
    CMD_INIT,
    CMD_SET_STATEBLOB,
    CMD_SHUTDOWN,
    CMD_STOP,
    CMD_STORE_VOLATILE,
    INIT_FLAG_DELETE_VOLATILE,
    STATE_FLAG_DECRYPTED,
    TPM_BAD_ORDINAL,
    TPM_DECRYPT_ERROR,
    TPM_KEYNOTFOUND,
    TPM_RC_FAILURE,
    TPM_RETRY,
    TPM_SUCCESS,
    AnswerParser,
    ControlAnswer,
    StateBlob,
    SwtpmBusy,
    SwtpmCommandFailed,
    SwtpmError,
    SwtpmNotRunning,
    SwtpmProtocolError,
    SwtpmUnavailable,
    commandName,
    encodeFields,
    encodeRequest,
    resultName,
)

#: Seconds one control command may take, connecting included, unless told.
DEFAULT_TIMEOUT = 5.0
_DONE = Failure(ConnectionDone())


class ControlExchange(Protocol):
    """Sends one control command on a fresh connection and parses its answer."""

    transport: Any

    def __init__(
        self, request: bytes, parser: AnswerParser, answered: Deferred
    ) -> None:
        self.request = request
        self.parser = parser
        self.answered = answered

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.answered.called:
            return
        try:
            answer = self.parser.feed(data)
        except SwtpmError as e:
            self.transport.abortConnection()
            self.answered.errback(e)
            return
        if answer is not None:
            self.transport.loseConnection()
            self.answered.callback(answer)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if not self.answered.called:
            self.answered.errback(
                SwtpmProtocolError(
                    f"the connection closed before the answer ({reason})"
                )
            )


def controlEndpoint(
    reactor: Any, address: str, timeout: float
) -> IStreamClientEndpoint:
    """The endpoint for a control address: a unix socket path or ``tcp:HOST:PORT``."""
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"control address {address!r} is not tcp:HOST:PORT")
        return TCP4ClientEndpoint(reactor, host, int(port), timeout=timeout)
    return UNIXClientEndpoint(reactor, address, timeout=timeout)


class ControlCommands:
    """
    The control commands of one swtpm, each sent through L{call} (which the
    subclasses define: a connection per command, or one for an operation).
    Every command has a deadline of L{timeout} seconds on L{reactor}.
    """

    reactor: Any
    address: str
    timeout: float

    def call(self, command: int, fields: bytes = b"") -> Deferred[ControlAnswer]:
        raise NotImplementedError

    # Each public method returns a Deferred; cancelling it closes the connection.

    def getCapability(self) -> Deferred[int]:
        """A Deferred firing with the PTM_CAP_* bits this swtpm supports."""
        return self.call(CMD_GET_CAPABILITY).addCallback(lambda a: a.value)

    def getConfig(self) -> Deferred[int]:
        """A Deferred firing with the PTM_CONFIG_FLAG_* bits (which keys are set)."""
        return self._checked(CMD_GET_CONFIG).addCallback(lambda a: a.flags)

    def getEstablished(self) -> Deferred[bool]:
        """A Deferred firing with the TPM's tpmEstablished bit."""
        return self._checked(CMD_GET_TPMESTABLISHED).addCallback(
            lambda a: bool(a.value)
        )

    def init(self, flags: int = 0) -> Deferred[None]:
        """Initialise (or resume) the TPM; flag 1 deletes the volatile state after."""
        return self._checked(CMD_INIT, encodeFields(flags)).addCallback(lambda _: None)

    def stop(self) -> Deferred[None]:
        """Stop the TPM without ending swtpm (state blobs can then be set)."""
        return self._checked(CMD_STOP).addCallback(lambda _: None)

    def shutdown(self) -> Deferred[None]:
        """Stop the TPM and make swtpm exit."""
        return self._checked(CMD_SHUTDOWN).addCallback(lambda _: None)

    def storeVolatile(self) -> Deferred[None]:
        """Make swtpm write its volatile state to its state directory."""
        return self._checked(CMD_STORE_VOLATILE).addCallback(lambda _: None)

    def getStateBlob(self, blobType: int, decrypt: bool = True) -> Deferred[StateBlob]:
        """A Deferred firing with one L{StateBlob}; a missing blob is empty."""
        return Deferred.fromCoroutine(self._getStateBlob(blobType, decrypt))

    def getStateBlobs(self, decrypt: bool = True) -> Deferred[list[StateBlob]]:
        """A Deferred firing with the permanent, volatile and savestate blobs."""
        return Deferred.fromCoroutine(self._getStateBlobs(decrypt))

    def setStateBlob(self, blob: StateBlob) -> Deferred[None]:
        """Set one blob (the TPM must be stopped), with the flags GET returned."""
        fields = encodeFields(blob.flags, blob.blobType, len(blob.data))
        d = self._checked(CMD_SET_STATEBLOB, fields + blob.data, blob.name)
        return d.addCallback(lambda _: None)

    def loadStateBlobs(
        self, blobs: Sequence[StateBlob], initFlags: int = INIT_FLAG_DELETE_VOLATILE
    ) -> Deferred[None]:
        """STOP, SET every non-empty blob, INIT: the TPM resumes with that state."""
        return Deferred.fromCoroutine(self._loadStateBlobs(blobs, initFlags))

    async def _getStateBlob(self, blobType: int, decrypt: bool) -> StateBlob:
        flags = STATE_FLAG_DECRYPTED if decrypt else 0
        name = BLOB_NAMES.get(blobType, str(blobType))
        chunks: list[bytes] = []
        received = 0
        total: int | None = None
        resultFlags = 0
        while total is None or received < total:
            request = encodeFields(flags, blobType, received)
            answer = await self._checked(CMD_GET_STATEBLOB, request, name)
            if answer.result == TPM_RETRY:
                return StateBlob(blobType, 0, b"")
            if total is None:
                total, resultFlags = answer.total, answer.flags
            elif not answer.data:
                raise SwtpmProtocolError(
                    f"swtpm at {self.address} sent no more of the {name} blob at "
                    f"offset {received} of {total}"
                )
            chunks.append(answer.data)
            received += len(answer.data)
        if received != total:
            raise SwtpmProtocolError(
                f"swtpm at {self.address} sent {received} bytes of the {name} blob, "
                f"announced {total}"
            )
        return StateBlob(blobType, resultFlags, b"".join(chunks))

    async def _getStateBlobs(self, decrypt: bool) -> list[StateBlob]:
        return [await self._getStateBlob(t, decrypt) for t in BLOB_TYPES]

    async def _loadStateBlobs(self, blobs: Sequence[StateBlob], initFlags: int) -> None:
        await self.stop()
        for blob in blobs:
            if blob.data:
                await self.setStateBlob(blob)
        await self.init(initFlags)

    def _checked(self, command: int, fields: bytes = b"", what: str = "") -> Deferred:
        """Call ``command`` and fail with a named error on a non-zero result."""

        def check(answer: ControlAnswer) -> ControlAnswer:
            ok = (TPM_SUCCESS, TPM_RETRY) if command == CMD_GET_STATEBLOB else (0,)
            if answer.result not in ok:
                raise self._resultError(command, answer.result, what)
            return answer

        return self.call(command, fields).addCallback(check)

    def _resultError(self, command: int, result: int, what: str) -> SwtpmError:
        name = commandName(command)
        if what:
            name = f"{name} ({what})"
        base = f"swtpm at {self.address} answered {name} with {resultName(result)}"
        if result == TPM_BAD_ORDINAL and command in (
            CMD_GET_STATEBLOB,
            CMD_STORE_VOLATILE,
            CMD_GET_TPMESTABLISHED,
        ):
            return SwtpmNotRunning(
                f"{base}: the TPM is not running (never initialised, or stopped); "
                f"the VM's vTPM must be running to migrate it"
            )
        if result == TPM_BAD_ORDINAL and command == CMD_SET_STATEBLOB:
            return SwtpmCommandFailed(
                f"{base}: the TPM is running; state can only be set on a stopped TPM",
                command,
                result,
            )
        if result in (TPM_KEYNOTFOUND, TPM_DECRYPT_ERROR):
            return SwtpmCommandFailed(
                f"{base}: the state is encrypted with a migration key this swtpm does "
                f"not have (or it is corrupted): start it with the same "
                f"--migration-key as the source",
                command,
                result,
            )
        if command == CMD_INIT and result == TPM_RC_FAILURE:
            return SwtpmCommandFailed(
                f"{base}: the TPM could not start from its state (wrong --key, or "
                f"damaged state)",
                command,
                result,
            )
        return SwtpmCommandFailed(base, command, result)


class SwtpmControl(ControlCommands):
    """
    The control channel of one swtpm, spoken asynchronously.

    swtpm serves one control client at a time and a held connection blocks every
    other one, so each operation opens its own connection and closes it after
    its last answer: a single command by itself, the commands of one operation
    (all blobs out, or STOP, SET and INIT in) on one L{session}.  Every command
    has a deadline of ``timeout`` seconds on ``reactor``.
    """

    def __init__(self, reactor: Any, address: str, timeout: float = DEFAULT_TIMEOUT):
        self.reactor = reactor
        self.address = address
        self.timeout = timeout
        self._endpoint = controlEndpoint(reactor, address, timeout)

    def __repr__(self) -> str:
        return f"<SwtpmControl {self.address}>"

    def session(self) -> ControlSession:
        """
        The commands of one operation on one connection, opened at its first
        command and closed when it ends (``async with control.session() as s``).
        """
        return ControlSession(self)

    async def _getStateBlobs(self, decrypt: bool) -> list[StateBlob]:
        async with self.session() as session:
            return await session._getStateBlobs(decrypt)

    async def _loadStateBlobs(self, blobs: Sequence[StateBlob], initFlags: int) -> None:
        async with self.session() as session:
            await session._loadStateBlobs(blobs, initFlags)

    def call(self, command: int, fields: bytes = b"") -> Deferred[ControlAnswer]:
        """
        Send one raw command on a new connection.

        @return: a Deferred firing with the L{ControlAnswer} (whatever its result),
            failing with L{SwtpmUnavailable}, L{SwtpmBusy} or L{SwtpmProtocolError}.
        """
        request = encodeRequest(command, fields)
        name = commandName(command)
        exchange: list[ControlExchange] = []

        def cancel(_: Deferred) -> None:
            if exchange and exchange[0].transport is not None:
                exchange[0].transport.abortConnection()
            elif not connecting.called:
                connecting.cancel()

        answered: Deferred[ControlAnswer] = Deferred(cancel)

        def build() -> ControlExchange:
            protocol = ControlExchange(request, AnswerParser(command), answered)
            exchange.append(protocol)
            return protocol

        def connectFailed(failure: Failure) -> None:
            if failure.check(CancelledError, ConnectingCancelledError):
                return  # cancelled by our canceller: the Deferred fails by itself
            if not answered.called:
                answered.errback(self._connectError(failure, name))

        connecting = self._endpoint.connect(_quiet(Factory.forProtocol(build)))
        connecting.addErrback(connectFailed)
        return answered.addTimeout(
            self.timeout, self.reactor, onTimeoutCancel=self._timedOut(name)
        )

    def _connectError(self, failure: Failure, name: str) -> Failure:
        if failure.check(ConnectError):
            return Failure(
                SwtpmUnavailable(
                    f"cannot connect to the swtpm control socket {self.address} for "
                    f"{name} ({failure.value}): swtpm is not running there; start it "
                    f"with --ctrl type=unixio,path={self.address}, or fix the path"
                )
            )
        return failure

    def _timedOut(self, name: str) -> Callable[[Any, float], Any]:
        def timedOut(result: Any, timeout: float) -> Any:
            if isinstance(result, Failure) and result.check(CancelledError):
                raise SwtpmBusy(
                    f"the swtpm control socket {self.address} did not answer {name} "
                    f"within {timeout:g}s: another client probably holds it (swtpm "
                    f"serves one control client at a time, and QEMU's tpm-emulator "
                    f"holds it for as long as the VM runs), or swtpm is hung; close "
                    f"the other client and retry"
                )
            return result

        return timedOut


def _quiet(factory: Factory) -> Factory:
    """``factory``, without its "Starting factory" log lines (one per command)."""
    factory.noisy = False
    return factory


class _SessionExchange(Protocol):
    """One connection carrying commands one after the other."""

    transport: Any

    def __init__(self) -> None:
        self.open = False
        self.pending: tuple[AnswerParser, Deferred[ControlAnswer]] | None = None

    def connectionMade(self) -> None:
        self.open = True

    def exchange(
        self, request: bytes, parser: AnswerParser, answered: Deferred[ControlAnswer]
    ) -> None:
        self.pending = (parser, answered)
        self.transport.write(request)

    def dataReceived(self, data: bytes) -> None:
        if self.pending is None:
            self.transport.abortConnection()  # nothing was asked
            return
        parser, answered = self.pending
        if answered.called:
            self.pending = None
            return
        try:
            answer = parser.feed(data)
        except SwtpmError as e:
            self.pending = None
            self.transport.abortConnection()
            answered.errback(e)
            return
        if answer is not None:
            self.pending = None
            answered.callback(answer)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.open = False
        pending, self.pending = self.pending, None
        if pending is not None and not pending[1].called:
            pending[1].errback(
                SwtpmProtocolError(
                    f"the connection closed before the answer ({reason})"
                )
            )


class ControlSession(ControlCommands):
    """
    The commands of one operation on one control connection (see
    L{SwtpmControl.session}), one at a time.  A command that fails, times out
    or is cancelled drops the connection (after an unread SET body swtpm would
    parse the rest as commands); the next command opens a new one.
    """

    def __init__(self, control: SwtpmControl) -> None:
        self.reactor = control.reactor
        self.address = control.address
        self.timeout = control.timeout
        self._control = control
        self._protocol: _SessionExchange | None = None
        self._busy = False

    def __repr__(self) -> str:
        return f"<ControlSession {self.address}>"

    async def __aenter__(self) -> ControlSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the operation: close its connection."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()

    def _drop(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()

    def call(self, command: int, fields: bytes = b"") -> Deferred[ControlAnswer]:
        """
        Send one raw command on the operation's connection (opened if need be).

        @return: as L{SwtpmControl.call}.
        """
        name = commandName(command)
        if self._busy:
            return fail(SwtpmProtocolError(f"{name}: another command is under way"))
        self._busy = True
        request = encodeRequest(command, fields)
        connecting: Deferred[Any] | None = None

        def cancel(_: Deferred) -> None:
            if connecting is not None and not connecting.called:
                connecting.cancel()
            self._drop()

        answered: Deferred[ControlAnswer] = Deferred(cancel)

        def send(protocol: _SessionExchange) -> None:
            if answered.called:
                protocol.transport.abortConnection()
                return
            self._protocol = protocol
            protocol.exchange(request, AnswerParser(command), answered)

        def connectFailed(failure: Failure) -> None:
            if failure.check(CancelledError, ConnectingCancelledError):
                return  # cancelled by our canceller: the Deferred fails by itself
            if not answered.called:
                answered.errback(self._control._connectError(failure, name))

        def done(result: Any) -> Any:
            self._busy = False
            if isinstance(result, Failure) or (
                result.result != TPM_SUCCESS and command == CMD_SET_STATEBLOB
            ):
                self._drop()
            return result

        answered.addBoth(done)
        if self._protocol is not None and self._protocol.open:
            send(self._protocol)
        else:
            factory = _quiet(Factory.forProtocol(_SessionExchange))
            connecting = self._control._endpoint.connect(factory)
            connecting.addCallbacks(send, connectFailed)
        return answered.addTimeout(
            self.timeout, self.reactor, onTimeoutCancel=self._control._timedOut(name)
        )
