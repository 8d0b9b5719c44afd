"""How users drive the operators and the optimizer (unseen9): workflow misuse, with oracles.

Each product is checked against an explicit float64 matrix of the loss on all the data
(``torch.autograd.functional`` through ``torch.func.functional_call``), never against
hessfree's own products.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from hessfree import (
    GGNLinearOperator,
    HessianFree,
    HessianLinearOperator,
    HessianProduct,
    hvp,
    twice_differentiable_weight_norm,
)

EXACT = dict(rtol=1e-10, atol=1e-12)


def _dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2)).double()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(8, 3, generator=g, dtype=torch.float64),
        torch.randn(8, 2, generator=g, dtype=torch.float64),
    )


def _dense(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, np.ndarray]:
    """Float64 Hessian and Gauss-Newton matrix of the mean squared error of the eval-mode
    model on all of ``x`` (its dropout off)."""
    named = dict(model.named_parameters())
    shapes, sizes = [p.shape for p in named.values()], [p.numel() for p in named.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def f(t: Tensor) -> Tensor:
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        return functional_call(model, dict(zip(named, parts, strict=True)), (x,))

    out = f(theta).detach()
    J = jacobian(lambda t: f(t).reshape(-1), theta)
    HL = hessian(lambda o: F.mse_loss(o.view_as(out), y), out.reshape(-1))
    H = hessian(lambda t: F.mse_loss(f(t), y), theta)
    return dict(H=H.numpy(), G=(J.T @ HL @ J).numpy())


@pytest.mark.parametrize(
    "kind, batches", [("G", 2), ("H", 1)], ids=["ggn-two-batches", "hessian-uncached"]
)
def test_an_operator_refuses_products_once_the_model_is_back_in_training_mode(kind, batches):
    # The constructor refuses train-mode Dropout; a model.train() after it (a training loop
    # between two eigsh calls) made every uncached product draw another dropout mask, silently.
    model, (x, y) = _dropout_mlp().eval(), _data()
    data = (x, y) if batches == 1 else list(zip(x.split(4), y.split(4), strict=True))
    cls = GGNLinearOperator if kind == "G" else HessianLinearOperator
    op = cls(model, nn.MSELoss(), data, cache_graph=False)
    v = np.random.default_rng(0).standard_normal(op.shape[0])
    model.train()
    with pytest.raises(
        RuntimeError, match=r"1 \(Dropout\).*training mode after the operator was built"
    ):
        op @ v
    with pytest.raises(RuntimeError, match="model.eval()"):
        op.gradient()
    model.eval()
    np.testing.assert_allclose(op @ v, _dense(model, x, y)[kind] @ v, **EXACT)


def _weight_norm_case() -> tuple[nn.Module, Tensor, Tensor, Tensor, np.ndarray]:
    """An MLP whose first layer has ``parametrizations.weight_norm`` (dim 0), its data, and
    the dense float64 Hessian of its mean squared error written by hand: w = g v / ‖v‖ by
    rows, never through torch's weight-norm op."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    nn.utils.parametrizations.weight_norm(model[0])
    x, y = _data()
    params = list(model.parameters())  # bias, g (4, 1), v (4, 3), weight, bias
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(t: Tensor) -> Tensor:
        b0, g, v, w1, b1 = (c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True))
        w0 = g * v / v.pow(2).sum(1, keepdim=True).sqrt()
        return F.mse_loss(torch.tanh(x @ w0.T + b0) @ w1.T + b1, y)

    return model, x, y, theta, hessian(loss, theta).numpy()


def test_hessian_products_through_weight_norm_match_the_hand_written_hessian():
    # torch's fused weight-norm kernel has a wrong double backward (gradgradcheck fails for
    # dim 0): every Hessian product through it was off, by up to 1.1 here
    model, x, y, _, H = _weight_norm_case()
    op = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    V = np.random.default_rng(0).standard_normal((op.shape[0], 3))
    np.testing.assert_allclose(op @ V, H @ V, **EXACT)


def test_hessian_free_on_weight_norm_takes_the_newton_step_of_the_hand_written_hessian():
    # An LBFGS-style closure: HessianFree uses the exact Hessian. With a large damping λ the
    # step is -(H + λI)^{-1} g, solved densely from the hand-written Hessian.
    model, x, y, theta, H = _weight_norm_case()
    g = torch.cat(
        [p.reshape(-1) for p in torch.autograd.grad(F.mse_loss(model(x), y), [*model.parameters()])]
    )
    lam = 10.0
    opt = HessianFree(
        model.parameters(),
        damping=lam,
        adapt_damping=False,
        cg_max_iter=200,
        cg_rtol=1e-12,
        backtrack=False,
        line_search=None,
        precond=None,
        trust_radius=False,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    step = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - theta
    expected = -np.linalg.solve(H + lam * np.eye(len(H)), g.numpy())
    np.testing.assert_allclose(step.numpy(), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("style", ["lbfgs", "loss-outputs"])
def test_embedding_bag_is_refused_with_the_layer_to_use_instead_and_nothing_moves(style):
    # torch differentiates F.embedding_bag once only; main raised torch's bare
    # "the derivative for '_embedding_bag_backward' is not implemented" (LBFGS-style
    # closure) or advised Hessian curvature, which fails the same way
    torch.manual_seed(0)
    bag, head = nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 2)
    x, y = torch.randint(0, 10, (16, 5)), torch.randn(16, 2)
    opt = HessianFree([*bag.parameters(), *head.parameters()])
    before = [p.detach().clone() for p in (*bag.parameters(), *head.parameters())]

    def closure():
        out = head(torch.tanh(bag(x)))
        loss = F.mse_loss(out, y)
        if style == "lbfgs":
            opt.zero_grad()
            loss.backward()
            return loss
        return loss, out

    with pytest.raises(NotImplementedError, match=r"_embedding_bag_backward.*use nn\.Embedding"):
        opt.step(closure)
    after = [*bag.parameters(), *head.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_cdist_below_its_matmul_threshold_is_refused_with_the_compute_mode_that_works():
    # torch.cdist on at most 25 rows takes a kernel torch differentiates once; the error now
    # names compute_mode='use_mm_for_euclid_dist', and with it the Hessian matches the dense one
    torch.manual_seed(0)
    centers = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    x, y = _data()

    def model(mode: str) -> nn.Module:
        class RBF(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.c = centers

            def forward(self, z: Tensor) -> Tensor:
                return torch.exp(-(torch.cdist(z, self.c, compute_mode=mode) ** 2))[:, :2]

        return RBF()

    with pytest.raises(NotImplementedError, match="_cdist_backward.*use_mm_for_euclid_dist"):
        HessianLinearOperator(
            model("use_mm_for_euclid_dist_if_necessary"), nn.MSELoss(), (x, y)
        ) @ np.ones(12)
    fixed = model("use_mm_for_euclid_dist")

    def loss(c: Tensor) -> Tensor:
        return F.mse_loss(torch.exp(-((x[:, None] - c[None]) ** 2).sum(-1))[:, :2], y)

    H = hessian(loss, centers.detach()).reshape(12, 12).numpy()
    v = np.random.default_rng(0).standard_normal(12)
    np.testing.assert_allclose(
        HessianLinearOperator(fixed, nn.MSELoss(), (x, y)) @ v, H @ v, **EXACT
    )


def _flat_weight_norm_loss(model: nn.Module, x: Tensor, y: Tensor):
    """The MSE of ``model`` as a function of its flat parameters, evaluated by the model
    itself (so through torch's fused weight-norm kernel, unless guarded)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(t: Tensor) -> Tensor:
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        return F.mse_loss(functional_call(model, dict(zip(names, parts, strict=True)), (x,)), y)

    return f


def test_hvp_and_from_function_through_weight_norm_match_the_hand_written_hessian():
    # hvp and HessianLinearOperator.from_function evaluate f themselves: they guard it as the
    # closures do (main: off by the fused kernel's wrong double backward)
    model, x, y, theta, H = _weight_norm_case()
    f = _flat_weight_norm_loss(model, x, y)
    v = torch.from_numpy(np.random.default_rng(1).standard_normal(theta.numel()))
    np.testing.assert_allclose(hvp(f, theta, v).numpy(), H @ v.numpy(), **EXACT)
    op = HessianLinearOperator.from_function(f, theta)
    np.testing.assert_allclose(op @ v.numpy(), H @ v.numpy(), **EXACT)


def test_hessian_product_of_a_loss_built_through_fused_weight_norm_is_refused():
    # a loss the user computed: its graph is already the fused kernel's, so the product would
    # be silently wrong; refused with the guard, under which it matches the hand-written one
    model, x, y, theta, H = _weight_norm_case()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="twice_differentiable_weight_norm"):
        HessianProduct(F.mse_loss(model(x), y), params)
    with twice_differentiable_weight_norm():
        loss = F.mse_loss(model(x), y)
    v = torch.from_numpy(np.random.default_rng(2).standard_normal(theta.numel()))
    np.testing.assert_allclose(HessianProduct(loss, params)(v).numpy(), H @ v.numpy(), **EXACT)
