"""Convergence policies: when pre-copy rounds stop and the VM may be paused."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zope.interface import implementer

from xenmig.errors import BadSpec, XenmigError
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


class DowntimeNotMet(XenmigError):
    """
    Pre-copy rounds never brought the estimated final round within the
    maximum downtime: the migration aborts before the VM is paused.
    """


#: What L{DowntimePolicy} does when the round limit comes before a fit.
FALLBACKS = ("abort", "pause")


@implementer(IConvergencePolicy)
@dataclass
class DowntimePolicy:
    """
    Pause only when the final round fits in ``maxDowntime`` seconds, as QEMU's
    ``downtime-limit`` does.

    After each round it measures the rate at which the recent rounds (the last
    ``window``, the full pass only while it is the only one) put bytes on the
    wire, bytes per second of the round's whole time (reading, scanning and
    waiting for the bandwidth included), and estimates the final round:
    what the round left to send (its ``remaining``, plus what it had queued
    but not yet sent) at that rate.  Pre-copy stops when the estimate fits.
    After ``maxRounds`` rounds without a fit, ``fallback`` decides: ``abort``
    raises L{DowntimeNotMet} (the VM is never paused), ``pause`` stops pre-copy
    anyway and marks L{exceeded}.

    The figures of the last round stay readable: L{estimate} (seconds),
    L{rate} (bytes per second).  Each device's rounds need their own policy
    (L{fresh}); round 0 starts over.
    """

    maxDowntime: float
    maxRounds: int = 10
    fallback: str = "abort"
    window: int = 2
    estimate: float | None = field(default=None, compare=False)
    rate: float | None = field(default=None, compare=False)
    exceeded: bool = field(default=False, compare=False)
    _rounds: list[tuple[int, float]] = field(default_factory=list, repr=False)
    _unsent: int = field(default=0, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.maxDowntime > 0:
            raise ValueError("the maximum downtime must be more than 0 seconds")
        if self.maxRounds < 1:
            raise ValueError("maxRounds must be at least 1 (round 0 always runs)")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"the fallback is one of {', '.join(FALLBACKS)}")
        if self.window < 1:
            raise ValueError("window must be at least 1")

    def proceed(self, round: int, result: RoundResult) -> bool:
        if round == 0:
            self._rounds, self._unsent = [], 0
        onWire = max(0, result.bytesSent + self._unsent - result.unsent)
        self._unsent = result.unsent
        self._rounds.append((onWire, result.seconds or 0.0))
        self.estimate, self.rate = _estimate(
            self._rounds, self.window, result.remaining + result.unsent
        )
        if self.estimate <= self.maxDowntime:
            return False
        if round + 1 < self.maxRounds:
            return True
        if self.fallback == "pause":
            self.exceeded = True
            return False
        raise DowntimeNotMet(
            f"the final round would take an estimated "
            f"{formatDuration(self.estimate)} ({result.remaining + result.unsent} "
            f"bytes left at {_rate(self.rate)} measured), over the maximum downtime "
            f"{formatDuration(self.maxDowntime)} after {round + 1} pre-copy "
            f"round(s); the VM was not paused (allow more rounds, a longer "
            f"downtime, or pause anyway with the fallback 'pause')"
        )

    def fresh(self) -> DowntimePolicy:
        """A policy with the same settings and no memory of rounds."""
        return DowntimePolicy(
            self.maxDowntime, self.maxRounds, self.fallback, self.window
        )


def _estimate(
    rounds: list[tuple[int, float]], window: int, left: int
) -> tuple[float, float | None]:
    """The final round's seconds, and the rate it is estimated at (None: unknown)."""
    recent = rounds[1:][-window:] or rounds[:1]
    sent = sum(onWire for onWire, _ in recent)
    seconds = sum(taken for _, taken in recent)
    if sent == 0 or seconds <= 0:
        # Nothing went out: the round was all overhead (scanning), which the
        # final round pays again.
        return (recent[-1][1] if left == 0 else float("inf")), None
    rate = sent / seconds
    return left / rate, rate


def _rate(rate: float | None) -> str:
    return "an unknown rate" if rate is None else f"{rate / MiB:.1f} MiB/s"


def formatDuration(seconds: float) -> str:
    """``0.3`` -> ``"300 ms"``; ``2.5`` -> ``"2.50 s"``."""
    if seconds == float("inf"):
        return "an unbounded time"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def perDevice(policy: IConvergencePolicy) -> IConvergencePolicy:
    """A policy per device: policies may remember the rounds they have seen."""
    fresh = getattr(policy, "fresh", None)
    return fresh() if callable(fresh) else policy


def timed(result: RoundResult, seconds: float, unsent: int) -> RoundResult:
    """``result`` with what the migration measured of its round (unless given)."""
    if result.seconds is not None:
        return result
    return dataclasses.replace(result, seconds=seconds, unsent=unsent)


def proceed(
    policy: IConvergencePolicy, round: int, result: RoundResult, where: str
) -> bool:
    """``policy.proceed``, its L{DowntimeNotMet} naming ``where`` it happened."""
    try:
        return bool(policy.proceed(round, result))
    except DowntimeNotMet as e:
        raise DowntimeNotMet(f"{where}: {e}") from e
