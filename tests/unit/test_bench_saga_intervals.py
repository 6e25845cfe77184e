"""bench_saga's interval for a median ratio and its verdict on a target (no network)."""

from __future__ import annotations

import pytest

from bench.bench_saga import _verdict, median_interval

pytestmark = pytest.mark.unit


def test_five_rounds_give_their_range_at_94_percent() -> None:
    assert median_interval([1.1, 0.9, 1.3, 1.0, 0.7]) == (0.7, 1.3, 0.938)


def test_ten_rounds_drop_one_round_at_each_end() -> None:
    # P(Binomial(10, 1/2) < 2) = 11/1024 per side; < 3 would be 56/1024 > 5%.
    low, high, coverage = median_interval([float(x) for x in range(10, 0, -1)])
    assert (low, high, coverage) == (2.0, 9.0, 0.979)


def test_too_few_rounds_give_the_range_with_what_it_covers() -> None:
    assert median_interval([2.0, 1.0, 3.0]) == (1.0, 3.0, 0.75)


def test_verdicts() -> None:
    at_most = lambda r: r <= 1.05  # noqa: E731
    assert _verdict(0.95, 1.04, at_most) == "met"
    assert _verdict(1.06, 1.2, at_most) == "not met"
    assert _verdict(0.9, 1.2, at_most) == "undecided"
    # One or a few rounds cover too little to decide anything.
    assert _verdict(1.2, 1.2, at_most, coverage=0.0) == "undecided"
    assert _verdict(0.95, 1.04, at_most, coverage=0.875) == "undecided"
