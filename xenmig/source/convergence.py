"""Convergence policies: when pre-copy rounds stop and the VM may be paused."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zope.interface import implementer

from xenmig.errors import BadSpec
from xenmig.interfaces import IConvergencePolicy
from xenmig.model import RoundResult

MiB = 1024 * 1024
_UNITS = {"": 1, "k": 1024, "m": MiB, "g": 1024 * MiB, "t": 1024 * 1024 * MiB}


@implementer(IConvergencePolicy)
@dataclass
class ConvergencePolicy:
    """
    The default policy: another pre-copy round is worth it only while it helps.

    After round ``n`` (from 0), pre-copy stops when

    1. ``n + 1 == maxRounds`` (the round limit; round 0, the full pass, counts);
    2. the round's ``remaining`` estimate is at most ``threshold`` bytes: the final
       round, sent while the VM is paused, will be small enough; or
    3. from round 1 on, ``remaining`` did not shrink below ``shrink`` times the
       previous round's: the guest writes as fast as rounds send, so more rounds only
       cost time.

    It remembers the previous round, so each device's rounds need their own policy
    (L{fresh} makes one with the same settings); round 0 starts over.
    """

    maxRounds: int = 5
    threshold: int = 64 * MiB
    shrink: float = 0.8
    _previous: RoundResult | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.maxRounds < 1:
            raise ValueError("maxRounds must be at least 1 (round 0 always runs)")
        if self.threshold < 0:
            raise ValueError("threshold must not be negative")
        if not 0 < self.shrink <= 1:
            raise ValueError("shrink must be in (0, 1]")

    def proceed(self, round: int, result: RoundResult) -> bool:
        previous = None if round == 0 else self._previous
        self._previous = result
        if round + 1 >= self.maxRounds:
            return False
        if result.remaining <= self.threshold:
            return False
        if previous is not None and result.remaining > previous.remaining * self.shrink:
            return False
        return True

    def fresh(self) -> ConvergencePolicy:
        """A policy with the same settings and no memory of rounds."""
        return ConvergencePolicy(self.maxRounds, self.threshold, self.shrink)

    @classmethod
    def parse(cls, text: str) -> ConvergencePolicy:
        """
        Parse ``rounds=N,threshold=SIZE,shrink=F`` (any may be left out; SIZE takes
        a K, M, G or T suffix), as given to ``xenmig migrate --convergence``.

        @raise BadSpec: naming the bad part.
        """
        settings: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            if key not in _SETTINGS:
                raise BadSpec(
                    f"convergence setting {item!r} is unknown "
                    f"(use rounds=N, threshold=SIZE, shrink=F)"
                )
            name, convert = _SETTINGS[key]
            try:
                settings[name] = convert(value)
            except ValueError:
                raise BadSpec(f"convergence setting {item!r} has a bad value")
        try:
            return cls(**settings)
        except ValueError as e:
            raise BadSpec(f"convergence settings {text!r}: {e}")


def parseSize(text: str) -> int:
    """``"64M"`` -> 67108864; plain numbers are bytes."""
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = text[-1:] if text[-1:].isalpha() else ""
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit {unit!r}")
    size = int(float(text[: len(text) - len(unit)]) * _UNITS[unit])
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


_SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "rounds": ("maxRounds", int),
    "threshold": ("threshold", parseSize),
    "shrink": ("shrink", float),
}


@implementer(IConvergencePolicy)
@dataclass(frozen=True)
class FixedRounds:
    """Exactly ``rounds`` pre-copy rounds (1: the full pass only), whatever they do."""

    rounds: int = 1

    def proceed(self, round: int, result: RoundResult) -> bool:
        return round + 1 < self.rounds
