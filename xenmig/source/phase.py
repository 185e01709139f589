"""The phases of a migration on the source, and the one table of moves between them."""

from __future__ import annotations

import enum


class Phase(enum.StrEnum):
    """
    The phases of a L{xenmig.source.migration.SourceMigration}.  Each compares
    equal to its value (``"IN-DOUBT"``...), the form reports, ``--json`` and
    L{xenmig.source.blocking.BlockingMigration.phase} show.
    """

    NEW = "NEW"
    PREPARED = "PREPARED"
    PRECOPY = "PRECOPY"
    PRECOPIED = "PRECOPIED"
    TRANSFER = "TRANSFER"
    READY = "READY"
    #: Commit was sent; its answer (or the target's word) decides what follows.
    COMMITTING = "COMMITTING"
    COMMITTED = "COMMITTED"
    IN_DOUBT = "IN-DOUBT"
    ABORTED = "ABORTED"


#: The one transition table: every phase and where it may go.  A step that
#: moves to a phase may start only in a phase that leads there.  From
#: COMMITTING only the target's definite word leads to ABORTED.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.NEW: frozenset({Phase.PREPARED, Phase.ABORTED}),
    Phase.PREPARED: frozenset({Phase.PRECOPY, Phase.TRANSFER, Phase.ABORTED}),
    Phase.PRECOPY: frozenset({Phase.PRECOPIED, Phase.ABORTED}),
    Phase.PRECOPIED: frozenset({Phase.TRANSFER, Phase.ABORTED}),
    Phase.TRANSFER: frozenset({Phase.READY, Phase.ABORTED}),
    Phase.READY: frozenset({Phase.COMMITTING, Phase.ABORTED}),
    Phase.COMMITTING: frozenset({Phase.COMMITTED, Phase.IN_DOUBT, Phase.ABORTED}),
    Phase.COMMITTED: frozenset(),
    Phase.IN_DOUBT: frozenset(),
    Phase.ABORTED: frozenset(),
}

#: Phases after which the source does nothing more (IN-DOUBT: ask the target).
FINAL = frozenset({Phase.COMMITTED, Phase.IN_DOUBT, Phase.ABORTED})


def leadingTo(phase: Phase) -> list[Phase]:
    """The phases from which ``phase`` may be entered, in the order of L{Phase}."""
    return [p for p in Phase if phase in TRANSITIONS[p]]
