"""The one hierarchy of xenmig errors, and its mapping onto the AMP wire."""

from __future__ import annotations

import re


class XenmigError(Exception):
    """
    Base of every error xenmig raises on purpose.

    The message says what happened, to what (migration id, device), and, where there
    is something to do, what to do.
    """


class ConfigurationError(XenmigError):
    """The daemon or the client was started with a setting that cannot work."""


class ProtocolError(XenmigError):
    """The peer sent something the protocol does not allow (bad value or order)."""


class VersionMismatch(ProtocolError):
    """The peer speaks a protocol or stream version this side cannot accept."""


class UnknownMigration(XenmigError):
    """No session with that migration id exists on this host."""


class DuplicateMigration(XenmigError):
    """A session with that migration id already exists on this host."""


class UnknownDevice(XenmigError):
    """The session has no device of that name, or no handler for that kind."""


class InvalidTransition(XenmigError):
    """A session or device was asked to move to a state its machine does not allow."""


class DeviceRefused(XenmigError):
    """A target handler refused to accept a device at Prepare; the VM is unaffected."""


class Busy(XenmigError):
    """
    The peer is at one of its limits for load (its sessions, the commands in
    flight on a connection, its connections) and did nothing: the same request
    may be sent again later.

    The message names the limit first and ends with a hint, ``LIMIT: what;
    retry after N s`` (L{at} writes it); L{limit} and L{retryAfter} read them
    back, so they cross the wire inside the message.
    """

    @classmethod
    def at(cls, limit: str, what: str, retryAfter: float) -> Busy:
        """A refusal at ``limit`` (e.g. ``--max-sessions``), saying ``what``."""
        return cls(f"{limit}: {what}; retry after {retryAfter:g} s")

    @property
    def limit(self) -> str:
        """The limit the peer is at, as it names it (empty if it does not)."""
        head, sep, _ = str(self).partition(": ")
        return head if sep else ""

    @property
    def retryAfter(self) -> float | None:
        """The seconds the peer suggests waiting, if it says."""
        found = _RETRY_AFTER.search(str(self))
        return float(found.group(1)) if found else None

    @property
    def what(self) -> str:
        """The message without its retry hint."""
        return _RETRY_AFTER.sub("", str(self))


_RETRY_AFTER = re.compile(r"; retry after ([0-9]+(?:\.[0-9]+)?) s$")


class BadSpec(XenmigError):
    """A device specification (kind, name, parameters) is malformed."""


class PathNotAllowed(XenmigError):
    """A destination resolves outside the allowed roots (``..``, absolute, symlink)."""


class StreamError(XenmigError):
    """A state stream was malformed, truncated, or ended early."""


class StreamLost(StreamError):
    """This side's connection carrying a stream broke (the peer may know why)."""


class StreamInterrupted(StreamError):
    """
    A resumable stream broke and waits to be opened again (OpenStream): the
    device goes on from what the target has taken, nothing is lost yet.
    """


class StreamStalled(StreamError):
    """
    A state stream made no progress for longer than its progress time-out
    (``--stall-timeout``) while its phase expected some: the message names the
    device, the phase and the stream's peer.
    """


class DigestMismatch(StreamError):
    """The digest of the received state differs from the one the source sent."""


class BadToken(XenmigError):
    """A stream token is unknown, used, expired, or presented by another peer."""


class NotAuthorized(XenmigError):
    """The peer's identity is not allowed to do what it asked."""


class PhaseTimeout(XenmigError):
    """A phase of a migration did not finish within its deadline."""


class MigrationAborted(XenmigError):
    """The migration was aborted; the message carries the reason."""


class DeviceError(XenmigError):
    """A device handler failed while taking out or putting back its state."""


class CommitFailed(XenmigError):
    """
    Commit did not happen, definitely: the target ended the migration ABORTED
    and will never release its VM (an install failed and was reversed, or the
    journal could not record the commit).  The source may resume the VM.
    """


class JournalUnavailable(XenmigError):
    """
    The target could not record a migration's state durably (its state directory
    is full, read-only or failing): the command that needed it changed nothing.
    """


class CommitInDoubt(XenmigError):
    """
    Commit was sent but its answer never arrived and the target could not be asked:
    the VM may run on the target.  Do not resume it on the source; ask the target
    (``xenmig status``) first.
    """


class InternalError(XenmigError):
    """
    Something failed on the peer that it did not expect (a bug, a resource
    exhausted); the message carries what it was.  The peer keeps serving.
    """


class PeerError(XenmigError):
    """
    The peer answered with an error that this side does not know by code.

    Carries the peer's own message so the reason is never lost.
    """


_WIRE_CODES: dict[type[Exception], bytes] = {
    ConfigurationError: b"CONFIGURATION",
    ProtocolError: b"PROTOCOL",
    VersionMismatch: b"VERSION_MISMATCH",
    UnknownMigration: b"UNKNOWN_MIGRATION",
    DuplicateMigration: b"DUPLICATE_MIGRATION",
    UnknownDevice: b"UNKNOWN_DEVICE",
    InvalidTransition: b"INVALID_TRANSITION",
    DeviceRefused: b"DEVICE_REFUSED",
    Busy: b"BUSY",
    BadSpec: b"BAD_SPEC",
    PathNotAllowed: b"PATH_NOT_ALLOWED",
    StreamError: b"STREAM_ERROR",
    DigestMismatch: b"DIGEST_MISMATCH",
    StreamInterrupted: b"STREAM_INTERRUPTED",
    StreamStalled: b"STREAM_STALLED",
    BadToken: b"BAD_TOKEN",
    NotAuthorized: b"NOT_AUTHORIZED",
    PhaseTimeout: b"PHASE_TIMEOUT",
    MigrationAborted: b"MIGRATION_ABORTED",
    DeviceError: b"DEVICE_ERROR",
    CommitFailed: b"COMMIT_FAILED",
    JournalUnavailable: b"JOURNAL_UNAVAILABLE",
    InternalError: b"INTERNAL",
}

#: Every error that may cross the wire, by its pinned AMP code.  Responders raise
#: these classes; the other side re-raises the same class with the same message.
#: AMP picks the first class in this order that matches a failure, so subclasses
#: come before their bases (``DigestMismatch`` before ``StreamError``).
WIRE_ERRORS: dict[type[Exception], bytes] = dict(
    sorted(_WIRE_CODES.items(), key=lambda item: -len(item[0].__mro__))
)
