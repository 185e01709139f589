"""The phases of a migration on the target, and the states of its devices."""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """The phases of a migration on the target."""

    PREPARED = "PREPARED"
    RECEIVING = "RECEIVING"
    READY = "READY"
    COMMITTING = "COMMITTING"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"


#: The one transition table: every phase and where it may go.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PREPARED: frozenset({Phase.RECEIVING, Phase.ABORTED}),
    Phase.RECEIVING: frozenset({Phase.READY, Phase.ABORTED}),
    Phase.READY: frozenset({Phase.COMMITTING, Phase.ABORTED}),
    Phase.COMMITTING: frozenset({Phase.COMMITTED, Phase.ABORTED}),
    Phase.COMMITTED: frozenset(),
    Phase.ABORTED: frozenset(),
}

#: Phases after which nothing more happens.
FINAL = frozenset({Phase.COMMITTED, Phase.ABORTED})


class DeviceState(enum.Enum):
    """The states of one device's transfer on the target."""

    ACCEPTED = "ACCEPTED"
    RECEIVING = "RECEIVING"
    VERIFYING = "VERIFYING"
    READY = "READY"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"
    #: Its handler refused it at Prepare: the session never opened, so this
    #: state appears only in the record of the refused Prepare.
    REFUSED = "REFUSED"


DEVICE_TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    DeviceState.ACCEPTED: frozenset({DeviceState.RECEIVING, DeviceState.ABORTED}),
    DeviceState.RECEIVING: frozenset({DeviceState.VERIFYING, DeviceState.ABORTED}),
    DeviceState.VERIFYING: frozenset({DeviceState.READY, DeviceState.ABORTED}),
    DeviceState.READY: frozenset({DeviceState.COMMITTED, DeviceState.ABORTED}),
    DeviceState.COMMITTED: frozenset(),
    DeviceState.ABORTED: frozenset(),
    DeviceState.REFUSED: frozenset(),
}
