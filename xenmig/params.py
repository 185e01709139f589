"""Device parameters: a kind's keys, parsed and checked once into a frozen record."""

from __future__ import annotations

import dataclasses
import difflib
import enum
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

from xenmig.errors import BadSpec
from xenmig.model import MAX_INT, DeviceDescription, DeviceSpec

#: The words a device parameter says "yes" with.
YES = frozenset({"1", "yes", "true", "on"})
#: ... and "no".
NO = frozenset({"", "0", "no", "false", "off"})

P = TypeVar("P", bound="DeviceParams")
#: Reads one value: ``(what, key, value)`` to the record's value, or BadSpec.
Reader = Callable[[str, str, Any], Any]


class Where(enum.Flag):
    """Where a key may be written."""

    #: In a device spec, by the toolstack or the operator.
    SPEC = enum.auto()
    #: In the description the source sends at Prepare, to the target.
    DESCRIPTION = enum.auto()
    #: Both: a target key (``target...``) is given in the spec and sent on.
    BOTH = SPEC | DESCRIPTION


@dataclasses.dataclass(frozen=True)
class Key:
    """One parameter of a device kind: its name, how to read it, and where."""

    name: str
    read: Reader
    where: Where
    required: Where = Where(0)
    #: How a missing required key is asked for, e.g. ``path=SOURCE_FILE``.
    usage: str = ""


def key(
    name: str,
    read: Reader,
    default: Any = None,
    *,
    where: Where | None = None,
    required: Where | bool = False,
    usage: str = "",
) -> Any:
    """
    A field of a L{DeviceParams} record, read from the parameter ``name``.

    @param where: where the key may appear; by default a ``target...`` key
        travels from the spec to the target (L{Where.BOTH}), any other is the
        source's own (L{Where.SPEC}).  A fact the source's C{describe} adds for
        the target is L{Where.DESCRIPTION}.
    @param required: where it must appear (True: wherever it may).
    @param usage: how a missing required key is asked for (``path=FILE``).
    """
    if where is None:
        where = Where.BOTH if name.startswith("target") else Where.SPEC
    if required is True:
        required = where
    elif required is False:
        required = Where(0)
    spec = Key(name, read, where, required, usage)
    return dataclasses.field(default=default, metadata={"key": spec})


class DeviceParams:
    """
    The base of a kind's parameter record, a frozen dataclass whose fields are
    made with L{key}.  Both halves of a kind parse the same record: the source
    from the spec (C{fromSpec}), the target from the description
    (C{fromDescription}); each refuses keys it does not know, naming the
    nearest known one.  Rules that tie keys together go in C{check}.
    """

    #: The kind's name, for messages.
    KIND: ClassVar[str] = "device"

    @classmethod
    def keys(cls) -> dict[str, Key]:
        """Every key of the record, by parameter name."""
        return {
            f.metadata["key"].name: f.metadata["key"]
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if "key" in f.metadata
        }

    @classmethod
    def fromSpec(cls: type[P], spec: DeviceSpec) -> P:
        """
        The source's record: every key the spec gives (its own and the
        target's); no facts.

        @raise BadSpec: naming the device and the key.
        """
        given = {**spec.params, **spec.targetParams}
        return cls._parse(f"{spec.kind} device {spec.name}", given, Where.SPEC)

    @classmethod
    def fromDescription(cls: type[P], description: DeviceDescription) -> P:
        """
        The target's record: the target keys and the source's facts.

        @raise BadSpec: naming the device and the key.
        """
        what = f"{description.kind} device {description.name}"
        return cls._parse(what, description.params, Where.DESCRIPTION)

    @classmethod
    def _parse(cls: type[P], what: str, given: Mapping[str, Any], where: Where) -> P:
        known, fields = _keyTable(cls, where)
        refuseUnknown(what, given, known)
        values: dict[str, Any] = {}
        for name, spec in known.items():
            if name in given:
                values[fields[name]] = spec.read(what, name, given[name])
            elif spec.required & where:
                usage = spec.usage or f"{name}=..."
                raise BadSpec(f"{what}: the {cls.KIND} kind needs {usage}")
        record = cls(**values)
        record.check(what, where)
        return record

    def check(self, what: str, where: Where) -> None:
        """
        Rules between keys, for the record parsed at ``where``.

        @raise BadSpec: naming ``what`` and the rule.
        """


KeyTable = tuple[Mapping[str, Key], Mapping[str, str]]
_keyTables: dict[tuple[type, Where], KeyTable] = {}


def _keyTable(cls: type[DeviceParams], where: Where) -> KeyTable:
    """
    The keys of ``cls`` that may be written at ``where``, by parameter name,
    and the record's field of each parameter name: fixed for a class, so made
    once rather than at every parse (a spec and a description per device).
    """
    table = _keyTables.get((cls, where))
    if table is None:
        known = {n: k for n, k in cls.keys().items() if k.where & where}
        fields = {
            f.metadata["key"].name: f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if "key" in f.metadata
        }
        table = _keyTables[(cls, where)] = (known, fields)
    return table


def refuseUnknown(what: str, given: Iterable[str], known: Iterable[str]) -> None:
    """
    @raise BadSpec: if ``given`` has parameter names not in ``known``, naming
        ``what`` (e.g. ``"vtpm device tpm0"``), each unknown name with the
        nearest known one, and all the known ones.
    """
    knownSet = set(known)
    given = list(given)
    if knownSet.issuperset(given):
        return
    known = sorted(knownSet)
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    named = []
    for name in unknown:
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        named.append(f"{name} (did you mean {near[0]}?)" if near else name)
    raise BadSpec(
        f"{what}: unknown parameter(s) {', '.join(named)} "
        f"(known: {', '.join(known) or 'none'})"
    )


# -- readers -------------------------------------------------------------------------


def text(what: str, name: str, value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise BadSpec(f"{what}: {name}= must not be empty")
    return value


def string(what: str, name: str, value: Any) -> str:
    """Any string, empty or not."""
    if not isinstance(value, str):
        raise BadSpec(f"{what}: parameter {name} must be a string")
    return value


def flag(what: str, name: str, value: Any) -> bool:
    """Yes (1, yes, true, on) or no (0, no, false, off, or nothing)."""
    if isinstance(value, bool):
        return value
    word = str(value).lower()
    if word in YES:
        return True
    if word in NO:
        return False
    raise BadSpec(f"{what}: {name}={value!r} is neither yes nor no")


def whole(what: str, name: str, value: Any) -> int:
    """A whole number from 0 to 2**63 - 1 (decimal digits, in a spec)."""
    if isinstance(value, str) and value.isdigit() and len(value) <= 19:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadSpec(f"{what}: parameter {name} must be a whole number")
    if not 0 <= value <= MAX_INT:
        raise BadSpec(f"{what}: parameter {name} is out of range")
    return value


def seconds(most: float) -> Reader:
    """A time-out in seconds, above 0 and at most ``most``."""

    def read(what: str, name: str, value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = -1.0
        if not 0 < number <= most:
            raise BadSpec(f"{what}: {name}={value!r} is not a number of seconds")
        return number

    return read


def choice(*values: str) -> Reader:
    """One of ``values``."""

    def read(what: str, name: str, value: Any) -> str:
        if value not in values:
            raise BadSpec(f"{what}: {name} must be one of {', '.join(values)}")
        return str(value)

    return read


def anything(what: str, name: str, value: Any) -> Any:
    """Any well-formed value, as given (a fact checked where it is used)."""
    return value
