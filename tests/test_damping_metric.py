"""``damping_metric='marquardt'``: scale-invariant damping :math:`\\lambda D` (Moré 1978).

Oracles: dense float64 Jacobians from ``torch.autograd.functional.jacobian`` (then
:math:`G = J^\\top H_\\ell J` with the closed-form MSE :math:`H_\\ell = (2/M) I`),
``numpy.linalg.solve`` for the damped system, and the same fit in rescaled coordinates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hessfree import GGNProduct, HessianFree, HFSettings
from hessfree.damping import marquardt_metric

EXACT = dict(rtol=1e-10, atol=1e-12)
#: A CG solve to rtol 0 on a 5 × 5 system with condition ~1e8: rounding of that order.
SOLVE = dict(rtol=1e-7, atol=0.0)


class _Exps:
    """y = a1 exp(-k1 t) + a2 exp(-k2 t) + c with a ~ 1e2-1e3, k ~ 1e-2-1 (float64), the
    badly scaled curve fit of ``experiments/README.md`` ("unseen3", "jacscale"), 40 points.
    ``scale`` multiplies the amplitudes' coordinates: the parameter is ``a / scale``."""

    def __init__(self, scale: float = 1.0, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.t = torch.linspace(0, 60, 40, dtype=torch.float64)
        y = 1200 * torch.exp(-0.013 * self.t) + 300 * torch.exp(-0.9 * self.t) + 20
        self.y = y + 0.5 * torch.randn(40, generator=gen, dtype=torch.float64)
        self.scale = scale
        self.u = torch.tensor([500.0, 500.0], dtype=torch.float64).div(scale).requires_grad_()
        self.k = torch.tensor([0.05, 0.5], dtype=torch.float64, requires_grad=True)
        self.c = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
        self.params = [self.u, self.k, self.c]

    def model(self, u: torch.Tensor, k: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (u * self.scale * torch.exp(-k * self.t[:, None])).sum(1) + c

    def closure(self):
        out = self.model(*self.params)
        return F.mse_loss(out, self.y), out

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, g) at the current parameters, from the dense Jacobian."""
        point = tuple(p.detach() for p in self.params)
        J = torch.cat(torch.autograd.functional.jacobian(self.model, point), 1)
        r = self.model(*point) - self.y
        m = len(self.t)
        return 2.0 / m * J.T @ J, 2.0 / m * J.T @ r


def test_ggn_diagonal_matches_dense_jacobian():
    fit = _Exps()
    loss, out = fit.closure()
    G, _ = fit.dense()
    product = GGNProduct(loss, out, fit.params)
    torch.testing.assert_close(product.diagonal(), torch.diag(G), **EXACT)
    # chunked: 8 entries per chunk is one output row at a time (n = 5)
    torch.testing.assert_close(product.diagonal(max_entries=8), torch.diag(G), **EXACT)
    # residual blocks (r1, r2) with loss mean(r1²) + ½‖r2‖², r2 = 3k: diag(G) + 9 on k
    r1, r2 = out - fit.y, 3 * fit.k
    blocks = GGNProduct((r1**2).mean() + 0.5 * (r2**2).sum(), (r1, r2), fit.params)
    expected = torch.diag(G) + torch.tensor([0, 0, 9, 9, 0], dtype=torch.float64)
    torch.testing.assert_close(blocks.diagonal(), expected, **EXACT)


def test_ggn_diagonal_probes_rescale_exactly():
    # probes live in the outputs' space: each one's estimate transforms as G, u -> a/s gives
    # s² on the amplitudes' entries, probe for probe (same seed)
    def estimate(scale):
        fit = _Exps(scale)
        loss, out = fit.closure()
        gen = torch.Generator().manual_seed(3)
        return GGNProduct(loss, out, fit.params).diagonal(num_probes=3, generator=gen)

    plain, scaled = estimate(1.0), estimate(1e3)
    factor = torch.tensor([1e6, 1e6, 1, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(scaled, plain * factor, rtol=1e-12, atol=0.0)
    fit = _Exps()
    with pytest.raises(ValueError, match="num_probes"):
        GGNProduct(*fit.closure(), fit.params).diagonal(num_probes=0)


def test_marquardt_metric_running_max_and_floor():
    D, top = marquardt_metric(torch.tensor([4.0, 0.0, -1.0], dtype=torch.float64))
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(D, torch.tensor([4.0, 4 * eps, 4 * eps], dtype=torch.float64))
    D, top = marquardt_metric(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), top)
    torch.testing.assert_close(top, torch.tensor([4.0, 2.0, 3.0], dtype=torch.float64))
    D, _ = marquardt_metric(torch.zeros(3))  # nothing measured yet: D = I
    torch.testing.assert_close(D, torch.ones(3))


@pytest.mark.parametrize("metric", ["marquardt", "identity"])
def test_cg_solves_the_damped_system_of_the_metric(metric):
    # one step, λ fixed, CG to rtol 0: its final iterate (the warm start kept in the state)
    # solves (G + λD) p = -g with D = diag(G) (first step), or D = I
    fit = _Exps()
    G, g = fit.dense()
    lam = 0.5 if metric == "marquardt" else 1e4
    opt = HessianFree(
        fit.params, damping=lam, adapt_damping=False, cg_rtol=0.0, cg_stop_on_increase=False,
        damping_metric=metric, cg_progress_tol=1e-12,
    )  # fmt: skip
    opt.step(fit.closure)
    D = torch.diag(torch.diag(G)) if metric == "marquardt" else torch.eye(5, dtype=torch.float64)
    expected = np.linalg.solve((G + lam * D).numpy(), -g.numpy())
    x = opt.state[fit.u]["warm_start"]
    torch.testing.assert_close(x, torch.from_numpy(expected), **SOLVE)
    other = (
        torch.eye(5, dtype=torch.float64) if metric == "marquardt" else torch.diag(torch.diag(G))
    )
    wrong = np.linalg.solve((G + lam * other).numpy(), -g.numpy())
    assert not np.allclose(x.numpy(), wrong, rtol=1e-3)  # the metric decides the step


def test_marquardt_diagonal_is_the_running_max_over_steps():
    fit = _Exps()
    opt = HessianFree(fit.params, damping_metric="marquardt")
    seen = []
    for _ in range(4):
        seen.append(torch.diag(fit.dense()[0]))  # diag(G) at the step's starting point
        opt.step(fit.closure)
    expected = torch.stack(seen).max(0).values
    assert not torch.equal(expected, seen[-1])  # D is not just the last diagonal here
    torch.testing.assert_close(opt.state[fit.u]["damping_diagonal"], expected, **EXACT)


def _predicted(scale: float, metric: str, steps: int = 8) -> tuple[list[float], torch.Tensor]:
    fit = _Exps(scale)
    infos = []
    opt = HessianFree(fit.params, damping_metric=metric, callback=infos.append)
    for _ in range(steps):
        opt.step(fit.closure)
    a = fit.u.detach() * scale
    # a first step withdrawn for the exact Hessian (a large-residual start: "first0") has no
    # predicted change
    predicted = [i.predicted_change for i in infos if i.status != "gauss_newton_withdrawn"]
    return predicted, torch.cat([a, fit.k.detach(), fit.c.detach()])


def test_marquardt_steps_are_invariant_to_a_parameters_scale():
    # the amplitudes' coordinates × 1e-3: the same fit, the same steps in the original units
    base, theta = _predicted(1.0, "marquardt")
    scaled, theta_scaled = _predicted(1e3, "marquardt")
    assert len(base) == 8 and all(q < 0 for q in base)
    np.testing.assert_allclose(scaled, base, rtol=1e-6)
    torch.testing.assert_close(theta_scaled, theta, rtol=1e-6, atol=1e-9)
    # λI is not: the same comparison under the default metric differs at the first step
    plain, _ = _predicted(1.0, "identity", steps=2)
    plain_scaled, _ = _predicted(1e3, "identity", steps=2)
    assert abs(plain_scaled[0] - plain[0]) > 1e-3 * abs(plain[0])


def test_marquardt_fits_the_badly_scaled_curve_that_identity_does_not():
    losses = {}
    for metric in ("identity", "marquardt"):
        fit = _Exps()
        opt = HessianFree(fit.params, damping_metric=metric)
        for _ in range(60):
            opt.step(fit.closure)
        losses[metric] = float(fit.closure()[0].detach())
    # noise variance 0.25: the least-squares fit ends below it (0.188 from step 60), λI far
    # above (the amplitudes stuck)
    assert losses["marquardt"] < 0.5 < 100 < losses["identity"]


def test_marquardt_preconditioner_gets_lambda_d():
    # a diagonal preconditioner sees damping + shift = λD + κ exactly (Martens' diagonal adds
    # both to diag(F))
    fit = _Exps()
    seen = {}

    def precond(ctx):
        seen["diag"] = ctx.damping + ctx.shift
        return None

    lam, kappa = 0.3, 1e-3
    opt = HessianFree(
        fit.params, damping=lam, adapt_damping=False, weight_decay=kappa,
        damping_metric="marquardt", precond=precond,
    )  # fmt: skip
    G, _ = fit.dense()
    opt.step(fit.closure)
    # λ·mean(D) ≈ 6e5 cancels in damping + shift: rounding of eps × that, absolute
    torch.testing.assert_close(seen["diag"], lam * torch.diag(G) + kappa, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(damping_metric="diag"), r"Unknown `damping_metric` 'diag'; expected one of"),
        (dict(damping_metric=None), r"Unknown `damping_metric` None"),
        (dict(damping_metric="marquardt", curvature="hessian"), r"curvature='hessian'"),
        (dict(damping_metric="marquardt", curvature="fisher"), r"needs Gauss-Newton"),
        (dict(damping_metric="marquardt", structural_damping=0.1), r"structural_damping"),
        (dict(damping_metric="marquardt", trust_radius=True), r"trust_radius=True"),
    ],
)
def test_damping_metric_refuses_bad_values(kwargs, match):
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        HessianFree([x], **kwargs)
    assert HFSettings.problems(kwargs)  # the YAML schema sees the same problem


def test_marquardt_refuses_a_loss_only_closure_before_moving():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    opt = HessianFree([x], damping_metric="marquardt")
    with pytest.raises(ValueError, match=r"damping_metric='marquardt' needs Gauss-Newton"):
        opt.step(lambda: (x**4).sum())
    torch.testing.assert_close(x.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_marquardt_state_dict_round_trip():
    fit = _Exps()
    opt = HessianFree(fit.params, damping_metric="marquardt")
    opt.step(fit.closure)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["damping_metric"] == "marquardt"
    twin = _Exps()
    with torch.no_grad():
        for p, q in zip(twin.params, fit.params, strict=True):
            p.copy_(q)
    other = HessianFree(twin.params)
    other.load_state_dict(saved)
    assert other.damping_metric == "marquardt"
    opt.step(fit.closure)
    other.step(twin.closure)
    for p, q in zip(twin.params, fit.params, strict=True):
        torch.testing.assert_close(p, q, **EXACT)
