"""Models from ``experiments/_unseen7.py`` that no earlier test had: a graph convolution by
``index_add_`` with buffers and a parameter the loss never sees, an implicit layer by a
fixed-point loop, an MLP-mixer block with a frozen embedding; and ``HessianFree(model)``.

Oracles: explicit float64 Hessians, Jacobians and :math:`J^\\top H_\\ell J` from
``torch.autograd.functional`` through ``functional_call`` (the trainable parameters in the
operators' order).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hessfree import GGNLinearOperator, HessianFree, HessianLinearOperator, JacobianLinearOperator

EXACT = dict(rtol=1e-10, atol=1e-12)


class _GCN(nn.Module):
    """Two graph convolutions by gather and ``index_add_``; ``unused`` never reaches the loss."""

    def __init__(self, n: int, d: int, k: int, gen: torch.Generator) -> None:
        super().__init__()
        src = torch.randint(0, n, (3 * n,), generator=gen)
        dst = torch.randint(0, n, (3 * n,), generator=gen)
        src, dst = torch.cat([src, dst, torch.arange(n)]), torch.cat([dst, src, torch.arange(n)])
        deg = torch.zeros(n).index_add_(0, dst, torch.ones(len(dst)))
        self.register_buffer("src", src)
        self.register_buffer("dst", dst)
        self.register_buffer("w", (deg[src] * deg[dst]).rsqrt())
        self.lin1, self.lin2 = nn.Linear(d, 5), nn.Linear(5, k)
        self.unused = nn.Parameter(torch.ones(3))

    def propagate(self, h: torch.Tensor) -> torch.Tensor:
        msg = h[self.src] * self.w.to(h.dtype)[:, None]
        return torch.zeros_like(h).index_add_(0, self.dst, msg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.propagate(self.lin2(torch.tanh(self.propagate(self.lin1(x)))))


class _FixedPoint(nn.Module):
    """z = tanh(W z + U x) by 8 unrolled iterations, then a linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.W, self.U, self.head = nn.Linear(4, 4, bias=False), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ux = self.U(x)
        z = torch.zeros_like(ux)
        for _ in range(8):
            z = torch.tanh(self.W(z) + ux)
        return self.head(z)


class _Mixer(nn.Module):
    """One mixer block over 2 tokens of 4 channels, LayerNorm and GELU, frozen embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4).requires_grad_(False)
        self.norm = nn.LayerNorm(4)
        self.tok = nn.Sequential(nn.Linear(2, 3), nn.GELU(), nn.Linear(3, 2))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(-1, 2, 3))
        h = h + self.tok(self.norm(h).transpose(1, 2)).transpose(1, 2)
        return self.head(h.mean(1))


def _dense(model: nn.Module, loss_fn, x, y):
    """Float64 H, G = Jᵀ H_ℓ J and J over the trainable parameters, in their order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def outputs(t):
        parts = t.split([s.numel() for s in shapes])
        params = {k: v.view(s) for k, v, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, params, (x,))

    H = torch.autograd.functional.hessian(lambda t: loss_fn(outputs(t), y), theta)
    o = outputs(theta).detach()
    J = torch.autograd.functional.jacobian(outputs, theta).reshape(o.numel(), -1)
    Hl = torch.autograd.functional.hessian(lambda u: loss_fn(u.view_as(o), y), o.reshape(-1))
    return H, J.T @ Hl @ J, J


def _gcn_case():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _GCN(12, 4, 3, gen).double()
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    mask = torch.arange(12) % 3 == 0

    def loss_fn(o, t):
        return F.cross_entropy(o[mask], t[mask])

    return model, loss_fn, x, y


def _fixed_point_case():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = _FixedPoint().double()
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    return model, F.mse_loss, x, torch.randn(6, 2, generator=gen, dtype=torch.float64)


def _mixer_case():
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = _Mixer().double()
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)

    def loss_fn(o, t):
        return F.cross_entropy(o, t, weight=weight, label_smoothing=0.1)

    return model, loss_fn, x, y


CASES = {"gcn_index_add": _gcn_case, "fixed_point": _fixed_point_case, "mixer": _mixer_case}


@pytest.mark.parametrize("name", list(CASES))
def test_operators_match_dense_float64(name, one_thread):
    model, loss_fn, x, y = CASES[name]()
    H, G, J = _dense(model, loss_fn, x, y)
    V = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(3), dtype=H.dtype)
    for op, M in (
        (HessianLinearOperator(model, loss_fn, (x, y)), H),
        (GGNLinearOperator(model, loss_fn, (x, y)), G),
    ):
        assert op.shape == M.shape
        torch.testing.assert_close(torch.from_numpy(op.matmat(V.numpy())), M @ V, **EXACT)
        torch.testing.assert_close(torch.from_numpy(op.H @ V[:, 0].numpy()), M.T @ V[:, 0], **EXACT)
    Jop = JacobianLinearOperator(model, x)
    w = torch.randn(J.shape[0], generator=torch.Generator().manual_seed(4), dtype=J.dtype)
    torch.testing.assert_close(torch.from_numpy(Jop @ V[:, 0].numpy()), J @ V[:, 0], **EXACT)
    torch.testing.assert_close(torch.from_numpy(Jop.rmatvec(w.numpy())), J.T @ w, **EXACT)
    # a damped GGN solve by SciPy's CG against a dense solve
    lam = 1e-2 * torch.linalg.eigvalsh(G)[-1].item()
    b = V[:, 1].numpy()
    sol, info = sla.cg(GGNLinearOperator(model, loss_fn, (x, y)).damped(lam), b, rtol=1e-12)
    ref = np.linalg.solve(G.numpy() + lam * np.eye(len(b)), b)
    assert info == 0
    np.testing.assert_allclose(sol, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())


def test_gcn_unused_parameter_has_zero_curvature_rows(one_thread):
    model, loss_fn, x, y = _gcn_case()
    G = GGNLinearOperator(model, loss_fn, (x, y))
    H = HessianLinearOperator(model, loss_fn, (x, y))
    e = np.zeros(G.shape[0])
    e[:3] = 1.0  # `unused`: a module's own parameters come before its children's
    assert next(model.named_parameters())[0] == "unused"
    v = np.random.default_rng(0).standard_normal(G.shape[0])
    for op in (G, H):
        assert not (op @ e).any()  # its columns ...
        assert not (op @ v)[:3].any()  # ... and its rows are exactly zero


@pytest.mark.parametrize("style", ["lbfgs", "loss_outputs"])
@pytest.mark.parametrize("name", ["gcn_index_add", "mixer"])
def test_step_leaves_unused_and_frozen_parameters_bit_identical(name, style, one_thread):
    model, loss_fn, x, y = CASES[name]()
    fixed = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n == "unused" or not p.requires_grad
    }
    start = copy.deepcopy(model.state_dict())
    opt = HessianFree(model.parameters())

    def closure():
        out = model(x)
        if style == "loss_outputs":
            return loss_fn(out, y), out
        opt.zero_grad()
        loss = loss_fn(out, y)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on a correct closure
        for _ in range(3):
            opt.step(closure)
    params = dict(model.named_parameters())
    for n, before in fixed.items():
        assert torch.equal(params[n], before), n
    moved = [n for n, p in params.items() if not torch.equal(p, start[n])]
    assert moved and set(moved).isdisjoint(fixed)


def test_hessianfree_refuses_a_module_and_says_pass_parameters():
    model = _FixedPoint()
    with pytest.raises(TypeError, match=r"module _FixedPoint.*model\.parameters\(\)"):
        HessianFree(model)
