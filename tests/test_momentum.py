"""HessianFree(momentum='quadratic'): the plane step against numpy's dense 2x2 solve."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hessfree import HessianFree, HFSettings
from hessfree._momentum import plane_step


def _spd(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = Q @ Q.T + 0.1 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    return A, b


def _dense_plane(B, g, p, d0):
    """numpy's minimiser of g^T x + x^T B x / 2 over x = a p + b d0, and the model there."""
    V = np.stack([p, d0], axis=1)
    ab = np.linalg.solve(V.T @ B @ V, -(V.T @ g))
    x = V @ ab
    return ab, g @ x + 0.5 * x @ B @ x


@pytest.mark.parametrize("seed", range(4))
def test_plane_step_is_the_dense_two_by_two_solve(seed):
    A, g = _spd(7, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    p, d0 = (torch.randn(7, generator=gen, dtype=torch.float64) for _ in range(2))
    s = plane_step(g, p, float(g @ p + 0.5 * p @ A @ p), d0, A @ d0)
    (alpha, beta), model = _dense_plane(A.numpy(), g.numpy(), p.numpy(), d0.numpy())
    assert s.alpha == pytest.approx(alpha, rel=1e-9)
    assert s.beta == pytest.approx(beta, rel=1e-9)
    assert s.model == pytest.approx(model, rel=1e-9)
    # without a previous update: the exact line minimum along p
    s = plane_step(g, p, float(g @ p + 0.5 * p @ A @ p), None, None)
    assert (s.alpha, s.beta) == (pytest.approx(-float(g @ p) / float(p @ A @ p), rel=1e-12), 0.0)


def test_plane_step_degenerate_cases():
    A, g = _spd(5, 0)
    p = -g
    phi = float(g @ p + 0.5 * p @ A @ p)
    # δ0 parallel to p: β = 0, α the line minimum
    s = plane_step(g, p, phi, 2.0 * p, A @ (2.0 * p))
    assert s.beta == 0.0 and s.alpha == pytest.approx(float(g @ g) / float(g @ A @ g), rel=1e-9)
    # no positive curvature along p, or a non-finite value: no plane step
    assert plane_step(g, p, float(g @ p) - 1.0, g, A @ g) is None
    assert plane_step(g, p, phi, g, torch.full_like(g, math.nan)) is None


def _quadratic_run(
    momentum: str, steps: int, *, poison_at: int | None = None, poison_start: bool = False
):
    """HF on f = x^T A x / 2 - b^T x with one cold CG iteration per step (p = the exact
    steepest-descent minimiser of the damped model), fixed λ; θ after every step, infos."""
    A, b = _spd(6, 3)
    lam = 0.5
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = HessianFree(
        [x],
        damping=lam,
        adapt_damping=False,
        cg_max_iter=1,
        cg_decay=0.0,
        cg_rtol=0.0,
        cg_stop_on_increase=False,
        trust_radius=False,
        extrapolate=False,
        precond=None,
        momentum=momentum,
    )
    thetas, infos = [x.detach().clone()], []
    for k in range(steps):
        x0 = x.detach().clone()

        def closure(k=k, x0=x0):
            f = 0.5 * x @ A @ x - b @ x
            if k == poison_at and (poison_start or not torch.equal(x.detach(), x0)):
                return f * math.nan  # every trial point (or the start too): NaN
            return f

        opt.step(closure)
        thetas.append(x.detach().clone())
        infos.append(opt.last_step)
    return A, b, lam, thetas, infos, opt


def test_momentum_step_is_the_dense_plane_minimiser_on_a_quadratic():
    A, b, lam, thetas, infos, _ = _quadratic_run("quadratic", 4)
    B = (A + lam * torch.eye(6, dtype=torch.float64)).numpy()
    An, bn = A.numpy(), b.numpy()
    d0 = None
    for k, info in enumerate(infos):
        th0, th1 = thetas[k].numpy(), thetas[k + 1].numpy()
        g = An @ th0 - bn
        p = -(g @ g) / (g @ B @ g) * g  # one CG iteration from zero
        assert info.accepted and info.step_rate == 1.0
        if d0 is None:  # first step: α along p alone, 1 for an exact line minimiser
            (alpha, beta), step = (1.0, 0.0), p
        else:
            (alpha, beta), _ = _dense_plane(B, g, p, d0)
            step = alpha * p + beta * d0
        assert info.momentum_alpha == pytest.approx(alpha, rel=1e-8)
        assert info.momentum_beta == pytest.approx(beta, rel=1e-8, abs=1e-12)
        np.testing.assert_allclose(th1 - th0, step, rtol=1e-8, atol=1e-12)
        # ρ of an exact quadratic: the undamped model's prediction is the change itself
        assert info.rho == pytest.approx(1.0, abs=1e-8)
        d0 = th1 - th0
    assert any(abs(i.momentum_beta) > 1e-3 for i in infos[1:])  # the plane was really used
    # it beats the plain steps on the same problem
    *_, plain, _, _ = _quadratic_run("off", 4)
    f = lambda t: float(0.5 * t @ A @ t - b @ t)  # noqa: E731
    assert f(thetas[-1]) < f(plain[-1])
    assert all(math.isnan(i.momentum_alpha) for i in _quadratic_run("off", 2)[4])


@pytest.mark.parametrize("at_start", [False, True])
def test_a_rejected_momentum_step_leaves_the_parameters_and_forgets_the_update(at_start):
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _, _, _, thetas, infos, opt = _quadratic_run(
            "quadratic", 4, poison_at=2, poison_start=at_start
        )
    if at_start:  # the loss at θ0: the step ends before CG
        assert infos[2].status == "non_finite_loss" and math.isnan(infos[2].momentum_beta)
    else:
        assert infos[2].status == "non_finite_trial_loss" and not infos[2].accepted
        assert infos[2].momentum_beta != 0.0  # the plane step was the one that failed
    assert torch.equal(thetas[3], thetas[2])
    # the next step has no previous update: CG's step alone (β = 0)
    assert infos[3].accepted and infos[3].momentum_beta == 0.0
    assert torch.isfinite(thetas[-1]).all()


def test_a_non_finite_product_along_the_previous_update_drops_the_plane():
    A, b = _spd(4, 1)
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    calls = []

    def curvature(loss, outputs, params):
        calls.append(0)
        count = [0]

        def mv(v):
            count[0] += 1
            # one CG product per step (cg_max_iter=1, cold); the second is along δ0
            return A @ v if count[0] == 1 else torch.full_like(v, math.nan)

        return mv

    opt = HessianFree(
        [x], curvature=curvature, damping=0.5, cg_max_iter=1, cg_decay=0.0, cg_rtol=0.0,
        momentum="quadratic", precond=None,
    )  # fmt: skip
    for _ in range(3):
        before = x.detach().clone()
        opt.step(lambda: 0.5 * x @ A @ x - b @ x)
        assert opt.last_step.accepted and opt.last_step.momentum_beta == 0.0
        assert not torch.equal(x.detach(), before) and torch.isfinite(x).all()
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"momentum": "heavy"}, ValueError, r"Unknown `momentum` 'heavy'; expected one of 'off', "),
        ({"momentum": 0.9}, TypeError, r"`momentum` must be one of 'off', 'quadratic', got float"),
        ({"momentum": True}, TypeError, r"got bool True"),
        ({"momentum": None}, TypeError, r"got NoneType None"),
        (
            {"momentum": "quadratic", "structural_damping": 0.03},
            ValueError,
            r"`momentum` 'quadratic' does not support `structural_damping` > 0 \(got 0.03\)",
        ),
    ],
)
def test_bad_momentum_values_are_refused_with_the_value_and_what_is_allowed(kwargs, error, match):
    with pytest.raises(error, match=match):
        HessianFree([torch.zeros(2, requires_grad=True)], **kwargs)
    assert HFSettings.problems(kwargs)  # the YAML config schema reports it too


def test_momentum_is_off_by_default_and_kept_in_the_state_dict():
    x = torch.zeros(2, requires_grad=True)
    assert HessianFree([x]).momentum == "off"
    opt = HessianFree([x], momentum="quadratic")
    assert opt.state_dict()["param_groups"][0]["momentum"] == "quadratic"
