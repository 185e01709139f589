"""Tests for the convergence policies that end pre-copy rounds."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from xenmig.errors import BadSpec
from xenmig.interfaces import IConvergencePolicy
from xenmig.model import RoundResult, parseDuration
from xenmig.source.convergence import (
    ConvergencePolicy,
    DowntimeNotMet,
    DowntimePolicy,
    FixedRounds,
    parseSize,
    proceed,
    timed,
)

MiB = 1024 * 1024


def decisions(policy: IConvergencePolicy, remaining: list[int]) -> list[bool]:
    """The policy's answer after each round, given what each round left."""
    return [
        policy.proceed(number, RoundResult(left, left))
        for number, left in enumerate(remaining)
    ]


def test_policies_provide_the_interface() -> None:
    """Both policies verify against IConvergencePolicy."""
    assert verifyObject(IConvergencePolicy, ConvergencePolicy())
    assert verifyObject(IConvergencePolicy, FixedRounds(3))


def test_stops_when_few_bytes_remain() -> None:
    """Pre-copy stops after the first round that leaves at most the threshold."""
    policy = ConvergencePolicy(maxRounds=10, threshold=64 * MiB)
    assert decisions(policy, [4096 * MiB, 500 * MiB, 100 * MiB, 60 * MiB]) == [
        True,
        True,
        True,
        False,
    ]


def test_stops_at_the_round_limit() -> None:
    """Pre-copy stops after maxRounds rounds, the full pass included."""
    policy = ConvergencePolicy(maxRounds=3, threshold=0, shrink=1.0)
    assert decisions(policy, [1000, 900, 800]) == [True, True, False]


def test_stops_when_rounds_stop_shrinking() -> None:
    """Pre-copy stops when a round leaves more than shrink times the previous one."""
    policy = ConvergencePolicy(maxRounds=10, threshold=MiB, shrink=0.8)
    assert decisions(policy, [1000 * MiB, 300 * MiB, 250 * MiB]) == [
        True,
        True,
        False,
    ]


def test_round_zero_forgets_earlier_rounds() -> None:
    """A new round 0 starts over, and fresh() copies settings without memory."""
    policy = ConvergencePolicy(maxRounds=10, threshold=MiB)
    assert decisions(policy, [100 * MiB, 10 * MiB]) == [True, True]
    assert decisions(policy, [200 * MiB, 50 * MiB]) == [True, True]
    copy = policy.fresh()
    assert copy == policy and copy.proceed(1, RoundResult(MiB * 90, MiB * 90))


def test_single_round_limit_means_full_pass_only() -> None:
    """maxRounds=1 and FixedRounds(1) stop after the full pass."""
    assert decisions(ConvergencePolicy(maxRounds=1), [10**12]) == [False]
    assert decisions(FixedRounds(1), [10**12]) == [False]
    assert decisions(FixedRounds(3), [1, 1, 1]) == [True, True, False]


def test_parse_reads_settings() -> None:
    """parse() reads rounds, threshold with a unit, and shrink; defaults otherwise."""
    assert ConvergencePolicy.parse("rounds=3,threshold=16M,shrink=0.5") == (
        ConvergencePolicy(maxRounds=3, threshold=16 * MiB, shrink=0.5)
    )
    assert ConvergencePolicy.parse("") == ConvergencePolicy()
    assert parseSize("1GiB") == 1024 * MiB and parseSize("4096") == 4096


@pytest.mark.parametrize(
    "text", ["rounds=0", "speed=3", "threshold=lots", "shrink=2", "threshold=-1M"]
)
def test_parse_refuses_bad_settings(text: str) -> None:
    """parse() raises BadSpec naming a bad or unknown setting."""
    with pytest.raises(BadSpec, match="convergence"):
        ConvergencePolicy.parse(text)


# -- the downtime target ------------------------------------------------------------


def measured(sent: int, seconds: float, unsent: int = 0) -> RoundResult:
    """A round that sent ``sent`` bytes in ``seconds``, leaving as much to send."""
    return RoundResult(sent, sent, seconds=seconds, unsent=unsent)


def test_downtimePolicyProvidesTheInterface() -> None:
    """The downtime policy, fresh or used, verifies against IConvergencePolicy."""
    policy = DowntimePolicy(0.3)
    assert verifyObject(IConvergencePolicy, policy)
    assert verifyObject(IConvergencePolicy, policy.fresh())


def test_downtimePausesOnceTheEstimateFits() -> None:
    """Rounds go on until what the last one left, at the recent rounds' rate,
    fits in the maximum downtime; the estimate and rate stay readable."""
    policy = DowntimePolicy(0.3, maxRounds=10)
    assert policy.proceed(0, measured(400 * MiB, 2.0))  # 2 s at 200 MiB/s
    assert policy.estimate == pytest.approx(2.0)
    assert policy.proceed(1, measured(40 * MiB, 0.5))  # 0.5 s
    # Round 2: the recent rounds (1 and 2) sent 50 MiB in 0.6 s.
    assert not policy.proceed(2, measured(10 * MiB, 0.1))
    assert policy.rate == pytest.approx(50 * MiB / 0.6)
    assert policy.estimate == pytest.approx(10 * 0.6 / 50)
    assert not policy.exceeded


def test_downtimeCountsWhatWasQueuedButNotSent() -> None:
    """Bytes still queued at the end of a round are left to send, and the rate
    counts only what reached the wire."""
    policy = DowntimePolicy(0.5, window=1)
    assert policy.proceed(0, measured(100 * MiB, 1.0, unsent=20 * MiB))
    assert policy.rate == pytest.approx(80 * MiB)
    assert policy.estimate == pytest.approx(120 / 80)
    # Round 1 sends its 10 MiB and the 20 MiB queued before: 30 MiB in 0.5 s.
    assert not policy.proceed(1, measured(10 * MiB, 0.5))
    assert policy.rate == pytest.approx(60 * MiB)
    assert policy.estimate == pytest.approx(10 / 60)


def test_downtimeNeverFitsAbortsWithTheFigures() -> None:
    """At the round limit without a fit, the policy raises DowntimeNotMet with
    the estimate and the limit (the VM is not paused)."""
    policy = DowntimePolicy(0.3, maxRounds=3)
    assert policy.proceed(0, measured(100 * MiB, 1.0))
    assert policy.proceed(1, measured(100 * MiB, 1.0))
    with pytest.raises(DowntimeNotMet) as caught:
        policy.proceed(2, measured(100 * MiB, 1.0))
    message = str(caught.value)
    assert "estimated 1.00 s" in message
    assert "over the maximum downtime 300 ms after 3 pre-copy round(s)" in message
    assert "the VM was not paused" in message


def test_downtimeFallbackPausesAnyway() -> None:
    """With the fallback 'pause', the round limit stops pre-copy, marked exceeded."""
    policy = DowntimePolicy(0.3, maxRounds=2, fallback="pause")
    assert policy.proceed(0, measured(100 * MiB, 1.0))
    assert not policy.proceed(1, measured(100 * MiB, 1.0))
    assert policy.exceeded
    assert policy.estimate == pytest.approx(1.0)


def test_downtimeRoundOfNothingCostsItsOverhead() -> None:
    """A round that sent nothing still took its time: the estimate is that."""
    policy = DowntimePolicy(0.3)
    assert policy.proceed(0, measured(100 * MiB, 1.0))
    assert policy.proceed(1, measured(0, 0.5))
    assert policy.estimate == pytest.approx(0.5)
    assert not policy.proceed(2, measured(0, 0.2))
    assert policy.estimate == pytest.approx(0.2)


def test_downtimeFreshForgets() -> None:
    """fresh() keeps the settings, not the rounds; round 0 starts over."""
    policy = DowntimePolicy(0.3, maxRounds=4, fallback="pause", window=3)
    policy.proceed(0, measured(100 * MiB, 1.0))
    fresh = policy.fresh()
    assert (fresh.maxDowntime, fresh.maxRounds, fresh.fallback, fresh.window) == (
        0.3,
        4,
        "pause",
        3,
    )
    assert fresh.estimate is None
    assert policy.proceed(0, measured(100 * MiB, 1.0))
    assert policy.estimate == pytest.approx(1.0)


def test_migrationNamesTheDevice() -> None:
    """What the migration raises names the migration and the device."""
    policy = DowntimePolicy(0.3, maxRounds=1)
    with pytest.raises(DowntimeNotMet, match=r"^migration m1, device d0: the final"):
        proceed(policy, 0, measured(MiB, 1.0), "migration m1, device d0")
    assert timed(RoundResult(1, 1), 2.5, 7) == RoundResult(1, 1, 2.5, 7)
    assert timed(RoundResult(1, 1, 1.0), 2.5, 7) == RoundResult(1, 1, 1.0)


@pytest.mark.parametrize(
    "settings",
    [
        {"maxDowntime": 0},
        {"maxDowntime": 0.3, "maxRounds": 0},
        {"maxDowntime": 0.3, "fallback": "retry"},
        {"maxDowntime": 0.3, "window": 0},
    ],
)
def test_downtimeBadSettings(settings: dict) -> None:
    """Impossible settings are refused."""
    with pytest.raises(ValueError):
        DowntimePolicy(**settings)


@pytest.mark.parametrize(
    "text, seconds",
    [("300ms", 0.3), ("2s", 2.0), ("0.5s", 0.5), ("1500 ms", 1.5), (".25S", 0.25)],
)
def test_parseDuration(text: str, seconds: float) -> None:
    """Durations take the unit ms or s."""
    assert parseDuration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text, message",
    [
        ("300", "is not a number with the unit ms or s"),
        ("5m", "is not a number with the unit ms or s"),
        ("-1s", "is not a number with the unit ms or s"),
        ("0ms", "must be more than zero"),
    ],
)
def test_badDurationIsRefused(text: str, message: str) -> None:
    """A duration without a known unit, or zero, is refused, quoting it."""
    with pytest.raises(ValueError, match=message):
        parseDuration(text)
