"""Cases from ``experiments/_unseen4.py`` that broke: curvature through ``matrix_exp``.

``torch.nn.utils.parametrizations.orthogonal`` maps a square weight through
``torch.linalg.matrix_exp``, whose backward is nonlinear in its cotangent as computed, so the R-op
graph that drops cotangents (``_rop_setup``) gave NaN Gauss-Newton products, and every
``(loss, outputs)`` step was rejected; ``torch.logcumsumexp`` likewise. The oracle is an
explicit float64 :math:`J^\\top H_\\ell J` (:math:`J` from
``torch.autograd.functional.jacobian`` of the outputs in the flat parameters).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations

from hessfree import GGNLinearOperator, GGNProduct, HessianFree, StructurallyDampedGGN

EXACT = dict(rtol=1e-10, atol=1e-12)


def _orthogonal_net(orthogonal_map: str = "matrix_exp") -> nn.Module:
    torch.manual_seed(0)
    square = parametrizations.orthogonal(nn.Linear(4, 4), orthogonal_map=orthogonal_map)
    return nn.Sequential(square, nn.Tanh(), nn.Linear(4, 2)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    return x, torch.randn(6, 2, generator=gen, dtype=torch.float64)


def _dense_jacobian(model: nn.Module, x: torch.Tensor, *, hidden: bool = False) -> torch.Tensor:
    """``∂o/∂θ`` (or ``∂h/∂θ`` of the first layer's output) as a dense ``(entries, n)`` matrix."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, flat.split([s.numel() for s in shapes]), strict=True))
        params = {k: v.view(s) for (k, v), s in zip(parts.items(), shapes, strict=True)}
        net = model[0] if hidden else model
        prefix = "0." if hidden else ""
        params = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
        return functional_call(net, params, (x,)).reshape(-1)

    J = torch.autograd.functional.jacobian(f, theta)
    if hidden:  # the first layer's parameters come first in model.parameters()
        J = torch.cat([J, J.new_zeros(J.shape[0], theta.numel() - J.shape[1])], 1)
    return J


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
def test_ggn_operator_orthogonal_parametrization_matches_dense(orthogonal_map):
    model, (x, y) = _orthogonal_net(orthogonal_map), _data()
    G = GGNLinearOperator(model, nn.MSELoss(), [(x, y)])
    J = _dense_jacobian(model, x)
    dense = (J.T @ J * (2 / y.numel())).numpy()  # H_ℓ = 2/M I for the mean squared error
    v = np.random.default_rng(0).standard_normal(G.shape[0])
    np.testing.assert_allclose(G @ v, dense @ v, **EXACT)


class _CumLogSumExp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.head = nn.Linear(4, 4).double(), nn.Linear(4, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.logcumsumexp(self.inner(x), dim=1))


def test_ggn_operator_through_logcumsumexp_matches_dense():
    """logcumsumexp's backward takes logs of the cotangent's parts: its double backward reads it."""
    model, (x, y) = _CumLogSumExp(), _data()
    G = GGNLinearOperator(model, nn.MSELoss(), [(x, y)])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = flat.split([s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, params, (x,)).reshape(-1)

    J = torch.autograd.functional.jacobian(f, theta)
    v = np.random.default_rng(1).standard_normal(G.shape[0])
    np.testing.assert_allclose(G @ v, (J.T @ J * (2 / y.numel())).numpy() @ v, **EXACT)


def test_ggn_product_matrix_exp_batched_and_repeated_products_match_dense():
    model, (x, y) = _orthogonal_net(), _data()
    out = model(x)
    G = GGNProduct(F.mse_loss(out, y), out, list(model.parameters()))
    J = _dense_jacobian(model, x)
    dense = J.T @ J * (2 / y.numel())
    V = torch.randn(3, dense.shape[0], generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    torch.testing.assert_close(G.matmat(V), V @ dense, **EXACT)  # first product batched
    torch.testing.assert_close(G(V[0]), dense @ V[0], **EXACT)  # then single, same graph
    Jv = G.jacobian.jvp(V[1])
    torch.testing.assert_close(Jv.reshape(-1), J @ V[1], **EXACT)


def test_structurally_damped_ggn_through_matrix_exp_matches_dense():
    model, (x, y) = _orthogonal_net(), _data()
    h = model[0](x)
    out = model[2](torch.tanh(h))
    P = StructurallyDampedGGN(F.mse_loss(out, y), out, h, list(model.parameters()), weight=0.3)
    J, Jh = _dense_jacobian(model, x), _dense_jacobian(model, x, hidden=True)
    dense = J.T @ J * (2 / y.numel()) + 0.3 * Jh.T @ Jh
    v = torch.randn(dense.shape[0], generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    torch.testing.assert_close(P(v), dense @ v, **EXACT)


def test_default_step_orthogonal_parametrization_outputs_closure_accepted():
    model, (x, y) = _orthogonal_net(), _data()
    opt = HessianFree(model.parameters())

    def closure():
        out = model(x)
        return F.mse_loss(out, y), out

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on main: "non-finite value in a curvature product"
        losses = [float(opt.step(closure)) for _ in range(3)]
    assert opt.last_step.accepted
    assert F.mse_loss(model(x), y).item() < 0.9 * losses[0]


def test_non_finite_first_loss_warning_names_no_nan_damping():
    """damping='auto' has no λ before a finite step: the warning says so, not 'raised to nan'."""
    model, (x, y) = nn.Linear(4, 2).double(), _data()
    bad = x.clone()
    bad[0, 0] = float("nan")
    opt = HessianFree(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]

    def closure(inputs: torch.Tensor):
        out = model(inputs)
        return F.mse_loss(out, y), out

    with pytest.warns(RuntimeWarning, match="damping not set yet") as record:
        opt.step(lambda: closure(bad))
    assert not any("to nan" in str(w.message) for w in record)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    opt.step(lambda: closure(x))  # the next finite step sets λ
    assert opt.last_step.accepted and np.isfinite(opt.damping)


def test_closure_returning_outputs_then_loss_is_told_the_order():
    model, (x, y) = nn.Linear(4, 2).double(), _data()
    before = [p.detach().clone() for p in model.parameters()]

    def swapped():
        out = model(x)
        return out, F.mse_loss(out, y)

    with pytest.raises(TypeError, match=r"shape \(6, 2\) first.*\(loss, outputs\)"):
        HessianFree(model.parameters()).step(swapped)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_closure_returning_unreduced_loss_is_told_to_reduce_it():
    model, (x, y) = nn.Linear(4, 2).double(), _data()

    def unreduced():
        out = model(x)
        return F.mse_loss(out, y, reduction="none"), out

    with pytest.raises(TypeError, match=r"got \(6, 2\).*reduce it"):
        HessianFree(model.parameters()).step(unreduced)
