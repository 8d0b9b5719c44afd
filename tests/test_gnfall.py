"""The Gauss-Newton fallback's first-step test (``HessianFree._gn_first_test``, off by
default; experiments/README.md, "gnfall"): under ``curvature='auto'`` with a ``(loss,
outputs)`` closure, the exact Hessian takes over from step 1 exactly when
:math:`x^\\top H x \\le 0 < x^\\top G x` along the first step's CG solution :math:`x`.

Oracles: float64 products from ``torch.autograd.functional`` through ``functional_call``:
``hvp`` for :math:`x^\\top H x`, ``jvp`` for :math:`x^\\top G x = (2/N)\\|Jx\\|^2` (MSE), along
the CG solution the optimizer kept, at the parameters where it was made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hessfree import HessianFree


class _FirstTest(HessianFree):
    _gn_first_test = True


def _fit(scales: tuple[float, ...], seed: int = 0):
    """``experiments/_unseen7.py``'s scaled regression: a 6-32-32-3 tanh MLP on 600 points whose
    3 targets have the given scales (1 / 30 / 1000 there), 1 % noise."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(600, 6, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(6, 16, generator=g, dtype=torch.float64))
    y = y @ torch.randn(16, 3, generator=g, dtype=torch.float64) / 4
    s = torch.tensor(scales, dtype=torch.float64)
    y = y * s + 0.01 * s * torch.randn(y.shape, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 3)).double()  # fmt: skip
    return model, x, y


def _curvatures_along(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor):
    """:math:`v^\\top H v` (``torch.autograd.functional.hvp``) and :math:`v^\\top G v =
    (2/N)\\|Jv\\|^2` (``torch.autograd.functional.jvp``), float64, at the model's parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t):
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n], i = t[i : i + s.numel()].view(s), i + s.numel()
        return out

    def outputs(t):
        return functional_call(model, unflat(t), (x,)).reshape(-1)

    _, Hv = torch.autograd.functional.hvp(lambda t: F.mse_loss(outputs(t), y.reshape(-1)), theta, v)
    _, Jv = torch.autograd.functional.jvp(outputs, theta, v)
    return float(v @ Hv), float(Jv @ Jv) * 2.0 / Jv.numel()


def _first_step(scales: tuple[float, ...]):
    model, x, y = _fit(scales)
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt = _FirstTest(model.parameters())

    def closure():
        out = model(x)
        return F.mse_loss(out, y), out

    opt.step(closure)
    state = opt._global_state()
    x0 = state["warm_start"]
    moved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # the oracle at θ0, where the test was made
        for p, t in zip(model.parameters(), theta0, strict=True):
            p.copy_(t)
    xHx, xGx = _curvatures_along(model, x, y, x0)
    with torch.no_grad():
        for p, t in zip(model.parameters(), moved, strict=True):
            p.copy_(t)
    return opt, closure, state, xHx, xGx


def test_gn_first_test_switches_where_the_hessian_is_not_positive_along_the_step():
    opt, closure, state, xHx, xGx = _first_step((1.0, 30.0, 1000.0))
    assert xHx <= 0.0 < xGx  # the oracle: H has no positive curvature along the GN step
    assert state.get("gn_first_step") is True
    opt.step(closure)  # deterministic objective seen: the Hessian, with its trust radius
    assert state.get("gn_failed") is True
    assert "trust_radius" in state
    assert all(torch.isfinite(p).all() for p in opt._params())


def test_gn_first_test_keeps_gauss_newton_where_the_hessian_agrees():
    opt, closure, state, xHx, xGx = _first_step((1.0, 1.0, 1.0))
    assert xHx > 0.0 and xGx > 0.0
    assert "gn_failed" not in state and "gn_first_step" not in state
    opt.step(closure)
    assert "gn_failed" not in state and "trust_radius" not in state
