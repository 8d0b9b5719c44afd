"""Small full-batch fits solved exactly (``HessianFree._exact_solve``; experiments/README.md,
"fullbatch16"): with ``cg_rtol='auto'`` on a deterministic objective with no more parameters
than CG's cap, CG runs to :math:`\\eta = \\sqrt{\\epsilon}` instead of the forcing term.

Oracles: NIST StRD Rat42 (y = b1 / (1 + exp(b2 - b3 x)), nine points, start 1 = (100, 1,
0.1), certified residual sum of squares 8.0565229338E+00); the dense float64 Hessian of a
least-squares loss from ``torch.autograd.functional.hessian`` and ``numpy.linalg.solve``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hessfree import HessianFree

_RAT42_X = torch.tensor([9, 14, 21, 28, 42, 57, 63, 70, 79], dtype=torch.float64)
_RAT42_Y = torch.tensor(
    [8.93, 10.8, 18.59, 22.33, 39.35, 56.11, 61.73, 64.62, 67.08], dtype=torch.float64
)
_RAT42_RSS = 8.0565229338  # NIST's certified value


def test_rat42_reaches_the_certified_optimum_where_the_forcing_term_crawled_along_its_valley():
    # main: from step 14 the exact Hessian's steps had rho = 1 at rate 1 with 1-2 CG iterations
    # on eta ~ 0.05 and the loss fell ~10 % a step: RSS 42.19 after 22 steps, the optimum only
    # at step ~35. Solves to working precision (3 parameters) reach it at step 20.
    b = torch.nn.Parameter(torch.tensor([100.0, 1.0, 0.1], dtype=torch.float64))
    opt = HessianFree([b])

    def closure():
        out = b[0] / (1 + torch.exp(b[1] - b[2] * _RAT42_X))
        return F.mse_loss(out, _RAT42_Y), out

    for _ in range(22):
        opt.step(closure)
    with torch.no_grad():
        rss = float(((b[0] / (1 + torch.exp(b[1] - b[2] * _RAT42_X)) - _RAT42_Y) ** 2).sum())
    # NIST certifies 11 significant digits; the optimum is reached to ~1e-12 relative here
    assert abs(rss - _RAT42_RSS) <= 1e-9 * _RAT42_RSS


def test_small_deterministic_step_is_the_dense_damped_newton_step():
    # an ill-conditioned (cond 1e6) 5-parameter linear least-squares problem, Gauss-Newton =
    # the Hessian: from step 1 on (the objective is seen deterministic) the step is rate *
    # -(H + lam I)^-1 g with lam the step's damping. main: CG stopped on the forcing term's
    # eta (0.5 at step 1): entries of the step up to 39 % off the dense solve.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((30, 5)))
    v, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    A = torch.tensor(q @ np.diag(np.logspace(0, 3, 5)) @ v.T)
    y = torch.tensor(rng.standard_normal(30))
    x = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = HessianFree([x])

    def loss_of(w):
        return 0.5 * ((A @ w - y) ** 2).sum()

    def closure():
        out = A @ x
        return 0.5 * ((out - y) ** 2).sum(), out

    opt.step(closure)
    for _ in range(3):
        x0 = x.detach().clone()
        H = torch.autograd.functional.hessian(loss_of, x0).numpy()
        g = torch.autograd.functional.jacobian(loss_of, x0).numpy()
        opt.step(closure)
        s = opt.last_step
        assert s.accepted
        B = H + s.damping * np.eye(5)
        p = s.step_rate * -np.linalg.solve(B, g)
        taken = (x.detach() - x0).numpy()
        # CG stops at ||r|| <= eta ||g||, eta = sqrt(eps): the step's relative error is at most
        # cond(B) eta (2x for the rounding of the dense solve and of the update)
        bound = 2 * np.linalg.cond(B) * np.sqrt(np.finfo(np.float64).eps)
        assert np.linalg.norm(taken - p) <= bound * np.linalg.norm(p)
