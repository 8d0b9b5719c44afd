"""Operators on a model that runs ``torch.utils.checkpoint``: the reentrant variant is refused
(its backward is not differentiable and the wrapped parameters are no inputs of its graph
node, so products had silently zero rows for them), the non-reentrant one is exact.

Oracle: the explicit float64 Hessian of the loss (``torch.autograd.functional.hessian``
through ``torch.func.functional_call``) of the same model without the checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from hessfree import GGNLinearOperator, HessianLinearOperator, JacobianLinearOperator


class _Checkpointed(nn.Module):
    """3-4-4-2 tanh MLP with its first or its middle layer inside ``checkpoint`` (none with
    ``reentrant=None``). Reentrant around the first layer, main's operators were silently off
    (0.29 relative error in the Hessian and GGN, 0.52 in the Jacobian); around the middle one
    torch raised its own RuntimeError (now the operators' worded refusal)."""

    def __init__(self, reentrant: bool | None, where: str = "first") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.reentrant, self.where = reentrant, where

    def forward(self, x: Tensor) -> Tensor:
        layers = [lambda u: torch.tanh(self.a(u)), lambda u: torch.tanh(self.b(u))]
        for i, layer in enumerate(layers):
            wrapped = self.reentrant is not None and ("first", "middle")[i] == self.where
            if wrapped and self.reentrant and not x.requires_grad:
                # the reentrant recipe: an input that needs a gradient, else torch's backward
                # never reaches the wrapped parameters (torch warns: "Gradients will be None")
                x = x.detach().requires_grad_(True)
            x = checkpoint(layer, x, use_reentrant=self.reentrant) if wrapped else layer(x)
        return self.c(x)


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(12, 3, generator=g, dtype=torch.float64),
        torch.randn(12, 2, generator=g, dtype=torch.float64),
    )


def _dense_hessian(model: nn.Module, x: Tensor, y: Tensor) -> np.ndarray:
    named = {k: v.detach() for k, v in model.named_parameters()}
    shapes, sizes = [p.shape for p in named.values()], [p.numel() for p in named.values()]

    def loss(t: Tensor) -> Tensor:
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        return F.mse_loss(functional_call(model, dict(zip(named, parts, strict=True)), (x,)), y)

    return hessian(loss, torch.cat([p.reshape(-1) for p in named.values()])).numpy()


@pytest.mark.parametrize(
    "build",
    [
        lambda m, x, y: HessianLinearOperator(m, F.mse_loss, (x, y)),
        lambda m, x, y: HessianLinearOperator(m, F.mse_loss, (x, y), cache_graph=False),
        lambda m, x, y: HessianLinearOperator(m, F.mse_loss, [(x[:6], y[:6]), (x[6:], y[6:])]),
        lambda m, x, y: GGNLinearOperator(m, F.mse_loss, (x, y)),
        lambda m, x, y: JacobianLinearOperator(m, x),
    ],
    ids=["hessian", "hessian-uncached", "hessian-batches", "ggn", "jacobian"],
)
@pytest.mark.parametrize("where", ["first", "middle"])
def test_reentrant_checkpoint_is_refused_before_a_product_returns(build, where) -> None:
    model = _Checkpointed(reentrant=True, where=where).double()
    x, y = _data()
    with pytest.raises(NotImplementedError, match="use_reentrant=False"):
        op = build(model, x, y)
        op @ np.ones(op.shape[1])


@pytest.mark.parametrize("where", ["first", "middle"])
def test_non_reentrant_checkpoint_hessian_is_the_dense_one(where) -> None:
    plain = _Checkpointed(reentrant=None).double()
    ckpt = _Checkpointed(reentrant=False, where=where).double()
    x, y = _data()
    dense = _dense_hessian(plain, x, y)
    for cache in (True, False):
        H = HessianLinearOperator(ckpt, F.mse_loss, (x, y), cache_graph=cache)
        np.testing.assert_allclose(H @ np.eye(H.shape[1]), dense, rtol=0, atol=1e-13)


def test_from_function_refuses_a_reentrant_checkpoint() -> None:
    def f(z: Tensor) -> Tensor:
        return checkpoint(lambda u: (u**4).sum(), z, use_reentrant=True)

    with pytest.raises(NotImplementedError, match="from_function.*use_reentrant=True"):
        HessianLinearOperator.from_function(f, torch.ones(3, dtype=torch.float64))
