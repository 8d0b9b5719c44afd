"""unseen18: what a user of ``HessianFree`` meets next (experiments/README.md, "unseen18").

The reported ρ of an accepted step whose full length raised the objective; BatchNorm's
running statistics and other buffers written in the forward after a step that raised and
in trial calls; gradients left in ``.grad`` before an LBFGS-style step.
"""

from __future__ import annotations

import math

import pytest
import torch

from hessfree import HessianFree


def _gauss_newton_overshoot() -> tuple[torch.nn.Parameter, object]:
    """f(w) = ½(w² − y)² with y = −4 from w = 1: the residual never vanishes, so the
    Gauss-Newton curvature (2w)² underestimates f'' = 6w² + 8 and the full step overshoots
    (w → −1.5, f 12.5 → 19.5); the line search accepts a smaller rate."""
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    y = torch.tensor([-4.0], dtype=torch.float64)

    def closure():
        out = w * w
        return 0.5 * ((out - y) ** 2).sum(), out

    return w, closure


def test_rho_of_an_accepted_shorter_step_is_the_closed_form_ratio_at_its_rate():
    # Fails on main: ρ was reported -inf (the full step's), though the step was accepted.
    w, closure = _gauss_newton_overshoot()
    opt = HessianFree([w], damping=1e-6, adapt_damping=False, precond=None)
    opt.step(closure)
    info = opt.last_step
    assert info.accepted and 0.0 < info.step_rate < 1.0
    # oracle: 1-D, CG solves (C + λ)p = −g exactly; everything else in closed form
    w0, y, lam, t = 1.0, -4.0, info.damping, info.step_rate
    g, C = (w0**2 - y) * 2 * w0, (2 * w0) ** 2
    p = -g / (C + lam)

    def f(x: float) -> float:
        return 0.5 * (x * x - y) ** 2

    assert float(w.detach()) == pytest.approx(w0 + t * p, rel=1e-12)
    assert info.rho_full == -math.inf  # f(w0 + p) > f(w0): λ's update reads this one
    expected = (f(w0 + t * p) - f(w0)) / (t * g * p + 0.5 * t * t * C * p * p)
    assert info.rho == pytest.approx(expected, rel=1e-10)
    assert 0.0 < info.rho < 1.0  # 0.275 here


def test_rho_of_a_full_step_is_unchanged_and_equals_rho_full():
    # Guard: at rate 1 `rho` is as before (the full step's; 1 up to rounding on a quadratic
    # whose curvature is exact) and the same number as `rho_full` (absent on main).
    torch.manual_seed(0)
    X, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)

    def closure():
        out = X @ w
        return 0.5 * ((out - y) ** 2).mean(), out

    opt = HessianFree([w], damping=1e-3, adapt_damping=False, extrapolate=False)
    opt.step(closure)
    info = opt.last_step
    assert info.step_rate == 1.0 and info.rho == pytest.approx(1.0, abs=1e-12)
    assert getattr(info, "rho_full", info.rho) == info.rho
