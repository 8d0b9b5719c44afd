"""Small, self-seeding model/loss cases with dense float64 oracles.

Each case builds a model, a batch and a loss function; :func:`dense` turns a case into explicit
Hessian, Jacobian, Gauss-Newton and empirical-Fisher matrices with ``torch.autograd.functional``
(independent of the code under test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


class UnrolledRNN(nn.Module):
    """A tanh RNN cell unrolled over the time dimension, read out at the last step."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int) -> None:
        super().__init__()
        self.cell = nn.RNNCell(n_in, n_hidden, nonlinearity="tanh")
        self.readout = nn.Linear(n_hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, T, n_in)
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.readout(h)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 2 * 2, 4)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, 1, 6, 6)
        h = F.max_pool2d(torch.tanh(self.conv(x)), 2)
        return self.fc(h.flatten(1))


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], tuple[nn.Module, Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]]
    seed: int = 0

    def build(self, dtype: torch.dtype = torch.float64, device: str = "cpu"):
        """Return ``(model, x, y, loss_fn)`` in ``dtype`` on ``device``, seeded."""
        torch.manual_seed(self.seed)
        model, x, y, loss_fn = self.make()
        model = model.to(dtype=dtype, device=device)
        x = x.to(dtype=dtype, device=device)
        y = y.to(device=device, dtype=dtype if y.is_floating_point() else y.dtype)
        return model, x, y, loss_fn


def _mlp(act: type[nn.Module], n_in: int, n_hidden: int, n_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, n_hidden), act(), nn.Linear(n_hidden, n_out))


CASES = [
    Case(
        "mlp_tanh_mse",
        lambda: (_mlp(nn.Tanh, 4, 6, 3), torch.randn(5, 4), torch.randn(5, 3), F.mse_loss),
    ),
    Case(
        "mlp_relu_ce",
        lambda: (
            _mlp(nn.ReLU, 4, 6, 3),
            torch.randn(7, 4),
            torch.randint(0, 3, (7,)),
            F.cross_entropy,
        ),
        seed=1,
    ),
    Case(
        "mlp_sigmoid_bce_sum",
        lambda: (
            _mlp(nn.Sigmoid, 5, 4, 5),
            torch.rand(6, 5),
            torch.rand(6, 5),
            lambda o, t: F.binary_cross_entropy_with_logits(o, t, reduction="sum") / o.shape[0],
        ),
        seed=2,
    ),
    Case(
        "cnn_ce",
        lambda: (SmallCNN(), torch.randn(4, 1, 6, 6), torch.randint(0, 4, (4,)), F.cross_entropy),
        seed=3,
    ),
    Case(
        "rnn_mse",
        lambda: (
            UnrolledRNN(2, 4, 1),
            torch.randn(5, 3, 2),
            torch.randn(5, 1),
            nn.MSELoss(reduction="sum"),
        ),
        seed=4,
    ),
]


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def functional(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``(theta_flat, x) -> model outputs`` with the parameters taken from ``theta_flat``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(theta: Tensor, x: Tensor) -> Tensor:
        parts = [c.view(s) for c, s in zip(theta.split(sizes), shapes, strict=False)]
        return functional_call(model, dict(zip(names, parts, strict=False)), (x,))

    return f


@dataclass(frozen=True)
class Dense:
    H: Tensor  # Hessian of the loss
    J: Tensor  # Jacobian of the flattened outputs
    G: Tensor  # generalized Gauss-Newton J^T H_L J
    F: Tensor  # empirical Fisher c * sum_i g_i g_i^T for loss = c * sum_i l_i
    g: Tensor  # gradient
    reduction: str  # "mean" (c = 1/N) or "sum" (c = 1)


def dense(model: nn.Module, x: Tensor, y: Tensor, loss_fn) -> Dense:
    """Explicit float64 curvature matrices of ``loss_fn(model(x), y)`` w.r.t. the parameters."""
    from torch.autograd.functional import hessian, jacobian

    f = functional(model)
    theta = flat_params(model)
    out = f(theta, x).detach()

    def loss_of_theta(t: Tensor) -> Tensor:
        return loss_fn(f(t, x), y)

    H = hessian(loss_of_theta, theta)
    J = jacobian(lambda t: f(t, x).reshape(-1), theta)
    HL = hessian(lambda o: loss_fn(o.view_as(out), y), out.reshape(-1))
    G = J.T @ HL @ J
    g = torch.autograd.functional.jacobian(loss_of_theta, theta)
    # Per-example losses l_i = loss_fn(example i alone); the batch loss is c * sum_i l_i with
    # c = 1/N for mean-type losses and c = 1 for sum-type ones.
    N = x.shape[0]
    Gi = torch.stack(
        [
            jacobian(lambda t, i=i: loss_fn(f(t, x[i : i + 1]), y[i : i + 1]), theta)
            for i in range(N)
        ]
    )
    total = sum(loss_fn(out[i : i + 1], y[i : i + 1]) for i in range(N))
    c = float(loss_fn(out, y) / total)
    reduction = "sum" if abs(c - 1) < 1e-9 else "mean"
    assert reduction == "sum" or abs(c * N - 1) < 1e-9, c
    return Dense(H=H, J=J, G=G, F=c * (Gi.T @ Gi), g=g, reduction=reduction)
