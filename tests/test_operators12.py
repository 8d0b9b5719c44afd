"""The SciPy operators under uses no earlier round tried (operators12), each against an oracle.

Oracles: explicit float64 Hessians of the loss on all the data (``torch.autograd.functional``
through ``torch.func.functional_call``), SciPy's and numpy's functions on the dense matrix
(``onenormest``, ``expm``, ``eigvalsh``), and numpy's two-pass standard deviation of the same
probes. Every test is seeded and takes well under a second.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian
from torch.func import functional_call

from hessfree.spectral import hutchinson_diagonal


def _mlp(*layers: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), *layers, nn.Tanh(), nn.Linear(4, 2)).double()


def _data(rows: int = 10) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(rows, 3, generator=g, dtype=torch.float64),
        torch.randn(rows, 2, generator=g, dtype=torch.float64),
    )


def _dense_hessian(model: nn.Module, inputs: object, y: Tensor, buffers: dict) -> np.ndarray:
    """Float64 Hessian of ``mse(model(inputs), y)`` in ``model.parameters()`` order, the
    buffers given explicitly (so a train-mode BatchNorm normalises by ``inputs`` alone)."""
    named = {k: v.detach() for k, v in model.named_parameters()}
    shapes, sizes = [p.shape for p in named.values()], [p.numel() for p in named.values()]
    theta = torch.cat([p.reshape(-1) for p in named.values()])

    def loss(t: Tensor) -> Tensor:
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        state = dict(zip(named, parts, strict=True)) | {k: v.clone() for k, v in buffers.items()}
        return F.mse_loss(functional_call(model, state, (inputs,)), y)

    return hessian(loss, theta).numpy()


def _full(op: sla.LinearOperator) -> np.ndarray:
    return op @ np.eye(op.shape[1])


# --------------------------------------------------------------------------------------------
# Defects (each test fails on main 5f60056)
# --------------------------------------------------------------------------------------------
def test_operators12_diagonal_standard_error_survives_a_dominant_diagonal() -> None:
    # main: the sum of squares minus m * mean^2 cancelled: standard errors of 0 or 61x the
    # probes' own standard deviation for a diagonal 1e8 with off-diagonal entries ~1e-2
    n, m, batch = 6, 64, 8
    off = np.random.default_rng(0).standard_normal((n, n)) * 1e-2
    off = off + off.T
    np.fill_diagonal(off, 0.0)
    A = np.diag(np.full(n, 1e8)) + off
    est = hutchinson_diagonal(A, num_probes=m, seed=0, batch_size=batch)
    rng = np.random.default_rng(0)  # the same Rademacher probes, drawn as the estimator does
    Z = np.concatenate([rng.integers(0, 2, (batch, n)) * 2 - 1 for _ in range(m // batch)]).T
    samples = Z * (A @ Z)
    np.testing.assert_allclose(est.std_error, samples.std(axis=1, ddof=1) / np.sqrt(m), rtol=1e-6)
    np.testing.assert_allclose(est.estimate, samples.mean(axis=1), rtol=1e-15)
