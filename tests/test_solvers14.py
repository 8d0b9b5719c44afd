"""The public building blocks used on their own, without HessianFree (solvers14).

Each test pins a misuse that used to give a wrong answer or an error naming no argument:
products over a frozen parameter, ``ParamLayout.cat`` of misshapen tensors, a Nyström
preconditioner at zero damping, K-FAC's operator on a vector of the wrong size, and
preconditioner contexts without what they need. Oracles: dense float64 matrices from
``torch.autograd.functional`` / ``torch.func`` and eigendecompositions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessfree import (
    GGNProduct,
    cg,
)

D = torch.float64


def _mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(seed), dtype=D)
    return model, x


def _ggn(model: nn.Module, x: torch.Tensor) -> GGNProduct:
    out = model(x)
    return GGNProduct(F.mse_loss(out, torch.zeros_like(out)), out, list(model.parameters()))


# ---- cg: a product or preconditioner that writes into CG's vector is refused ----
def _spd(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D)).Q
    A = Q @ torch.diag(torch.arange(1.0, n + 1, dtype=D)) @ Q.T
    return A, torch.randn(n, generator=gen, dtype=D)


def test_cg_refuses_a_product_that_modifies_its_argument():
    """Such a product gave CONVERGED with ‖Ax − b‖ = 1.4 (main, this system)."""
    A, b = _spd()
    with pytest.raises(ValueError, match="`matvec` modified its argument in place"):
        cg(lambda v: A @ v.mul_(1.0), b, rtol=1e-12)
    with pytest.raises(ValueError, match="`precond` modified its argument in place"):
        cg(lambda v: 2 * v, b, precond=lambda r: r.mul_(0.5), rtol=1e-12)
    with pytest.raises(ValueError, match="`matvec` modified"):  # float16: the rescaled copy
        cg(lambda v: v.mul_(2), b.half(), rtol=1e-3)
    # returning the argument itself (the identity) is no modification: the same solve
    plain = cg(lambda v: A @ v, b, rtol=1e-12)
    same = cg(lambda v: A @ v, b, precond=lambda r: r, rtol=1e-12)
    assert same.reason is plain.reason and same.num_iter == plain.num_iter
    assert torch.equal(same.x, plain.x)
    # CONVERGED tests the recurrence's r against rtol‖b‖; the true residual differs by rounding
    # (~1e-15 on this κ = 6 system), so twice rtol leaves room for it
    assert torch.linalg.vector_norm(A @ plain.x - b) <= 2e-12 * torch.linalg.vector_norm(b)
