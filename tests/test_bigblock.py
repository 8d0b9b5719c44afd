"""|H_ℓ| blocks above 16 outputs per example once CG has shown the loss is not convex
(``experiments/README.md``, "bigblock")."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian

import hessfree.curvature as curvature_module
import hessfree.optimizer as optimizer_module
from hessfree import GGNProduct, HessianFree

EXACT = dict(rtol=1e-10, atol=1e-12)


def _cosine_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine-embedding loss of the pair ``out[:, 0]``, ``out[:, 1]``: not convex in them."""
    return F.cosine_embedding_loss(out[:, 0], out[:, 1], y, margin=0.3)


def _siamese(k: int = 24):
    """A float64 tanh MLP embedding 16 pairs in 12-d: ``k = 24`` outputs per example."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 6, generator=g, dtype=torch.float64)
    y = torch.where(torch.rand(16, generator=g) < 0.5, 1.0, -1.0).double()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, k // 2)).double()

    def closure():
        out = model(x)
        return _cosine_loss(out, y), out

    return model, x, y, closure


class _Spy(GGNProduct):
    """Records each Gauss-Newton product the optimizer builds: ``max_block``, θ, and its
    products with fixed vectors (taken at θ, before the step moves the parameters)."""

    made: list[dict] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        theta = torch.cat([p.detach().reshape(-1) for p in self.params]).clone()
        V = torch.randn(
            3, theta.numel(), dtype=theta.dtype, generator=torch.Generator().manual_seed(1)
        )
        self.made.append(
            dict(max_block=kwargs.get("max_block"), theta=theta, V=V, GV=[self(v) for v in V])
        )


@pytest.fixture
def spy(monkeypatch):
    _Spy.made = []
    monkeypatch.setattr(optimizer_module, "GGNProduct", _Spy)
    return _Spy.made


def _absolute_ggn(model: nn.Module, x, y, theta: torch.Tensor) -> torch.Tensor:
    """Dense float64 Jᵀ|H_ℓ|J at ``theta``: J from autograd.functional.jacobian, H_ℓ from
    autograd.functional.hessian, |·| per example's block by numpy's eigh."""
    m = copy.deepcopy(model)
    shapes = [p.shape for p in m.parameters()]
    names = [n for n, _ in m.named_parameters()]

    def outputs(t):
        parts = torch.split(t, [s.numel() for s in shapes])
        params = {n: q.view(s) for n, q, s in zip(names, parts, shapes, strict=True)}
        return torch.func.functional_call(m, params, (x,)).reshape(-1)

    o = outputs(theta).detach()
    J = jacobian(outputs, theta, vectorize=True).numpy()
    HL = hessian(lambda v: _cosine_loss(v.view(x.shape[0], 2, -1), y), o, vectorize=True).numpy()
    k = o.numel() // x.shape[0]
    absolute = np.zeros_like(HL)
    negative = False
    for i in range(x.shape[0]):
        block = slice(i * k, (i + 1) * k)
        off = HL[block].copy()
        off[:, block] = 0.0
        assert not off.any()  # the premise: H_ℓ is block-diagonal over the examples
        lam, U = np.linalg.eigh(HL[block, block])
        negative |= bool(lam.min() < -1e-8 * abs(lam).max())
        absolute[block, block] = (U * abs(lam)) @ U.T
    assert negative  # the premise: H_ℓ is indefinite here
    return torch.from_numpy(J.T @ absolute @ J)


def test_bigblock_after_negative_curvature_uses_absolute_blocks(spy):
    model, x, y, closure = _siamese()
    opt = HessianFree(model.parameters())
    opt.step(closure)
    # the premise: 24 outputs per example (above 16), and CG met negative curvature
    assert opt.last_step.cg_reason == "negative_curvature"
    assert spy[0]["max_block"] is None
    opt.step(closure)
    oracle = _absolute_ggn(model, x, y, spy[1]["theta"])
    for v, Gv in zip(spy[1]["V"], spy[1]["GV"], strict=True):
        torch.testing.assert_close(Gv, oracle @ v, **EXACT)
    assert spy[1]["max_block"] == HessianFree._max_block_not_convex >= 24


def test_bigblock_flag_survives_state_dict(spy):
    model, _, _, closure = _siamese()
    opt = HessianFree(model.parameters())
    opt.step(closure)
    assert opt.last_step.cg_reason == "negative_curvature"  # the premise
    saved = opt.state_dict()
    other = HessianFree(model.parameters())
    other.load_state_dict(saved)
    flag = other.state[next(model.parameters())]["loss_not_convex"]
    assert flag is True
    other.step(closure)
    assert spy[-1]["max_block"] == HessianFree._max_block_not_convex


def test_bigblock_convex_loss_never_forms_large_blocks(monkeypatch, spy):
    # a convex generic loss over 32 outputs per example: CG meets no negative curvature, so
    # the cap stays 16 and no block of 32 is ever formed (no K + 1 set-up products)
    caps = []
    original = curvature_module._absolute_blocks

    def counting(go, outputs, *cap):
        caps.append(cap[0] if cap else None)
        return original(go, outputs, *cap)

    monkeypatch.setattr(curvature_module, "_absolute_blocks", counting)
    factorized = []  # the convexity test factorizes the blocks once they are formed
    cholesky_ex = torch.linalg.cholesky_ex
    monkeypatch.setattr(
        torch.linalg, "cholesky_ex", lambda A, **kw: factorized.append(A) or cholesky_ex(A, **kw)
    )
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 32)).double()
    x = torch.randn(20, 5, dtype=torch.float64)
    target = torch.tanh(x @ torch.randn(5, 32, dtype=torch.float64))
    opt = HessianFree(model.parameters())

    def closure():
        out = model(x)
        return (out - target).pow(2).mean(), out

    for _ in range(5):
        opt.step(closure)
        assert opt.last_step.cg_reason != "negative_curvature"
    assert len(caps) == 5 and set(caps) == {None}
    assert not factorized
    assert "loss_not_convex" not in opt.state[next(model.parameters())]


@pytest.mark.parametrize("bad", [0, 2.5, True])
def test_ggn_max_block_rejects_bad_values(bad):
    model, x, y, _ = _siamese()
    out = model(x)
    with pytest.raises(ValueError, match=rf"`max_block` must be None or an int >= 1, got {bad!r}"):
        GGNProduct(_cosine_loss(out, y), out, list(model.parameters()), max_block=bad)
