"""Levenberg-Marquardt rule of Martens (2010, §4.1)."""

from __future__ import annotations

import math

import pytest

from hessfree import reduction_ratio, update_damping


@pytest.mark.parametrize(
    "rho, expected",
    [
        (0.1, 1.5),
        (0.25, 1.0),
        (0.5, 1.0),
        (0.75, 1.0),
        (0.9, 2 / 3),
        (-math.inf, 1.5),
        (math.nan, 1.5),
    ],
)
def test_update_damping_thresholds(rho, expected):
    assert update_damping(1.0, rho) == pytest.approx(expected)


def test_update_damping_bounds_and_factors():
    assert update_damping(1.0, 0.0, increase=3.0, max_damping=2.0) == 2.0
    assert update_damping(1.0, 1.0, decrease=0.1, min_damping=0.5) == 0.5


def test_reduction_ratio_cases():
    assert reduction_ratio(-0.5, -1.0) == 0.5
    assert reduction_ratio(0.1, -1.0) == -math.inf  # objective went up
    assert reduction_ratio(math.inf, -1.0) == -math.inf  # trial loss not finite
    assert reduction_ratio(math.nan, -1.0) == -math.inf
    assert math.isnan(reduction_ratio(-0.5, 0.0))  # the model predicted no decrease
