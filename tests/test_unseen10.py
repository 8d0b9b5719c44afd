"""Model families and parameter kinds no earlier pass had tried (unseen10).

Oracles: the same optimizer on the model without its empty layer (an empty parameter adds
nothing to the objective), the loss evaluated the way ``torch.optim.LBFGS`` evaluates it
(autograd on), and explicit float64 Hessians and Gauss-Newton matrices from
``torch.autograd.functional``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from hessfree import (
    FisherLinearOperator,
    GGNLinearOperator,
    HessianFree,
    HessianLinearOperator,
    ParamLayout,
)

EXACT = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ a layer with no weights


class _WithEmptyHead(nn.Module):
    """An MLP whose auxiliary head has zero outputs (``nn.Linear(4, 0)``, a configurable
    head switched off), concatenated to the main output: the same function as without it."""

    def __init__(self, empty: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.main = nn.Linear(4, 2)
        if empty:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors"
                self.aux = nn.Linear(4, 0)
        self.empty = empty

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return torch.cat([self.main(h), self.aux(h)], -1) if self.empty else self.main(h)


def _steps(model: nn.Module, style: str, n: int = 3) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = torch.randn(32, 2, generator=g, dtype=torch.float64)
    model = model.double()
    opt = HessianFree(model.parameters())

    def lbfgs_style() -> Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    def loss_outputs() -> tuple[Tensor, Tensor]:
        out = model(x)
        return F.mse_loss(out, y), out

    for _ in range(n):
        opt.step(lbfgs_style if style == "hess" else loss_outputs)
        assert opt.last_step.status == "accepted"
    return [p.detach().clone() for p in model.parameters() if p.numel()]


@pytest.mark.parametrize("style", ["hess", "loss-outputs"])
def test_a_zero_size_linear_layer_steps_as_the_model_without_it(style):
    # precond='auto' recorded the empty nn.Linear as a K-FAC layer and failed on it
    # (IndexError reading its first row; with the row read fixed, a reshape of 0 elements).
    with_empty = _steps(_WithEmptyHead(empty=True), style)
    without = _steps(_WithEmptyHead(empty=False), style)
    assert len(with_empty) == len(without)
    for a, b in zip(with_empty, without, strict=True):
        torch.testing.assert_close(a, b, **EXACT)


# ------------------------------------------------------------------ attention's fast path


class _PaddedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1)  # enable_nested_tensor=True, torch's default
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # a mean over every position, padded ones included (what many users write)
        return self.head(self.enc(x, src_key_padding_mask=mask).mean(1)).squeeze(-1)


def test_trial_losses_of_an_eval_mode_encoder_are_the_loss_autograd_sees():
    # In eval mode without autograd torch takes attention's fast path: an encoder with a
    # right-padded mask returns zeros at padded positions (nested tensors), where the
    # graph-building call at θ returns attention outputs. HF's trial losses (no_grad) came
    # from another function than f(θ): on main loss_after was 0.767 where autograd sees 0.780
    # (first step), and 12 of 15 steps failed their line search (experiments, "unseen10").
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, 8, generator=g, dtype=torch.float64)
    lengths = torch.randint(2, 7, (32,), generator=g)
    mask = torch.arange(6)[None, :] >= lengths[:, None]
    y = torch.randn(32, generator=g, dtype=torch.float64)
    model = _PaddedEncoder().double().eval()
    opt = HessianFree(model.parameters())

    def closure() -> tuple[Tensor, Tensor]:
        out = model(x, mask)
        return F.mse_loss(out, y), out

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(closure)
            with torch.enable_grad():  # as torch.optim.LBFGS evaluates the closure
                seen = F.mse_loss(model(x, mask), y).item()
            assert opt.last_step.loss_after == pytest.approx(seen, rel=1e-12)
            assert opt.last_step.status == "accepted"
    assert not caught  # (main: "nested tensors are in prototype stage", from the fast path)
    assert torch.backends.mha.get_fastpath_enabled()  # torch's setting restored


# ------------------------------------------------------------------ operators (guards)


class _DispatchMoE(nn.Module):
    """Top-1 routing: each expert runs on its routed rows only, joined by ``index_add``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(3, 3)
        self.experts = nn.ModuleList(nn.Linear(3, 2) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        top, idx = self.gate(x).topk(1, dim=-1)
        w = torch.sigmoid(top)
        y = x.new_zeros(x.shape[0], 2)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            y = y.index_add(0, rows, w[rows, slot].unsqueeze(-1) * torch.tanh(expert(x[rows])))
        return y


class _TiedAE(nn.Module):
    """The decoder is the encoder's weight, transposed (``F.linear(h, W.t())``)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 2)
        self.dec_bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.sigmoid(self.enc(x)), self.enc.weight.t(), self.dec_bias)


class _Odd(nn.Module):
    """A 0-dim scale, a zero-size head, a non-contiguous weight and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.a.weight = nn.Parameter(self.a.weight.detach().t().contiguous().t())
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.b = nn.Linear(4, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
            self.empty = nn.Linear(4, 0)
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.frozen(torch.tanh(self.a(x))))
        return torch.cat([self.b(h) * self.scale, self.empty(h)], -1)


def _dense(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> dict[str, np.ndarray]:
    """Float64 H and Jᵀ H_ℓ J of ``loss_fn(model(x), y)`` over the trained parameters."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    shapes, sizes = [p.shape for p in named.values()], [p.numel() for p in named.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def f(t: Tensor) -> Tensor:
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        return functional_call(model, dict(zip(named, parts, strict=True)), (x,))

    out = f(theta).detach()
    J = jacobian(lambda t: f(t).reshape(-1), theta)
    HL = hessian(lambda o: loss_fn(o.view_as(out), y), out.reshape(-1))
    H = hessian(lambda t: loss_fn(f(t), y), theta)
    return dict(H=H.numpy(), G=(J.T @ HL @ J).numpy())


@pytest.mark.parametrize("name", ["moe-dispatch", "tied-transpose", "odd-params"])
def test_operators_match_dense_float64_matrices(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    model = {"moe-dispatch": _DispatchMoE, "tied-transpose": _TiedAE, "odd-params": _Odd}[name]()
    model = model.double()
    y = torch.rand(10, 3 if name != "moe-dispatch" else 2, generator=g, dtype=torch.float64)
    loss_fn = F.binary_cross_entropy_with_logits if name == "tied-transpose" else F.mse_loss
    ref = _dense(model, loss_fn, x, y)
    for kind, cls in (("H", HessianLinearOperator), ("G", GGNLinearOperator)):
        op = cls(model, loss_fn, (x, y))
        np.testing.assert_allclose(op @ np.eye(op.shape[0]), ref[kind], **EXACT)


# ------------------------------------------------------------------ label-smoothed sums


def _smoothed_data() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    y[::4] = -100  # ignored rows, as torch's smoothing term masks them too
    return model, x, y


def _summed_smoothed_ce(o: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(o, y, label_smoothing=0.1, reduction="sum")


def _per_example_fisher(model: nn.Module, x: Tensor, y: Tensor) -> np.ndarray:
    """Σ_i ∇ℓ_i ∇ℓ_iᵀ of the summed loss's per-example terms (``torch.func``)."""
    named = dict(model.named_parameters())

    def one(p: dict, xi: Tensor, yi: Tensor) -> Tensor:
        return _summed_smoothed_ce(functional_call(model, p, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(named, x, y)
    G = torch.cat([grads[k].reshape(len(x), -1) for k in named], 1)
    return (G.T @ G).detach().numpy()


def test_a_label_smoothed_summed_cross_entropy_reads_as_a_sum():
    # torch's label-smoothed cross-entropy is two terms of the outputs (NLL + smoothing), which
    # the reduction reading gave up on: main took this sum for a mean, silently, in
    # FisherLinearOperator (the Fisher 12x too large here, no warning) and, with a warning, in
    # HessianFree(curvature='fisher') and K-FAC's scale.
    model, x, y = _smoothed_data()
    oracle = _per_example_fisher(model, x, y)
    with pytest.warns(UserWarning, match="its autograd graph is a sum"):
        FisherLinearOperator(model, _summed_smoothed_ce, (x, y))
    op = FisherLinearOperator(model, _summed_smoothed_ce, (x, y), reduction="sum")
    np.testing.assert_allclose(op @ np.eye(op.shape[0]), oracle, **EXACT)

    opt = HessianFree(model.parameters(), curvature="fisher")

    def closure() -> tuple[Tensor, Tensor]:
        out = model(x)
        return _summed_smoothed_ce(out, y), out

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # main: "cannot tell ... whether it sums or averages"
        opt.step(closure)
    assert opt.last_step.status == "accepted"


# ------------------------------------------------------------------ unused in some steps


@pytest.mark.parametrize("style", ["hess", "loss-outputs"])
def test_a_parameter_unused_in_a_step_does_not_move_in_it(style):
    # A branch the loss skips in this step (an MoE expert no example was routed to) has no
    # gradient and no curvature, so the damped quadratic's minimiser leaves it at 0 (and
    # torch.optim skips a parameter whose .grad is None). On main the warm start carried the
    # previous step's move on: 0.06-0.89x of it per unused step.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = torch.randn(64, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    a, b = nn.Linear(4, 2).double(), nn.Linear(4, 2).double()
    opt = HessianFree([*a.parameters(), *b.parameters()])
    for use_b in (True, False, False, True, False):

        def f(use_b=use_b) -> Tensor:
            return a(x) + b(x) if use_b else a(x)

        def lbfgs_style() -> Tensor:
            opt.zero_grad()
            loss = F.mse_loss(f(), y)
            loss.backward()
            return loss

        def loss_outputs() -> tuple[Tensor, Tensor]:
            out = f()
            return F.mse_loss(out, y), out

        before = [p.detach().clone() for p in b.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 'auto' turns K-FAC off once b stops running
            opt.step(lbfgs_style if style == "hess" else loss_outputs)
        assert opt.last_step.status == "accepted"
        moved = any(not torch.equal(p, q) for p, q in zip(b.parameters(), before, strict=True))
        assert moved == use_b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_warm_start_mask_keeps_the_decay_of_every_dtype(dtype):
    # The zero-gradient mask must not change how the decay scales the blocks that got a
    # gradient: x0 * 0.95 as a Python float, not 0.95 rounded to bfloat16 (0.949...).
    from hessfree.optimizer import _decay_reached

    layout = ParamLayout([torch.zeros(3, 4, dtype=dtype), torch.zeros(5, dtype=dtype)])
    x0 = torch.randn(17, generator=torch.Generator().manual_seed(0)).to(dtype)
    g = torch.randn(17, generator=torch.Generator().manual_seed(1)).to(dtype)
    g[12:] = 0  # the second parameter got no gradient
    got = x0.clone()
    _decay_reached(got, g, layout, 0.95)
    expected = x0.clone().mul_(0.95)
    expected[12:] = 0
    assert torch.equal(got, expected)
