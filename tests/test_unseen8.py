"""Models from ``experiments/_unseen8.py`` that no earlier test had: a CTC loss (an op whose
backward torch cannot differentiate), two damped oscillators through complex exponentials and
``torch.fft`` with parameters in an ``nn.ParameterDict``, and a DeepSets model in a nested
``nn.ModuleDict``.

Oracles: explicit float64 Hessians, Jacobians and :math:`J^\\top H_\\ell J` from
``torch.autograd.functional`` through ``functional_call``; per-example gradients, one
``torch.autograd.grad`` per example, for the empirical Fisher.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hessfree import (
    FisherLinearOperator,
    GGNLinearOperator,
    HessianFree,
    HessianLinearOperator,
    JacobianLinearOperator,
)

EXACT = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# CTC: torch implements no derivative of aten::_ctc_loss_backward
# ------------------------------------------------------------------------------------------
def _ctc_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n, T = out.shape[:2]
    lp = out.log_softmax(-1).transpose(0, 1)
    return F.ctc_loss(lp, y, torch.full((n,), T), torch.full((n,), y.shape[1]))


def _ctc_case(dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 3, generator=gen, dtype=dtype)
    y = torch.randint(1, 4, (6, 3), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    return model, x, y


@pytest.mark.parametrize("style", ["lbfgs", "loss_outputs"])
def test_ctc_default_step_names_the_op_and_the_fisher(style):
    model, x, y = _ctc_case()
    opt = HessianFree(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        if style == "loss_outputs":
            out = model(x)
            return _ctc_loss(out, y), out
        opt.zero_grad()
        loss = _ctc_loss(model(x), y)
        loss.backward()
        return loss

    # main: RuntimeError "derivative for aten::_ctc_loss_backward is not implemented", alone
    with pytest.raises(NotImplementedError, match=r"aten::_ctc_loss\b.*curvature='fisher'"):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("op_cls", [GGNLinearOperator, HessianLinearOperator])
def test_ctc_operators_name_the_fisher_operator(op_cls):
    model, x, y = _ctc_case(torch.float64)
    op = op_cls(model, _ctc_loss, (x, y))
    with pytest.raises(NotImplementedError, match="FisherLinearOperator"):
        op @ np.ones(op.shape[0])


def test_ctc_fisher_operator_matches_per_example_gradients():
    model, x, y = _ctc_case(torch.float64)
    params = list(model.parameters())
    rows = []
    for i in range(len(x)):  # a 'mean' CTC over one example is that example's term
        g = torch.autograd.grad(_ctc_loss(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(rows)
    F_dense = (G.T @ G / len(x)).numpy()
    op = FisherLinearOperator(model, _ctc_loss, (x, y))
    V = np.random.default_rng(0).standard_normal((op.shape[0], 2))
    np.testing.assert_allclose(op.matmat(V), F_dense @ V, rtol=1e-10, atol=1e-12)


def test_ctc_fisher_steps_reduce_the_loss():
    model, x, y = _ctc_case()
    opt = HessianFree(model.parameters(), curvature="fisher")
    f0 = _ctc_loss(model(x), y).item()

    def closure():
        out = model(x)
        return _ctc_loss(out, y), out

    for _ in range(3):
        opt.step(closure)
    assert _ctc_loss(model(x), y).item() < f0


# ------------------------------------------------------------------------------------------
# complex exponentials and torch.fft, parameters in a ParameterDict; DeepSets in a ModuleDict
# ------------------------------------------------------------------------------------------
class _Oscillators(nn.Module):
    """Σ_k a_k e^{−γ_k t} cos(ω_k t + φ_k) as the real part of complex exponentials."""

    def __init__(self) -> None:
        super().__init__()
        f64 = dict(dtype=torch.float64)
        self.p = nn.ParameterDict(
            {
                "log_gamma": nn.Parameter(torch.tensor([-1.5, -2.5], **f64)),
                "omega": nn.Parameter(torch.tensor([2.1, 3.0], **f64)),
                "amp": nn.Parameter(torch.tensor([1.0, 0.5], **f64)),
                "phase": nn.Parameter(torch.tensor([0.2, 1.0], **f64)),
            }
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        s = torch.complex(-self.p["log_gamma"].exp(), self.p["omega"])
        c = self.p["amp"] * torch.exp(1j * self.p["phase"])
        return (c[:, None] * torch.exp(s[:, None] * t[None])).real.sum(0)


def _spectral(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.fft.rfft(out) - torch.fft.rfft(y)).abs().pow(2).mean()


class _DeepSets(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(
            {
                "phi": nn.Sequential(nn.Linear(2, 4), nn.Tanh()),
                "rho": nn.ModuleDict({"hidden": nn.Linear(4, 3), "out": nn.Linear(3, 1)}),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, mask = x[..., :-1], x[..., -1:]
        pooled = (self.nets["phi"](v) * mask).sum(1) / mask.sum(1)
        rho = self.nets["rho"]
        return rho["out"](torch.tanh(rho["hidden"](pooled))).squeeze(-1)


def _osc_case():
    t = torch.linspace(0, 10, 64, dtype=torch.float64)
    y = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return _Oscillators(), _spectral, t, y


def _sets_case():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(5, 4, 2, generator=gen, dtype=torch.float64)
    mask = (torch.arange(4)[None] < torch.tensor([2, 4, 3, 1, 4])[:, None]).double()
    x = torch.cat([v * mask[..., None], mask[..., None]], -1)
    torch.manual_seed(0)
    return _DeepSets().double(), F.mse_loss, x, torch.randn(5, generator=gen, dtype=torch.float64)


def _dense(model, loss_fn, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(th):
        par = {n: c.view(s) for n, c, s in zip(names, th.split(sizes), shapes, strict=True)}
        return functional_call(model, par, (x,))

    H = torch.autograd.functional.hessian(lambda th: loss_fn(outputs(th), y), theta)
    o = outputs(theta).detach()
    J = torch.autograd.functional.jacobian(outputs, theta).reshape(o.numel(), -1)
    Hl = torch.autograd.functional.hessian(lambda u: loss_fn(u.view_as(o), y), o.reshape(-1))
    return H.numpy(), (J.T @ Hl @ J).numpy(), J.numpy()


@pytest.mark.parametrize("case", [_osc_case, _sets_case], ids=["oscillators", "deepsets"])
def test_operators_match_dense_float64(case):
    model, loss_fn, x, y = case()
    H, G, J = _dense(model, loss_fn, x, y)
    V = np.random.default_rng(1).standard_normal((H.shape[0], 2))
    np.testing.assert_allclose(HessianLinearOperator(model, loss_fn, (x, y)).matmat(V), H @ V,
                               **EXACT)  # fmt: skip
    Gop = GGNLinearOperator(model, loss_fn, (x, y))
    np.testing.assert_allclose(Gop.matmat(V), G @ V, **EXACT)
    np.testing.assert_allclose(Gop.rmatvec(V[:, 0]), G.T @ V[:, 0], **EXACT)
    Jop = JacobianLinearOperator(model, x)
    w = np.random.default_rng(2).standard_normal(J.shape[0])
    np.testing.assert_allclose(Jop @ V[:, 1], J @ V[:, 1], **EXACT)
    np.testing.assert_allclose(Jop.H @ w, J.T @ w, **EXACT)


# ------------------------------------------------------------------------------------------
# a closure that writes into the parameters
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["lbfgs", "loss_outputs"])
def test_closure_that_modifies_a_parameter_is_refused(style):
    model, loss_fn, x, y = _sets_case()
    opt = HessianFree(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    first = next(model.parameters())

    def closure():
        with torch.no_grad():
            first.clamp_(-0.1, 0.1)  # a projection a user meant to apply after the step
        out = model(x)
        if style == "loss_outputs":
            return loss_fn(out, y), out
        opt.zero_grad()
        loss = loss_fn(out, y)
        loss.backward()
        return loss

    # main: accepted, the clamp and the step mixed
    with pytest.raises(ValueError, match=r"modified `param_groups\[0\]\['params'\]\[0\]`"):
        opt.step(closure)
    expect = [before[0].clamp(-0.1, 0.1), *before[1:]]  # the closure's change, nothing else
    assert all(torch.equal(a, p) for a, p in zip(expect, model.parameters(), strict=True))
    assert opt.state_dict()["state"][0]["step"] == 0  # no step was counted


def test_embedding_max_norm_is_refused_with_the_way_out():
    # nn.Embedding(max_norm=...) renormalizes looked-up rows in place in every forward: the
    # same write as a clamp in the closure; the error names the module's option and the fix
    torch.manual_seed(0)
    emb, lin = nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 1)
    with torch.no_grad():
        emb.weight.mul_(3.0)  # rows above max_norm, so the forward renormalizes them
    before = [p.detach().clone() for p in (*emb.parameters(), *lin.parameters())]
    x, y = torch.randint(0, 10, (32,)), torch.randn(32, 1)
    opt = HessianFree([*emb.parameters(), *lin.parameters()])

    def closure():
        out = lin(emb(x))
        return F.mse_loss(out, y), out

    with pytest.raises(ValueError, match=r"nn\.Embedding\(max_norm=\.\.\.\)"):
        opt.step(closure)
    rows = before[0][x.unique()]  # what the forward did: looked-up rows scaled to norm 1
    renormed = rows / rows.norm(dim=1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(emb.weight[x.unique()], renormed, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, p) for a, p in zip(before[1:], lin.parameters(), strict=True))


def test_closure_that_reassigns_parameter_storage_is_not_refused():
    """A write into new memory (what a cuDNN RNN's ``flatten_parameters`` does to its weights,
    values unchanged) is no modification of the values the step is about."""
    model, loss_fn, x, y = _sets_case()
    opt = HessianFree(model.parameters())
    first = next(model.parameters())

    def closure():
        with torch.no_grad():
            first.set_(first.detach().clone())
        out = model(x)
        return loss_fn(out, y), out

    opt.step(closure)
    assert opt.last_step.accepted


# ------------------------------------------------------------------------------------------
# parameter groups: the offending parameter named
# ------------------------------------------------------------------------------------------
def test_parameter_in_two_groups_is_named():
    model = _DeepSets()
    params = list(model.parameters())
    # main: torch's "some parameters appear in more than one parameter group", unnamed
    match = (
        r"`param_groups\[1\]\['params'\]\[1\]` \(shape \(4,\)\) appears in more than one "
        r"parameter group: it is already `param_groups\[0\]\['params'\]\[1\]`"
    )
    with pytest.raises(ValueError, match=match):
        HessianFree([{"params": params}, {"params": [nn.Parameter(torch.zeros(2)), params[1]]}])


def test_non_leaf_parameter_is_named():
    w = torch.ones(3, requires_grad=True)
    # main: torch's "can't optimize a non-leaf Tensor", unnamed
    with pytest.raises(ValueError, match=r"`param_groups\[0\]\['params'\]\[1\]` \(shape \(3,\)\) "
                       r"is a non-leaf tensor.*MulBackward0"):  # fmt: skip
        HessianFree([w, w * 2])
