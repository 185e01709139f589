"""The AMP control commands between a source and a target, and for local toolstacks."""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

from xenmig.errors import WIRE_ERRORS, ProtocolError
from xenmig.model import INTERRUPT_SEND, SEND_EVENT, SEND_MIGRATION

#: The control protocol version this side speaks.
PROTOCOL_VERSION = 1
#: Versions a target accepts: its own (and the previous one, once there is one).
ACCEPTED_PROTOCOL_VERSIONS = frozenset({PROTOCOL_VERSION})
#: Largest JSON value in a single AMP argument (AMP's own limit is 65,535 bytes).
MAX_JSON = 60 * 1024


class JSON(amp.Argument):
    """A small JSON value (a dict by default) in one AMP value."""

    def __init__(self, kind: type = dict, optional: bool = False) -> None:
        super().__init__(optional)
        self.kind = kind

    def toString(self, inObject: Any) -> bytes:
        data = json.dumps(inObject, sort_keys=True, separators=(",", ":")).encode()
        if len(data) > MAX_JSON:
            raise ProtocolError(f"JSON value of {len(data)} bytes exceeds {MAX_JSON}")
        return data

    def fromString(self, inString: bytes) -> Any:
        try:
            value = json.loads(inString.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(f"malformed JSON argument: {e}")
        if not isinstance(value, self.kind):
            raise ProtocolError(f"JSON argument must be a {self.kind.__name__}")
        return value


_DEVICE = [
    (b"kind", amp.Unicode()),
    (b"name", amp.Unicode()),
    (b"size", amp.Integer()),
    (b"precopy", amp.Boolean()),
    (b"params", JSON()),
]

_OFFER = [
    (b"name", amp.Unicode()),
    (b"accepted", amp.Boolean()),
    (b"reason", amp.Unicode()),
    (b"params", JSON()),
]


class Prepare(amp.Command):
    """
    Open a migration session: describe every device; each target handler accepts
    or refuses it.  Sent before the VM is paused, so a refusal costs nothing.
    If any device is refused, the target keeps no session and answers every
    device's offer (the refused ones carry the reason).  The answer also
    announces the target's connection limits (L{xenmig.limits.AnnouncedLimits};
    an older target leaves them out), within which the source paces itself.
    A source that can resume asks for it (``resume``); a target that grants
    it says so in its answer (an older one says nothing: no resumption).  A
    target that takes small states on the control connection (StreamRecords)
    says up to what size (``inline``: a device's description's size).
    """

    commandName = b"xenmig-prepare"
    arguments = [
        (b"migration_id", amp.Unicode()),
        (b"domain", amp.Unicode()),
        (b"protocol_version", amp.Integer()),
        (b"devices", amp.AmpList(_DEVICE)),
        (b"resume", amp.Boolean(optional=True)),
    ]
    response = [
        (b"protocol_version", amp.Integer()),
        (b"offers", amp.AmpList(_OFFER)),
        (b"limits", JSON(optional=True)),
        (b"resume", amp.Boolean(optional=True)),
        (b"inline", amp.Integer(optional=True)),
    ]
    errors = WIRE_ERRORS


class OpenStream(amp.Command):
    """
    Ask for a one-time token to open the state stream of one device.  In a
    resumable session it also opens a stream again: the answer says how many
    records the device has taken (``position``), and whether its END among
    them (``ended``); the new stream goes on after them.
    """

    commandName = b"xenmig-open-stream"
    arguments = [(b"migration_id", amp.Unicode()), (b"device", amp.Unicode())]
    response = [
        (b"token", amp.String()),
        (b"position", amp.Integer(optional=True)),
        (b"ended", amp.Boolean(optional=True)),
    ]
    errors = WIRE_ERRORS


class StreamRecords(amp.Command):
    """
    Part of a small device's stream, on the control connection instead of a
    stream connection of its own (the target offered it at Prepare:
    ``inline``): the bytes a stream connection carries after StartStream,
    from byte ``offset`` of the stream.  Answered once its records are handed
    to the device: how many bytes of the stream the target has taken.  Asked
    again with the same offset (its answer was lost), it takes nothing twice.
    Once the stream's END is taken, the answer also carries the device's
    verified digest, as DeviceReady's, if it verified within a moment.
    """

    commandName = b"xenmig-stream-records"
    arguments = [
        (b"migration_id", amp.Unicode()),
        (b"device", amp.Unicode()),
        (b"offset", amp.Integer()),
        (b"data", amp.String()),
    ]
    response = [
        (b"taken", amp.Integer()),
        (b"size", amp.Integer(optional=True)),
        (b"algorithm", amp.Unicode(optional=True)),
        (b"digest", amp.String(optional=True)),
    ]
    errors = WIRE_ERRORS


class StreamPosition(amp.Command):
    """
    How many records of a device's stream the target has taken (resumable
    sessions): the source may forget what it kept of them.
    """

    commandName = b"xenmig-stream-position"
    arguments = [(b"migration_id", amp.Unicode()), (b"device", amp.Unicode())]
    response = [(b"position", amp.Integer()), (b"ended", amp.Boolean())]
    errors = WIRE_ERRORS


class Reattach(amp.Command):
    """
    Take a resumable session over on this (new) control connection, after the
    one that held it was lost: same peer identity only.  Answers its phase.
    """

    commandName = b"xenmig-reattach"
    arguments = [(b"migration_id", amp.Unicode())]
    response = [(b"phase", amp.Unicode())]
    errors = WIRE_ERRORS


class StartStream(amp.ProtocolSwitchCommand):
    """
    Sent on a new connection: present a stream token; after the answer, the
    connection carries the raw records of that device's stream.
    """

    commandName = b"xenmig-start-stream"
    arguments = [(b"token", amp.String())]
    response = []  # type: ignore[var-annotated]
    errors = WIRE_ERRORS


class DeviceReady(amp.Command):
    """
    Wait until the target has received, verified and staged one device's state.
    Answers the digest the target computed, for the source to compare.
    """

    commandName = b"xenmig-device-ready"
    arguments = [(b"migration_id", amp.Unicode()), (b"device", amp.Unicode())]
    response = [
        (b"size", amp.Integer()),
        (b"algorithm", amp.Unicode()),
        (b"digest", amp.String()),
    ]
    errors = WIRE_ERRORS


class Commit(amp.Command):
    """The point of no return: install every staged state and release the VM."""

    commandName = b"xenmig-commit"
    arguments = [(b"migration_id", amp.Unicode())]
    response = [(b"installed", amp.ListOf(amp.Unicode()))]
    errors = WIRE_ERRORS


class Abort(amp.Command):
    """Abort a migration before Commit, discarding everything staged."""

    commandName = b"xenmig-abort"
    arguments = [(b"migration_id", amp.Unicode()), (b"reason", amp.Unicode())]
    response = [(b"phase", amp.Unicode())]
    errors = WIRE_ERRORS


class QueryMigration(amp.Command):
    """The status of one migration: phase, per-device bytes and rate, reason."""

    commandName = b"xenmig-query"
    arguments = [(b"migration_id", amp.Unicode())]
    response = [(b"status", JSON())]
    errors = WIRE_ERRORS


class ListMigrations(amp.Command):
    """The status of the most recent migrations this host knows, newest first."""

    commandName = b"xenmig-list"
    arguments = [(b"limit", amp.Integer(optional=True))]
    response = [(b"migrations", JSON(list))]
    errors = WIRE_ERRORS


class AwaitRestored(amp.Command):
    """
    Local toolstack only: wait until a migration of ``domain`` has committed.
    Answers its id and what was installed; fails if it aborts or on time-out.
    Each commit is handed out once (the VM is resumed once); naming a
    ``migration_id`` asks about that one, claimed or not.
    """

    commandName = b"xenmig-await-restored"
    arguments = [
        (b"domain", amp.Unicode()),
        (b"timeout", amp.Float()),
        (b"migration_id", amp.Unicode(optional=True)),
    ]
    response = [
        (b"migration_id", amp.Unicode()),
        (b"installed", amp.ListOf(amp.Unicode())),
    ]
    errors = WIRE_ERRORS


class SendMigration(amp.Command):
    """
    Local socket only (``xenmig migrate --via-daemon``): the daemon sends a
    migration as this host, on its caller's behalf, with ``migrate``'s
    ``options``; meanwhile it calls SendEvent on the same connection (phases,
    progress, messages, the report).  Answers the exit status ``xenmig
    migrate`` would have; the connection lost interrupts the migration.
    """

    commandName = SEND_MIGRATION
    arguments = [(b"protocol", amp.Integer()), (b"options", JSON())]
    response = [(b"exit_status", amp.Integer())]
    errors = WIRE_ERRORS


class SendEvent(amp.Command):
    """The daemon to its SendMigration caller: one event (no answer)."""

    commandName = SEND_EVENT
    arguments = [(b"event", JSON())]
    requiresAnswer = False


class InterruptSend(amp.Command):
    """The SendMigration caller to the daemon: abort, as Ctrl-C does (no answer)."""

    commandName = INTERRUPT_SEND
    arguments = []  # type: ignore[var-annotated]
    requiresAnswer = False


class DeviceRequest(amp.Command):
    """A handler-scoped request, routed to the peer handler of the same device."""

    commandName = b"xenmig-device-request"
    arguments = [
        (b"migration_id", amp.Unicode()),
        (b"device", amp.Unicode()),
        (b"method", amp.Unicode()),
        (b"payload", JSON()),
    ]
    response = [(b"payload", JSON())]
    errors = WIRE_ERRORS
