"""leftovers19: the numbers behind experiments/README.md's section (one thread).

    python experiments/_leftovers19.py [state|deflate|dense|buffer]

``state``: dtypes of the state entries after save -> load -> save. ``deflate``: SLQ's spread
of tr H^2 on an indefinite MLP Hessian with no, top, bottom and both-end deflation (oracle:
the dense Hessian's ``eigvalsh``). ``dense``: products of ``bottom_eigenpairs`` on a clustered
bottom with ``max_dense`` at and below n. ``buffer``: a parent rebinding an uncalled child's
buffer, against a deepcopy run forward once.
"""

from __future__ import annotations

import copy
import io
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator
from torch import nn

import hessfree
from hessfree import spectral


def state() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2)

    def closure():
        out = net(x)
        return F.mse_loss(out, y), out

    opt = hessfree.HessianFree(net.parameters(), curvature="fisher_mc")
    for _ in range(3):
        opt.step(closure)
    saved = opt.state_dict()
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    fresh = hessfree.HessianFree(net.parameters(), curvature="fisher_mc")
    fresh.load_state_dict(torch.load(buf))
    again = fresh.state_dict()["state"][0]
    for key, value in saved["state"][0].items():
        if isinstance(value, torch.Tensor):
            print(f"{key:12s} saved {value.dtype} -> reloaded {again[key].dtype}")


def _table(A: object, exact: float, pairs: tuple, title: str) -> None:
    top, bottom = pairs
    cases = {
        "none (gaussian)": dict(probes="gaussian"),
        "num_deflated=5 (top)": dict(num_deflated=5),
        "deflate=bottom 5": dict(deflate=bottom),
        "deflate=(top 5, bottom 5)": dict(deflate=(top, bottom)),
    }
    print(f"{title}; tr A^2 = {exact:.6g}, 30 probes x 20 steps")
    print("| deflation | estimate | error | std_error | products |")
    print("|---|---|---|---|---|")
    for label, kw in cases.items():
        sd = spectral.spectral_density(A, 30, 20, seed=0, **kw)
        t = sd.trace(np.square)
        print(
            f"| {label} | {t.estimate:.6g} | {t.estimate - exact:+.3g} | {t.std_error:.3g} "
            f"| {t.num_matvecs} |"
        )


def deflate() -> None:
    # a dense matrix: bulk U(-1, 1), five outliers at each end (an indefinite Hessian's shape)
    rng = np.random.default_rng(0)
    n = 200
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate(
        [rng.uniform(-1, 1, n - 10), [50.0, 40, 30, 20, 10], [-60.0, -45, -35, -25, -12]]
    )
    A = (Q * lam) @ Q.T
    A = (A + A.T) / 2
    ev = np.linalg.eigvalsh(A)
    pairs = (spectral.top_eigenpairs(A, 5), spectral.bottom_eigenpairs(A, 5))
    _table(A, float((ev**2).sum()), pairs, f"dense n = {n}, outliers +-10..60")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    x = torch.randn(60, 4, dtype=torch.float64)
    y = 3 * torch.randn(60, 3, dtype=torch.float64)  # far from a fit: H indefinite
    H = hessfree.HessianLinearOperator(model, nn.MSELoss(), (x, y))
    dense = H @ np.eye(H.shape[0])
    ev = np.linalg.eigvalsh((dense + dense.T) / 2)
    exact = float((ev**2).sum())
    print(
        f"n = {H.shape[0]}, eigenvalues {ev[0]:.3g} .. {ev[-1]:.3g}, {int((ev < 0).sum())} "
        f"negative; tr H^2 = {exact:.6g}"
    )
    pairs = (spectral.top_eigenpairs(H, 5), spectral.bottom_eigenpairs(H, 5))
    _table(H, exact, pairs, "4-12-3 tanh MLP, MSE, targets 3 N(0, 1)")


class _Counted(LinearOperator):
    def __init__(self, M: np.ndarray) -> None:
        super().__init__(M.dtype, M.shape)
        self.M, self.count = M, 0

    def _matvec(self, x):
        self.count += 1
        return self.M @ x

    def _matmat(self, X):
        self.count += X.shape[1]
        return self.M @ X


def dense() -> None:
    n = 60
    rng = np.random.default_rng(0)
    d = np.concatenate([1e-7 * (1 + 1e-3 * np.arange(5)), rng.uniform(0.1, 1.0, n - 5)])
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    M = (Q * d) @ Q.T
    M = (M + M.T) / 2
    for cap in (n, n - 1):
        op = _Counted(M)
        try:
            got = spectral.bottom_eigenpairs(op, 2, max_dense=cap).values
            result = f"off the diagonal by {np.abs(got - np.sort(d)[:2]).max():.1e}"
        except ArpackNoConvergence:
            result = "ArpackNoConvergence"
        print(f"max_dense = {cap}: {op.count} products, {result}")


def buffer() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("avg", torch.zeros(5, dtype=torch.float64))

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stats = Holder()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            if self.training:
                self.stats.avg = 0.9 * self.stats.avg + 0.1 * x.detach().mean(0)
            return self.net(x - self.stats.avg)

    torch.manual_seed(0)
    model = Parent().double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64) + 0.5
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()
    opt = hessfree.HessianFree(model.parameters())

    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out

    for step in range(3):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure)
        off = float((model.stats.avg - twin.stats.avg).abs().max())
        print(
            f"step {step}: {opt.last_step.closure_calls} closure calls, |avg - oracle| = {off:.3g}"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    parts = {"state": state, "deflate": deflate, "dense": dense, "buffer": buffer}
    for name in sys.argv[1:] or list(parts):
        print(f"== {name}")
        parts[name]()
