"""An asynchronous client for swtpm's control channel (the process: L{swtpmprocess})."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenmig.errors import DeviceError

log = Logger()

# -- the wire (swtpm's tpm_ioctl.h, "Commands used by the non-CUSE TPMs") -----------
# Every request is a big-endian u32 command code followed by the command's fields;
# every answer carries only the "resp" part of the ioctl structure.

CMD_GET_CAPABILITY = 0x01
CMD_INIT = 0x02
CMD_SHUTDOWN = 0x03
CMD_GET_TPMESTABLISHED = 0x04
CMD_STORE_VOLATILE = 0x0A
CMD_GET_STATEBLOB = 0x0C
CMD_SET_STATEBLOB = 0x0D
CMD_STOP = 0x0E
CMD_GET_CONFIG = 0x0F

COMMAND_NAMES = {
    CMD_GET_CAPABILITY: "GET_CAPABILITY",
    CMD_INIT: "INIT",
    CMD_SHUTDOWN: "SHUTDOWN",
    CMD_GET_TPMESTABLISHED: "GET_TPMESTABLISHED",
    CMD_STORE_VOLATILE: "STORE_VOLATILE",
    CMD_GET_STATEBLOB: "GET_STATEBLOB",
    CMD_SET_STATEBLOB: "SET_STATEBLOB",
    CMD_STOP: "STOP",
    CMD_GET_CONFIG: "GET_CONFIG",
}

BLOB_PERMANENT = 1
BLOB_VOLATILE = 2
BLOB_SAVESTATE = 3
#: The order QEMU's TPM emulator fetches and loads the blobs in.
BLOB_TYPES = (BLOB_PERMANENT, BLOB_VOLATILE, BLOB_SAVESTATE)
BLOB_NAMES = {BLOB_PERMANENT: "permanent", BLOB_VOLATILE: "volatile", 3: "savestate"}

STATE_FLAG_DECRYPTED = 1  # on GET: return the blob decrypted (file key removed)
STATE_FLAG_ENCRYPTED = 2  # on GET's answer and SET: the blob is encrypted
INIT_FLAG_DELETE_VOLATILE = 1
CONFIG_FLAG_FILE_KEY = 1
CONFIG_FLAG_MIGRATION_KEY = 2
CAP_GET_STATEBLOB = 1 << 8
CAP_SET_STATEBLOB = 1 << 9
CAP_STOP = 1 << 10
CAP_GET_CONFIG = 1 << 11
#: What the vTPM migration needs from the control channel.
CAPS_FOR_MIGRATION = CAP_GET_STATEBLOB | CAP_SET_STATEBLOB | CAP_STOP | CAP_GET_CONFIG

TPM_SUCCESS = 0x00
TPM_BAD_PARAMETER = 0x03
TPM_FAIL = 0x09
TPM_BAD_ORDINAL = 0x0A  # also "the TPM is not running" / "the TPM is running"
TPM_KEYNOTFOUND = 0x0D
TPM_SIZE = 0x17
TPM_IOERROR = 0x1F
TPM_DECRYPT_ERROR = 0x21
TPM_RC_FAILURE = 0x101
TPM_RETRY = 0x800  # GET_STATEBLOB: no such blob (e.g. an empty savestate)

RESULT_NAMES = {
    TPM_BAD_PARAMETER: "TPM_BAD_PARAMETER",
    TPM_FAIL: "TPM_FAIL",
    TPM_BAD_ORDINAL: "TPM_BAD_ORDINAL",
    TPM_KEYNOTFOUND: "TPM_KEYNOTFOUND",
    TPM_SIZE: "TPM_SIZE",
    TPM_IOERROR: "TPM_IOERROR",
    TPM_DECRYPT_ERROR: "TPM_DECRYPT_ERROR",
    TPM_RC_FAILURE: "TPM_RC_FAILURE",
    TPM_RETRY: "TPM_RETRY",
}

#: The largest state blob accepted from a swtpm (libtpms' are a few KiB).
MAX_BLOB = 16 * 1024 * 1024
DEFAULT_TIMEOUT = 5.0

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_GET_HEADER = struct.Struct(">IIII")  # result, flags, totlength, length
_DONE = Failure(ConnectionDone())


# -- errors --------------------------------------------------------------------------


class SwtpmError(DeviceError):
    """swtpm, or its control channel, did not do what the migration needs."""


class SwtpmUnavailable(SwtpmError):
    """Nothing answers on the control socket: swtpm is not running there."""


class SwtpmBusy(SwtpmError):
    """The control socket accepted the connection but never answered in time."""


class SwtpmNotRunning(SwtpmError):
    """The TPM behind the control socket is not initialised (or was stopped)."""


class SwtpmCommandFailed(SwtpmError):
    """A control command answered with a non-zero result."""

    def __init__(self, message: str, command: int = 0, result: int = 0) -> None:
        super().__init__(message)
        self.command = command
        self.result = result


class SwtpmProtocolError(SwtpmError):
    """The answer on the control channel was malformed, or the connection closed."""


class SwtpmNotInstalled(SwtpmError):
    """The swtpm executable is missing or too old."""


class SwtpmStartFailed(SwtpmError):
    """A swtpm this process started exited, or never answered, during start-up."""


def resultName(result: int) -> str:
    """``0x0a (TPM_BAD_ORDINAL)`` for a control-channel result code."""
    name = RESULT_NAMES.get(result)
    return f"0x{result:02x} ({name})" if name else f"0x{result:02x}"


# -- answers -------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlAnswer:
    """One answer of the control channel, decoded."""

    result: int
    flags: int = 0
    total: int = 0
    data: bytes = b""
    value: int = 0


@dataclass(frozen=True)
class StateBlob:
    """A TPM state blob as GET_STATEBLOB returned it, with its flags."""

    blobType: int
    flags: int
    data: bytes

    @property
    def name(self) -> str:
        """``permanent``, ``volatile`` or ``savestate``."""
        return BLOB_NAMES.get(self.blobType, f"type-{self.blobType}")


class AnswerParser:
    """
    Incremental parser for the answer to one control command.

    Feed it bytes as they arrive; it returns the decoded answer once complete.  A
    failing command answers only its 4-byte result, whatever its usual layout, except
    GET_STATEBLOB's "no such blob" (TPM_RETRY), which carries the full header.
    """

    def __init__(self, command: int) -> None:
        self.command = command
        self._buffer = bytearray()
        self.answer: ControlAnswer | None = None

    def _needed(self) -> int:
        buf = self._buffer
        if self.command == CMD_GET_CAPABILITY:
            return 8
        if len(buf) < 4:
            return 4
        result = _U32.unpack_from(buf)[0]
        if self.command == CMD_GET_STATEBLOB:
            if result not in (TPM_SUCCESS, TPM_RETRY):
                return 4
            if len(buf) < _GET_HEADER.size:
                return _GET_HEADER.size
            length = _U32.unpack_from(buf, 12)[0] if result == TPM_SUCCESS else 0
            if length > MAX_BLOB:
                raise SwtpmProtocolError(
                    f"swtpm announced a state blob of {length} bytes, more than the "
                    f"{MAX_BLOB} accepted"
                )
            return _GET_HEADER.size + length
        if result != TPM_SUCCESS:
            return 4
        if self.command in (CMD_GET_CONFIG, CMD_GET_TPMESTABLISHED):
            return 8
        return 4

    def feed(self, data: bytes) -> ControlAnswer | None:
        """Add ``data``; return the answer once complete (later bytes are ignored)."""
        if self.answer is not None:
            return self.answer
        self._buffer += data
        needed = self._needed()
        while len(self._buffer) >= needed:
            again = self._needed()
            if again == needed:
                self.answer = self._decode(bytes(self._buffer[:needed]))
                return self.answer
            needed = again
        return None

    def _decode(self, raw: bytes) -> ControlAnswer:
        if self.command == CMD_GET_CAPABILITY:
            return ControlAnswer(TPM_SUCCESS, value=_U64.unpack(raw)[0])
        result = _U32.unpack_from(raw)[0]
        if len(raw) == 4:
            return ControlAnswer(result)
        if self.command == CMD_GET_STATEBLOB:
            _, flags, total, length = _GET_HEADER.unpack_from(raw)
            return ControlAnswer(result, flags, total, raw[_GET_HEADER.size :])
        if self.command == CMD_GET_TPMESTABLISHED:
            return ControlAnswer(result, value=raw[4])
        return ControlAnswer(result, flags=_U32.unpack_from(raw, 4)[0])


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


# -- the client ----------------------------------------------------------------------


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


class SwtpmControl:
    """
    The control channel of one swtpm, spoken asynchronously.

    swtpm serves one control client at a time and a held connection blocks every
    other one, so each operation opens its own connection and closes it after the
    answer.  Every operation has a deadline of ``timeout`` seconds on ``reactor``.
    """

    def __init__(self, reactor: Any, address: str, timeout: float = DEFAULT_TIMEOUT):
        self.reactor = reactor
        self.address = address
        self.timeout = timeout
        self._endpoint = controlEndpoint(reactor, address, timeout)

    def __repr__(self) -> str:
        return f"<SwtpmControl {self.address}>"

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
        return self._checked(CMD_INIT, _U32.pack(flags)).addCallback(lambda _: None)

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
        fields = struct.pack(">III", blob.flags, blob.blobType, len(blob.data))
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
            request = struct.pack(">III", flags, blobType, received)
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
        name = COMMAND_NAMES.get(command, f"0x{command:02x}")
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

    def call(self, command: int, fields: bytes = b"") -> Deferred[ControlAnswer]:
        """
        Send one raw command on a new connection.

        @return: a Deferred firing with the L{ControlAnswer} (whatever its result),
            failing with L{SwtpmUnavailable}, L{SwtpmBusy} or L{SwtpmProtocolError}.
        """
        request = _U32.pack(command) + fields
        name = COMMAND_NAMES.get(command, f"0x{command:02x}")
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

        connecting = self._endpoint.connect(Factory.forProtocol(build))
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
