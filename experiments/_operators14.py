"""operators14: the curvature operators and hessfree.spectral under uses nobody had tried.

Prints each finding of experiments/README.md "operators14 (2026-12-04)" with its oracle:
complex outputs against dense float64 Hessians/Jacobians, the Monte-Carlo Fisher on the real
view against the GGN, what eigsh does with a v0 of n + 1 entries, spectral_norm's drift in
training mode. Run from the repository root:

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_operators14.py
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as sla
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian

import hessfree as hf
from hessfree import spectral

torch.set_num_threads(1)


def _refusal(build: object) -> str:
    try:
        build()
    except (TypeError, ValueError, RuntimeError) as err:
        return f"{type(err).__name__}: {str(err)[:110]}..."
    return "accepted"


def views() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    w = model.weight
    print(
        "params=[w, w.view(-1)]:",
        _refusal(
            lambda: hf.HessianLinearOperator(model, nn.MSELoss(), (x, y), params=[w, w.view(-1)])
        ),
    )


def complex_outputs() -> None:
    torch.manual_seed(4)
    lin = nn.Linear(3, 4).double()
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.complex128)
    params = list(lin.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def model(inputs: torch.Tensor) -> torch.Tensor:
        o = lin(inputs)
        return torch.complex(o[:, :2], o[:, 2:])

    def loss_fn(o: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((o - target).abs() ** 2).mean()

    def outputs_at(f: torch.Tensor) -> torch.Tensor:
        o = x @ f[:12].view(4, 3).T + f[12:]
        return torch.complex(o[:, :2], o[:, 2:])

    eye = np.eye(16)
    Hd = hessian(lambda f: loss_fn(outputs_at(f), t), flat).numpy()
    H = hf.HessianLinearOperator(model, loss_fn, (x, t), params=params) @ eye
    real = lambda f: torch.view_as_real(outputs_at(f)).reshape(-1)  # noqa: E731
    Jd = jacobian(real, flat)
    Hl = hessian(lambda r: loss_fn(torch.view_as_complex(r.view(5, 2, 2)), t), real(flat))
    G = hf.GGNLinearOperator(model, loss_fn, (x, t), params=params) @ eye
    print(
        f"complex outputs: |H - dense| {np.abs(H - Hd).max():.1e}, "
        f"|G - J^T H_l J| {np.abs(G - (Jd.T @ Hl @ Jd).numpy()).max():.1e}"
    )
    print(
        "MC Fisher, complex outputs:",
        _refusal(lambda: hf.MCFisherLinearOperator(model, loss_fn, (x, t), params=params, seed=0)),
    )
    xs = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ts = torch.view_as_real(
        torch.randn(64, 2, dtype=torch.complex128, generator=torch.Generator().manual_seed(6))
    )
    rv = lambda inputs: torch.view_as_real(model(inputs))  # noqa: E731
    Gr = hf.GGNLinearOperator(rv, nn.MSELoss(), (xs, ts), params=params) @ eye
    for seeds in (1, 5, 20):
        mean = np.mean(
            [
                hf.MCFisherLinearOperator(
                    rv, nn.MSELoss(), (xs, ts), params=params, seed=s, mc_samples=50
                )
                @ eye
                for s in range(seeds)
            ],
            axis=0,
        )
        err = np.abs(mean - Gr).max() / np.abs(Gr).max()
        print(
            f"  real view + MSELoss, {seeds:2d} seeds x 50 samples: max|mean - G|/max|G| {err:.4f}"
        )


def eigsh_v0() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    H = hf.HessianLinearOperator(model, nn.MSELoss(), (x, y))
    n, lengths = H.shape[0], set()
    product = H._mv
    H._mv = lambda v: (lengths.add(v.numel()), product(v))[1]
    for size in (n - 1, n + 1):
        values = sla.eigsh(H, k=2, v0=np.ones(size), return_eigenvectors=False)
        print(f"eigsh v0 of {size} entries (n = {n}): {values}, matvec saw lengths {lengths}")


def zero_operator() -> None:
    torch.manual_seed(7)
    first, second = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
    nn.init.constant_(first.bias, -100.0)
    model = nn.Sequential(first, nn.ReLU(), second)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    G = hf.GGNLinearOperator(model, nn.MSELoss(), (x, y), params=[first.weight])
    print("top_eigenpairs of a dead-ReLU GGN:", _refusal(lambda: spectral.top_eigenpairs(G, 2)))


def spectral_norm_drift() -> None:
    torch.manual_seed(8)
    lin = nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3).double())
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    H = hf.HessianLinearOperator(lin, nn.MSELoss(), (x, y), cache_graph=False)
    eye = np.eye(H.shape[0])
    first = H @ eye
    for passes in (1, 10):
        for _ in range(passes - 1):
            H @ eye
        print(
            f"spectral_norm in train mode, uncached, after {passes} more pass(es): "
            f"max|A_now - A_first| {np.abs(H @ eye - first).max():.1e}"
        )
    lin.eval()
    He = hf.HessianLinearOperator(lin, nn.MSELoss(), (x, y), cache_graph=False)
    print(f"  eval mode: max|A - A| {np.abs(He @ eye - He @ eye).max():.1e}")


if __name__ == "__main__":
    views()
    complex_outputs()
    eigsh_v0()
    zero_operator()
    spectral_norm_drift()
