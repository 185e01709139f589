"""swtpm's control channel on the wire: codes, requests, answers, blobs and errors."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xenmig.errors import DeviceError

# The client that speaks this is xenmig.clients.swtpmcontrol; the process that
# answers it, xenmig.clients.swtpmprocess.

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

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_GET_HEADER = struct.Struct(">IIII")  # result, flags, totlength, length


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


def commandName(command: int) -> str:
    """``GET_STATEBLOB`` for a control-channel command code (else its hex)."""
    return COMMAND_NAMES.get(command, f"0x{command:02x}")


# -- requests ------------------------------------------------------------------------


def encodeFields(*values: int) -> bytes:
    """A command's fields: each a big-endian u32."""
    return struct.pack(f">{len(values)}I", *values)


def encodeRequest(command: int, fields: bytes = b"") -> bytes:
    """One control request: the command code, then its fields (and any data)."""
    return _U32.pack(command) + fields


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
