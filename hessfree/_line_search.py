r"""The two searches of one Hessian-free step, as pure functions of an objective.

Notation: :math:`x_0, \dots, x_m` the CG iterates stored for backtracking (Martens 2010, §4.6),
:math:`f(x)` the objective at :math:`\theta_0 + x` (one trial evaluation), :math:`f_0 =
f(\theta_0)`, :math:`p` the backtracked step, :math:`s = g^\top p` its slope and :math:`t` the
rate of the Armijo search (Nocedal & Wright 2006, §3.1; the constants of Martens' reference
code are :class:`~hessfree.HessianFree`'s defaults). Neither function knows about models or
parameters, as ``torch.optim.lbfgs`` keeps ``_strong_wolfe`` out of ``step``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["armijo", "backtrack", "extrapolate"]

X = TypeVar("X")


def backtrack(
    iterates: Sequence[X], objective: Callable[[X], float], *, enabled: bool = True
) -> tuple[int, float]:
    r"""CG backtracking (§4.6): from the last iterate, walk back while the objective decreases.

    Evaluates :math:`f(x_m)`, then :math:`f(x_{m-1}), f(x_{m-2}), \dots` and stops at the first
    that is not lower than the best so far. ``enabled=False`` keeps :math:`x_m` (one evaluation).

    Returns:
        tuple[int, float]: The chosen iterate's index and its objective.

    Example:
        >>> f = {0: 3.0, 1: 1.0, 2: 2.0, 3: 2.5}.__getitem__
        >>> backtrack([0, 1, 2, 3], f)  # 2.5 -> 2.0 -> 1.0, then 3.0 is worse
        (1, 1.0)
        >>> backtrack([0, 1, 2, 3], f, enabled=False)
        (3, 2.5)
    """
    chosen = len(iterates) - 1
    f_chosen = objective(iterates[chosen])
    if enabled:
        for j in range(chosen - 1, -1, -1):
            f_j = objective(iterates[j])
            if not f_j < f_chosen:  # stop at the first increase (NaN counts as one)
                break
            chosen, f_chosen = j, f_j
    return chosen, f_chosen


def armijo(
    objective: Callable[[float], float],
    f0: float,
    slope: float,
    f1: float,
    *,
    c: float,
    shrink: float,
    max_iter: int,
    resolution: float = 0.0,
) -> tuple[float, float]:
    r"""Backtracking Armijo search: the first rate :math:`t = \text{shrink}^k` decreasing enough.

    Accepts :math:`t` when :math:`f(t) \le f_0 + c\,t\,s` (sufficient decrease), trying
    :math:`t = 1, \text{shrink}, \text{shrink}^2, \dots`, at most ``max_iter`` rates in all,
    and none whose first-order decrease :math:`t|s|` is at most ``resolution`` (ours: such a
    rate could only pass by a rounding error of :math:`f`, so it is not evaluated).

    Args:
        objective: :math:`t \mapsto f(\theta_0 + t p)`.
        f0: :math:`f(\theta_0)`.
        slope: :math:`s = g^\top p < 0`.
        f1: :math:`f(\theta_0 + p)`, already evaluated (by backtracking).
        c: Sufficient-decrease constant in (0, 1).
        shrink: Rate factor in (0, 1).
        max_iter: Most rates tried, :math:`t = 1` included.
        resolution: Float resolution of :math:`f` (0: no limit); see above.

    Returns:
        tuple[float, float]: The accepted rate and the objective there, or ``(0.0, f)`` with
        the last objective tried when no rate passed.

    Example:
        >>> armijo(lambda t: (t - 0.5) ** 2, 0.25, -1.0, 0.25, c=0.01, shrink=0.5, max_iter=10)
        (0.5, 0.0)
        >>> armijo(lambda t: 1.0, 0.0, -1.0, 1.0, c=0.01, shrink=0.5, max_iter=3)
        (0.0, 1.0)
        >>> calls = []  # t = 1/2 and 1/4 are tried; 1/8 would decrease by at most 1/8: not tried
        >>> armijo(lambda t: calls.append(t) or 1.0, 0.0, -1.0, 1.0, c=0.01, shrink=0.5,
        ...        max_iter=60, resolution=0.125), calls
        ((0.0, 1.0), [0.5, 0.25])
    """
    rate, f = 1.0, f1
    for _ in range(max_iter - 1):
        if f <= f0 + c * rate * slope or shrink * rate * -slope <= resolution:
            break
        rate *= shrink
        f = objective(rate)
    if not f <= f0 + c * rate * slope:
        return 0.0, f
    return rate, f


def extrapolate(
    objective: Callable[[float], float], f1: float, *, max_doublings: int
) -> tuple[float, float]:
    r"""Step doubling after an accepted full step: :math:`t = 2, 4, \dots` while :math:`f` falls.

    Tries :math:`t = 2^k` for :math:`k = 1, 2, \dots` and stops at the first rate whose
    objective is not strictly below the best so far (NaN counts as not below), or after
    ``max_doublings`` rates.

    Args:
        objective: :math:`t \mapsto f(\theta_0 + t p)`.
        f1: :math:`f(\theta_0 + p)`, the accepted full step's objective.
        max_doublings: Most rates tried (0: none).

    Returns:
        tuple[float, float]: The best rate (1 if no doubling helped) and its objective.

    Example:
        >>> import math
        >>> extrapolate(lambda t: math.exp(-t), math.exp(-1), max_doublings=3)  # still falling
        (8.0, 0.00033546262790251185)
        >>> extrapolate(lambda t: (t - 3) ** 2, 4.0, max_doublings=10)  # 4 -> 1 -> 1: stop
        (2.0, 1.0)
    """
    rate, f = 1.0, f1
    for _ in range(max_doublings):
        f_next = objective(2.0 * rate)
        if not f_next < f:
            break
        rate, f = 2.0 * rate, f_next
    return rate, f
