"""HessianFree against closed forms, SciPy's optimizers and its own contracts."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

from hessfree import EmpiricalFisherDiagonal, HessianFree, StepInfo


def _quadratic(n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = Q @ Q.T + n * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    return A, b


def test_one_step_on_convex_quadratic_reaches_minimizer():
    A, b = _quadratic()
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = HessianFree([x], damping=1e-12, min_damping=0.0, cg_rtol=1e-14)
    opt.step(lambda: 0.5 * x @ A @ x - b @ x)
    torch.testing.assert_close(x.detach(), torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert opt.last_step.accepted and opt.last_step.cg_reason == "converged"
    # ρ of an exact quadratic model with negligible damping is 1
    assert opt.last_step.rho == pytest.approx(1.0, abs=1e-6)


def _breast_cancer():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    return X, y


@pytest.mark.parametrize("style", ["lbfgs", "loss_only", "loss_outputs"])
def test_logistic_regression_matches_scipy_minimize(style):
    X, y = _breast_cancer()
    lam = 1e-2

    def f_np(w):
        z = X @ w[:-1] + w[-1]
        return np.mean(np.logaddexp(0, z) - y * z) + 0.5 * lam * w[:-1] @ w[:-1]

    def g_np(w):
        z = X @ w[:-1] + w[-1]
        r = (1 / (1 + np.exp(-z)) - y) / len(y)
        return np.concatenate([X.T @ r + lam * w[:-1], [r.sum()]])

    ref = minimize(f_np, np.zeros(31), jac=g_np, method="BFGS", options=dict(gtol=1e-12))
    Xt, yt = torch.tensor(X), torch.tensor(y, dtype=torch.float64)
    lin = nn.Linear(30, 1).double()
    nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
    opt = HessianFree(
        [{"params": [lin.weight], "weight_decay": lam}, {"params": [lin.bias]}], damping=1e-3
    )

    def closure():  # unchanged torch.optim.LBFGS loop for style "lbfgs"
        opt.zero_grad()
        out = lin(Xt).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(out, yt)
        if style == "lbfgs":
            loss.backward()
            return loss
        return loss if style == "loss_only" else (loss, out)

    for _ in range(25):
        opt.step(closure)
        if opt.last_step.loss_after - ref.fun < 1e-10:
            break
    assert abs(opt.last_step.loss_after - ref.fun) < 1e-6
    w = torch.cat([lin.weight.detach().reshape(-1), lin.bias.detach()]).numpy()
    np.testing.assert_allclose(w, ref.x, atol=1e-4)


def test_rosenbrock_100d_with_exact_hessian_converges():
    x = torch.zeros(100, dtype=torch.float64, requires_grad=True)
    opt = HessianFree([x], damping=1.0, curvature="hessian")

    def rosen():
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    for _ in range(400):
        opt.step(rosen)
        if opt.last_step.loss_after < 1e-22:
            break
    assert float(rosen().detach()) < 1e-20
    torch.testing.assert_close(x.detach(), torch.ones(100, dtype=torch.float64), rtol=0, atol=1e-10)


def _digits(n: int | None = 500):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n])


def test_mlp_on_digits_reaches_full_training_accuracy():
    torch.manual_seed(0)
    X, y = _digits(n=None)  # all 1,797 images
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = HessianFree(model.parameters(), damping=1.0, cg_max_iter=50)

    def closure():
        out = model(X)
        return F.cross_entropy(out, y), out

    for _ in range(40):
        opt.step(closure)
        if (model(X).argmax(1) == y).all():
            break
    assert (model(X).argmax(1) == y).float().mean() == 1.0


def test_curvature_closure_on_a_smaller_batch_and_fisher_and_preconditioner():
    torch.manual_seed(1)
    X, y = _digits(300)
    for curvature, precond in [
        ("ggn", EmpiricalFisherDiagonal(num_probes=2)),
        ("fisher", "martens"),
    ]:
        model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
        opt = HessianFree(
            model.parameters(), curvature=curvature, precond=precond, cg_max_iter=30, damping=0.1
        )
        first = None
        for _ in range(10):

            def closure():
                out = model(X)  # noqa: B023  (used within this iteration)
                return F.cross_entropy(out, y), out

            def curvature_closure():
                out = model(X[:64])  # noqa: B023
                return F.cross_entropy(out, y[:64]), out

            loss = float(opt.step(closure, curvature_closure))
            first = loss if first is None else first
        assert opt.last_step.loss_after < 0.5 * first


def test_state_dict_resume_is_bit_identical():
    torch.manual_seed(2)
    X, y = _digits(200)

    def make():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def run(model, opt, k):
        def closure():
            out = model(X)
            return F.cross_entropy(out, y), out

        for _ in range(k):
            opt.step(closure)

    kw = dict(cg_max_iter=20, precond="martens")
    a = make()
    opt_a = HessianFree(a.parameters(), **kw)
    run(a, opt_a, 6)

    b = make()
    opt_b = HessianFree(b.parameters(), **kw)
    run(b, opt_b, 3)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    c = make()
    c.load_state_dict(saved["model"])
    opt_c = HessianFree(c.parameters(), **kw)
    opt_c.load_state_dict(saved["opt"])
    assert opt_c.damping == opt_b.damping
    run(c, opt_c, 3)
    for pa, pc in zip(a.parameters(), c.parameters(), strict=False):
        assert torch.equal(pa, pc)


def test_non_finite_loss_leaves_parameters_bit_identical_and_raises_after_max_failures():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    before = w.detach().clone()
    opt = HessianFree([w], damping=1.0, max_failures=3)
    for _i in range(2):
        with pytest.warns(RuntimeWarning, match="non-finite value in the loss"):
            opt.step(lambda: (w * float("nan")).sum())
        assert torch.equal(w.detach(), before)
        assert opt.last_step.status == "non_finite_loss" and not opt.last_step.accepted
    assert opt.damping == pytest.approx(1.5**2)
    with pytest.raises(FloatingPointError, match="3 consecutive steps"):
        opt.step(lambda: (w * float("nan")).sum())
    assert torch.equal(w.detach(), before)


def test_non_finite_curvature_or_trial_loss_rejects_the_step():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    before = w.detach().clone()
    opt = HessianFree([w], curvature=lambda loss, out, params: lambda v: v * float("inf"))
    with pytest.warns(RuntimeWarning, match="curvature product"):
        opt.step(lambda: (w**2).sum())
    assert torch.equal(w.detach(), before) and opt.last_step.status == "non_finite_curvature"

    # every trial point is non-finite: the line search fails, nothing moves
    opt = HessianFree([w], line_search_max_iter=5)
    calls = []

    def closure():
        calls.append(1)
        return (w**2).sum() if len(calls) == 1 else (w**2).sum() * float("nan")

    opt.step(closure)
    assert torch.equal(w.detach(), before)
    assert opt.last_step.status == "line_search_failed" and opt.damping > 1.0


def test_zero_gradient_is_a_no_op():
    w = torch.zeros(3, requires_grad=True)
    opt = HessianFree([w])
    opt.step(lambda: (w**2).sum())
    assert torch.equal(w.detach(), torch.zeros(3)) and opt.last_step.status == "zero_gradient"


def test_lbfgs_style_leaves_no_global_state_changed():
    original = torch.autograd.backward
    w = torch.tensor([1.0, -1.0], requires_grad=True)
    opt = HessianFree([w])

    def closure():
        opt.zero_grad()
        loss = (w**4).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.autograd.backward is original
    assert w.grad is not None and w.grad.grad_fn is None
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert torch.autograd.backward is original


def test_requires_grad_false_parameters_are_skipped_and_callback_gets_info():
    frozen = torch.ones(2, requires_grad=False)
    w = torch.tensor([3.0, -1.0], requires_grad=True)
    infos = []
    opt = HessianFree([w, frozen], callback=infos.append, damping=1e-4)
    opt.step(lambda: ((w - frozen) ** 2).sum())
    assert torch.equal(frozen, torch.ones(2))
    assert isinstance(infos[0], StepInfo) and infos[0].accepted
    torch.testing.assert_close(w.detach(), torch.ones(2), rtol=0, atol=1e-3)


def test_per_group_lr_scales_the_step():
    a = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = HessianFree([{"params": [a], "lr": 0.5}, {"params": [b]}], damping=1e-10, min_damping=0.0)
    opt.step(lambda: (a**2).sum() + (b**2).sum())
    torch.testing.assert_close(a.detach(), torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close(
        b.detach(), torch.tensor([0.0], dtype=torch.float64), rtol=0, atol=1e-8
    )


def test_ggn_without_outputs_is_a_clear_error():
    w = torch.ones(2, requires_grad=True)
    opt = HessianFree([w], curvature="ggn")
    with pytest.raises(ValueError, match=r"curvature='ggn' needs the model outputs"):
        opt.step(lambda: (w**2).sum())
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)
    with pytest.raises(TypeError, match=r"\(loss, outputs\)"):
        opt.step(lambda: (w.sum(), w, w, w))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(damping=-0.1), r"`damping` must be in \(0.0, inf\), got -0.1"),
        (dict(damping="big"), r"Unknown `damping` 'big'; expected one of 'auto'"),
        (dict(lr=0), r"`lr` must be in \(0.0, inf\)"),
        (dict(curvature="hess"), r"Unknown `curvature` 'hess'; expected one of 'auto', 'ggn'"),
        (dict(damping_decrease=1.5), r"did you swap it with `damping_increase`"),
        (dict(damping_increase=0.5), r"did you swap it with `damping_decrease`"),
        (dict(cg_max_iter=0), r"`cg_max_iter` must be an int >= 1, got 0"),
        (dict(cg_decay=1.5), r"`cg_decay` must be in \[0.0, 1.0\], got 1.5"),
        (dict(cg_decay="warm"), r"Unknown `cg_decay` 'warm'"),
        (dict(armijo_c=1.0), r"`armijo_c` must be in \(0.0, 1.0\)"),
        (dict(line_search="wolfe"), r"Unknown `line_search` 'wolfe'"),
        (dict(precond="jacobi"), r"Unknown `precond` 'jacobi'"),
        (dict(weight_decay=-1.0), r"`weight_decay` must be in \[0.0, inf\)"),
        (
            dict(damping=1e-9, min_damping=1e-6),
            r"`damping` must be in \[min_damping, max_damping\]",
        ),
    ],
)
def test_bad_hyperparameters_are_rejected_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianFree([torch.zeros(1, requires_grad=True)], **kwargs)


def test_bad_hyperparameter_types_are_rejected():
    with pytest.raises(TypeError, match="`cg_max_iter` must be an int, got float"):
        HessianFree([torch.zeros(1, requires_grad=True)], cg_max_iter=2.5)
    with pytest.raises(TypeError, match="`adapt_damping` must be a bool"):
        HessianFree([torch.zeros(1, requires_grad=True)], adapt_damping="yes")
    with pytest.raises(ValueError, match="No parameter requires gradients"):
        HessianFree([torch.zeros(1)])


def test_step_works_when_called_under_no_grad():
    A, b = _quadratic(4, seed=1)
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    out_layer = torch.nn.Identity()

    def closure():
        out = out_layer(x * 1.0)
        return 0.5 * out @ A @ out - b @ out, out

    opt = HessianFree([x], damping=1e-10, min_damping=0.0, precond="martens")
    with torch.no_grad():
        opt.step(closure)
    torch.testing.assert_close(x.detach(), torch.linalg.solve(A, b), rtol=1e-6, atol=1e-8)


def test_structural_damping_trains_an_rnn_and_validates_its_contract():
    torch.manual_seed(4)
    rnn = nn.RNN(2, 8, batch_first=True, nonlinearity="tanh").double()
    head = nn.Linear(8, 1).double()
    x = torch.rand(32, 10, 2, dtype=torch.float64)
    y = x[:, :, :1].sum(1) / 10
    params = list(rnn.parameters()) + list(head.parameters())
    opt = HessianFree(params, structural_damping=0.03, cg_max_iter=30)

    def closure():
        hidden, _ = rnn(x)
        out = head(hidden[:, -1])
        return F.mse_loss(out, y), out, hidden

    first = float(opt.step(closure))
    for _ in range(10):
        opt.step(closure)
    assert opt.last_step.loss_after < 0.2 * first
    assert math.isfinite(opt.last_step.rho)
    with pytest.raises(ValueError, match=r"`structural_damping` > 0 needs Gauss-Newton curvature"):
        HessianFree(params, structural_damping=0.03, curvature="hessian")
    with pytest.raises(ValueError, match=r"\(loss, outputs, hidden\)"):
        HessianFree(params, structural_damping=0.03).step(lambda: closure()[:2])


@pytest.mark.parametrize("closure_style, warm", [("loss", False), ("loss_outputs", True)])
def test_cg_decay_auto_warm_starts_gauss_newton_only(closure_style, warm):
    # A warm start costs one extra product (r_0 = A x_0 - b): cg_matvecs tells them apart.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    opt = HessianFree(model.parameters(), cg_max_iter=5)

    def closure():
        out = model(x)
        loss = F.mse_loss(out, y)
        return (loss, out) if closure_style == "loss_outputs" else loss

    opt.step(closure)
    opt.step(closure)
    info = opt.last_step
    assert info.cg_matvecs == info.cg_iters + (1 if warm else 0)
