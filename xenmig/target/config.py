"""What a target daemon is configured with: roots, limits and every time-out."""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.python.filepath import FilePath

from xenmig.fs import InstallAs
from xenmig.target.session import Phase

#: Concurrent unfinished migrations a host accepts, unless configured.
MAX_SESSIONS = 16
#: Devices (so streams) of one migration, unless configured.
MAX_DEVICES = 64


@dataclass(frozen=True)
class Timeouts:
    """Every bound on waiting, in seconds; each expiry aborts with its name."""

    handshake: float = 30.0
    idle: float = 60.0
    #: No progress on a stream that should make some (0: never); see
    #: L{xenmig.streamreceiver.StreamReceiver}.
    stall: float = 60.0
    prepared: float = 600.0
    receiving: float = 3600.0
    ready: float = 600.0
    token: float = 60.0
    commit: float = 300.0
    #: How long a resumable session waits for a broken connection (its control
    #: connection, a stream) to come back; 0: it aborts at once.
    reconnect: float = 60.0

    def deadlines(self) -> dict[Phase, float]:
        return {
            Phase.PREPARED: self.prepared,
            Phase.RECEIVING: self.receiving,
            Phase.READY: self.ready,
            Phase.COMMITTING: self.commit,
        }


@dataclass(frozen=True)
class TargetConfig:
    """What the target daemon was configured with."""

    stateDir: FilePath
    allowedRoots: tuple[FilePath, ...] = ()
    onCommit: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    maxSessions: int = MAX_SESSIONS
    #: Devices (so streams) of one migration.
    maxDevices: int = MAX_DEVICES
    #: The most bytes per second all incoming streams receive together (None: no
    #: limit).
    maxBandwidth: int | None = None
    #: The owner and mode of installed images, unless a device says otherwise.
    installAs: InstallAs = field(default_factory=InstallAs)

    @property
    def roots(self) -> tuple[FilePath, ...]:
        return self.allowedRoots or (self.stateDir.child("devices"),)
