"""CG backtracking and the Armijo search as pure functions (hessfree/_line_search.py)."""

from __future__ import annotations

import math

import pytest

from hessfree._line_search import armijo, backtrack


def test_backtrack_stops_at_the_first_increase_and_counts_its_evaluations():
    values = [5.0, 1.0, 2.0, 3.0, 4.0]  # decreasing from the end down to index 1
    seen: list[int] = []

    def f(i: int) -> float:
        seen.append(i)
        return values[i]

    assert backtrack(range(5), f) == (1, 1.0)
    assert seen == [4, 3, 2, 1, 0]  # the increase at index 0 ends the walk
    seen.clear()
    assert backtrack(range(5), f, enabled=False) == (4, 4.0) and seen == [4]


def test_backtrack_treats_nan_as_an_increase_and_keeps_a_single_iterate():
    assert backtrack([0, 1, 2], [0.0, math.nan, 1.0].__getitem__) == (2, 1.0)
    assert backtrack([7], {7: 3.0}.__getitem__) == (0, 3.0)


@pytest.mark.parametrize("shrink", [0.5, 0.8])
def test_armijo_returns_the_largest_rate_on_the_grid_with_sufficient_decrease(shrink):
    # f(t) = (t - a)^2 from f0 = a^2 with slope s = -2a: closed form of the Armijo test
    a, c = 0.3, 1e-2
    f0, slope = a * a, -2 * a
    rate, f = armijo(
        lambda t: (t - a) ** 2, f0, slope, (1 - a) ** 2, c=c, shrink=shrink, max_iter=60
    )
    k = 0
    while not (shrink**k - a) ** 2 <= f0 + c * shrink**k * slope:
        k += 1
    assert rate == shrink**k and f == (rate - a) ** 2


def test_armijo_gives_up_after_max_iter_rates_and_reports_zero():
    calls: list[float] = []

    def f(t: float) -> float:
        calls.append(t)
        return 1.0

    rate, value = armijo(f, 0.0, -1.0, 1.0, c=0.1, shrink=0.5, max_iter=4)
    assert (rate, value) == (0.0, 1.0)
    assert calls == [0.5, 0.25, 0.125]  # t = 1 was given (f1); 4 rates in all
    assert armijo(f, 0.0, -1.0, math.inf, c=0.1, shrink=0.5, max_iter=1) == (0.0, math.inf)


def test_armijo_tries_no_rate_whose_decrease_is_below_the_resolution():
    # f = f0 everywhere (a loss at its float floor), slope -1: rates 0.5^k with 0.5^k > 1e-3
    # are tried (k = 1..9), 0.5^10 < 1e-3 is not; without a resolution all 59 are
    calls: list[float] = []

    def f(t: float) -> float:
        calls.append(t)
        return 0.0

    assert armijo(f, 0.0, -1.0, 0.0, c=0.1, shrink=0.5, max_iter=60, resolution=1e-3) == (
        0.0,
        0.0,
    )
    assert calls == [0.5**k for k in range(1, 10)]
    calls.clear()
    assert armijo(f, 0.0, -1.0, 0.0, c=0.1, shrink=0.5, max_iter=60) == (0.0, 0.0)
    assert len(calls) == 59
    # a rate that passes above the resolution is returned as before
    a = 0.3
    got = armijo(
        lambda t: (t - a) ** 2,
        a * a,
        -2 * a,
        0.49,
        c=1e-2,
        shrink=0.5,
        max_iter=60,
        resolution=1e-3,
    )
    assert got == armijo(
        lambda t: (t - a) ** 2, a * a, -2 * a, 0.49, c=1e-2, shrink=0.5, max_iter=60
    )
