"""Operators over a graph through an ``@once_differentiable`` autograd Function.

torch runs such a backward under ``no_grad``: the products that differentiate it once more
(every curvature operator through the model, the Hessian and GGN through the loss, the
Jacobian's forward products) got zero there without an error, 0.34-0.71 off the dense
matrices. They are refused at the first graph; the Fishers, which take the loss's first
derivative only, still accept such a Function in the loss and are exact there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import hessfree as hf


class _OnceTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _OnceSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _Net(nn.Module):
    def __init__(self, once: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.once = nn.Linear(3, 4), nn.Linear(4, 2), once

    def forward(self, x):
        h = self.a(x)
        return self.b(_OnceTanh.apply(h) if self.once else torch.tanh(h))


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)


def _dense(op) -> np.ndarray:
    return op @ np.eye(op.shape[1])


@pytest.mark.parametrize(
    "make",
    [
        lambda m, d: hf.HessianLinearOperator(m, nn.MSELoss(), d),
        lambda m, d: hf.GGNLinearOperator(m, nn.MSELoss(), d),
        lambda m, d: hf.FisherLinearOperator(m, nn.MSELoss(), d),
        lambda m, d: hf.MCFisherLinearOperator(m, nn.MSELoss(), d, seed=0),
        lambda m, d: hf.JacobianLinearOperator(m, d[0]),
    ],
    ids=["hessian", "ggn", "fisher", "mc_fisher", "jacobian"],
)
def test_operators_refuse_a_once_differentiable_function_in_the_model(make):
    x, y = _data()
    model = _Net(once=True).double()
    with pytest.raises(NotImplementedError, match="_OnceTanh.*once_differentiable"):
        make(model, (x.double(), y.double()))
    # the same model with torch.tanh builds (the refusal is the Function's, not the model's)
    assert make(_Net(once=False).double(), (x.double(), y.double())).shape[1] == 26


def test_hessian_and_ggn_refuse_it_in_the_loss_and_the_fisher_is_exact_there():
    x, y = (t.double() for t in _data())
    model = _Net(once=False).double()

    def once_loss(out, target):
        return _OnceSquare.apply(out - target).mean()

    def plain_loss(out, target):
        return ((out - target) ** 2).mean()

    for cls in (hf.HessianLinearOperator, hf.GGNLinearOperator):
        with pytest.raises(NotImplementedError, match="loss or model runs .*_OnceSquare"):
            cls(model, once_loss, (x, y), reduction="mean")
    fisher = _dense(hf.FisherLinearOperator(model, once_loss, (x, y), reduction="mean"))
    want = _dense(hf.FisherLinearOperator(model, plain_loss, (x, y), reduction="mean"))
    np.testing.assert_allclose(fisher, want, rtol=1e-12, atol=1e-14)
    # the oracle: the empirical Fisher sum_i g_i g_i^T / N of the plain mean, per-example
    # gradients from autograd (the loss of example i is its squared error over 2 outputs / 2)
    params = list(model.parameters())
    rows = []
    for i in range(len(x)):
        li = ((model(x[i : i + 1]) - y[i : i + 1]) ** 2).mean()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, params)]))
    G = torch.stack(rows).numpy()
    np.testing.assert_allclose(fisher, G.T @ G / len(x), rtol=1e-10, atol=1e-12)


def test_hessian_from_function_refuses_it():
    with pytest.raises(NotImplementedError, match="from_function: f runs .*_OnceSquare"):
        hf.HessianLinearOperator.from_function(
            lambda z: _OnceSquare.apply(z).sum(), torch.ones(3, dtype=torch.float64)
        )
