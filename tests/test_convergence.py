"""Tests for the convergence policies that end pre-copy rounds."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from xenmig.errors import BadSpec
from xenmig.interfaces import IConvergencePolicy
from xenmig.model import RoundResult
from xenmig.source.convergence import ConvergencePolicy, FixedRounds, parseSize

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
