"""Gauss-Newton products for losses off the beaten track, against an explicit float64 GGN.

The oracle is :math:`G = J^\\top H_\\ell J` built densely: :math:`J` from
``torch.autograd.functional.jacobian`` of the outputs with respect to the flat parameters,
:math:`H_\\ell` from ``torch.autograd.functional.hessian`` of the loss with respect to the
outputs. Each loss is one a user's ``(loss, outputs)`` closure might return; most are not
recognised by :func:`hessfree.loss_hessian_product` and go through the double-backward path,
cross-entropy with ``ignore_index`` goes through the closed form.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hessfree import GGNProduct, HessianFree, loss_hessian_product

EXACT = dict(rtol=1e-10, atol=1e-12)
N, N_IN, N_HIDDEN = 6, 3, 5


def _targets(name: str, gen: torch.Generator) -> tuple[int, object]:
    """(number of outputs, targets) for each loss."""
    if name in ("bce_multilabel", "bce_pos_weight"):
        return 4, (torch.rand(N, 4, generator=gen, dtype=torch.float64) < 0.4).double()
    if name == "gaussian_nll":
        return 2, torch.randn(N, generator=gen, dtype=torch.float64)
    if name == "poisson_nll":
        return 3, torch.poisson(torch.full((N, 3), 2.0, dtype=torch.float64), generator=gen)
    if name in ("ce_ignore", "ce_ignore_weight", "ce_label_smoothing"):
        y = torch.randint(0, 4, (N,), generator=gen)
        y[1] = y[4] = -100  # ignore_index's default
        return 4, y.clamp(min=0) if name == "ce_label_smoothing" else y
    if name == "kl_log_target":
        t = torch.randn(N, 4, generator=gen, dtype=torch.float64)
        return 4, torch.log_softmax(t, dim=1)
    return 3, torch.randn(N, 3, generator=gen, dtype=torch.float64)  # regression losses


def _loss(name: str, out: torch.Tensor, y: object) -> torch.Tensor:
    if name == "bce_multilabel":
        return F.binary_cross_entropy_with_logits(out, y)
    if name == "bce_pos_weight":
        pos_weight = torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=out.dtype)
        return F.binary_cross_entropy_with_logits(out, y, pos_weight=pos_weight)
    if name == "gaussian_nll":  # mean and variance heads; variance through softplus
        return F.gaussian_nll_loss(out[:, 0], y, F.softplus(out[:, 1]) + 1e-3)
    if name == "poisson_nll":
        return F.poisson_nll_loss(out, y, log_input=True)
    if name == "huber":
        return F.huber_loss(out, y, delta=0.5)
    if name == "smooth_l1":
        return F.smooth_l1_loss(out, y, beta=0.7, reduction="sum")
    if name == "kl_log_target":
        return F.kl_div(F.log_softmax(out, dim=1), y, reduction="batchmean", log_target=True)
    if name == "ce_ignore":
        return F.cross_entropy(out, y)
    if name == "ce_ignore_weight":
        weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=out.dtype)
        return F.cross_entropy(out, y, weight=weight)
    if name == "ce_label_smoothing":
        return F.cross_entropy(out, y, label_smoothing=0.1)
    if name == "abs_pow_1_5":  # a user's own loss
        return ((out - y).abs() ** 1.5).mean()
    raise AssertionError(name)


LOSSES = [
    "bce_multilabel",
    "bce_pos_weight",
    "gaussian_nll",
    "poisson_nll",
    "huber",
    "smooth_l1",
    "kl_log_target",
    "ce_ignore",
    "ce_ignore_weight",
    "ce_label_smoothing",
    "abs_pow_1_5",
]


def _problem(name: str):
    gen = torch.Generator().manual_seed(3)
    n_out, y = _targets(name, gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_IN, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, n_out))
    model.double()
    x = torch.randn(N, N_IN, generator=gen, dtype=torch.float64)
    return model, x, y


def _explicit_ggn(model: nn.Module, x: torch.Tensor, name: str, y: object) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs_of(t: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, torch.split(t, [s.numel() for s in shapes]), strict=True))
        params = {n: parts[n].view(s) for n, s in zip(names, shapes, strict=True)}
        return functional_call(model, params, (x,))

    J = torch.autograd.functional.jacobian(outputs_of, theta)  # (N, K, P)
    out = outputs_of(theta).detach()
    H = torch.autograd.functional.hessian(lambda o: _loss(name, o, y), out)  # (N, K, N, K)
    m, p = out.numel(), theta.numel()
    J, H = J.reshape(m, p), H.reshape(m, m)
    return J.T @ H @ J


@pytest.mark.parametrize("name", LOSSES)
def test_ggn_product_matches_explicit_ggn(name):
    model, x, y = _problem(name)
    out = model(x)
    G = GGNProduct(_loss(name, out, y), out, list(model.parameters()))
    dense = _explicit_ggn(model, x, name, y)
    gen = torch.Generator().manual_seed(1)
    for v in torch.randn(3, dense.shape[0], generator=gen, dtype=torch.float64):
        torch.testing.assert_close(G(v), dense @ v, **EXACT)


def test_cross_entropy_ignore_index_uses_the_closed_form():
    """The closed form's ``ignore_index`` rows are zero and the mean is over kept rows only."""
    model, x, y = _problem("ce_ignore")
    out = model(x)
    assert loss_hessian_product(F.cross_entropy(out, y), out) is not None


@pytest.mark.parametrize("name", ["huber", "poisson_nll", "bce_multilabel", "kl_log_target"])
def test_default_optimizer_lowers_each_loss(name):
    """``HessianFree(params)`` with a ``(loss, outputs)`` closure: 10 full-batch steps from
    the same weights lower the loss, and every parameter stays finite."""
    model, x, y = _problem(name)
    opt = HessianFree(model.parameters())

    def closure():
        out = model(x)
        return _loss(name, out, y), out

    with torch.no_grad():
        first = float(_loss(name, model(x), y))
    for _ in range(10):
        opt.step(closure)
    with torch.no_grad():
        last = float(_loss(name, model(x), y))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert last < first
