"""spectral17: stochastic Lanczos quadrature in hessfree.spectral, and bottom_eigenpairs' stall.

``bottom`` reruns operators16's stall (``bottom_eigenpairs(G, k=2)`` of the 43-parameter GGN of
a 4-5-3 tanh MLP on 20 examples, float64) and the remedies: a looser ``tol``, shift-invert with
a MINRES ``OPinv`` below the spectrum, the top of ``λ_max I - G``, the dense ``A @ I``; each
with its products, time and error against ``numpy.linalg.eigvalsh``. ``slq`` measures
``spectral_density`` on a 10-32-3 MLP's GGN (451 parameters, cross-entropy on 256 examples):
log det(G + λI) against ``slogdet`` over probes and steps, the density against the smoothed
eigenvalues, and the cost against the dense matrix; ``cost`` times products against Lanczos
on a 101,770-parameter GGN.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_spectral17.py bottom
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_spectral17.py slq
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_spectral17.py cost
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse.linalg as sla
import torch
from torch import nn

from hessfree import GGNLinearOperator
from hessfree.spectral import bottom_eigenpairs, hutchinson_trace, spectral_density


class _Counted(sla.LinearOperator):
    """``op`` counting its products (columns), keeping the first block if ``record``."""

    def __init__(self, op: sla.LinearOperator, record: bool = False) -> None:
        super().__init__(op.dtype, op.shape)
        self.op, self.count, self.record, self.first = op, 0, record, None

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        self.count += 1
        return self.op.matvec(v)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        if self.record and self.first is None:
            self.first = np.array(X)  # spectral_density's first block: its start vectors
        self.count += X.shape[1]
        return self.op.matmat(X)

    _rmatvec = _matvec


def _attempt(name: str, op: _Counted, fn: Callable[[], str]) -> None:
    op.count, start = 0, time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = fn()
        except Exception as err:  # a probe: every outcome is a result
            out = f"!! {type(err).__name__}: {str(err)[:120]}"
    print(f"{name:44s} {out:44s} {op.count:7d} products {time.perf_counter() - start:7.2f} s")


def _stalled_ggn() -> GGNLinearOperator:
    torch.manual_seed(0)  # operators16's _mlp(), to the draw
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    return GGNLinearOperator(model, nn.MSELoss(), (x, y))


def bottom() -> None:
    torch.set_num_threads(1)
    G = _Counted(_stalled_ggn())
    n = G.shape[0]
    ev = np.linalg.eigvalsh(G.op @ np.eye(n))
    print(
        f"load {os.getloadavg()[0]:.1f}; n = {n}; bottom 8: {np.array2string(ev[:8], precision=2)}"
    )
    gap = (ev[1] - ev[0]) / (ev[-1] - ev[0])
    print(f"top 3: {np.array2string(ev[-3:], precision=3)}; (λ2 - λ1) / (λn - λ1) = {gap:.1e}")
    want = ev[:2]

    def off(values: np.ndarray) -> str:
        return f"max off eigvalsh {np.abs(np.sort(values) - want).max():.1e}"

    for tol in (0.0, 1e-10, 1e-6):
        _attempt(
            f"bottom_eigenpairs(G, k=2, tol={tol:g})",
            G,
            lambda tol=tol: off(bottom_eigenpairs(G, k=2, tol=tol).values),
        )
    _attempt(
        "bottom_eigenpairs(..., max_iter=100 n)",
        G,
        lambda: off(bottom_eigenpairs(G, k=2, max_iter=100 * n).values),
    )
    lam_max = ev[-1]
    eye = sla.aslinearoperator(np.eye(n))
    for c in (2.0, 20.0):
        # the same Krylov spaces; only ARPACK's test ‖r‖ <= tol·max(ε^(2/3), |θ|) moves to ~‖A‖
        _attempt(
            f"bottom_eigenpairs(G - {c:g} λmax I) + {c:g} λmax",
            G,
            lambda c=c: off(bottom_eigenpairs(G - c * lam_max * eye, k=2).values + c * lam_max),
        )
    flipped = lam_max * sla.aslinearoperator(np.eye(n)) - G
    _attempt(
        "top of λmax I - G (eigsh LA)",
        G,
        lambda: off(
            lam_max - sla.eigsh(flipped, k=2, which="LA", v0=np.ones(n), return_eigenvectors=False)
        ),
    )
    for shift in (-1e-3 * lam_max, -1e-6 * lam_max):

        def solve(b: np.ndarray, shift: float = shift) -> np.ndarray:
            return sla.minres(G, b, shift=shift, rtol=1e-12, maxiter=10 * n)[0]

        opinv = sla.LinearOperator(G.shape, matvec=solve, dtype=G.dtype)
        _attempt(
            f"eigsh(G, sigma={shift:.1e}, OPinv=minres)",
            G,
            lambda shift=shift, opinv=opinv: off(
                sla.eigsh(
                    G, k=2, sigma=shift, OPinv=opinv, v0=np.ones(n), return_eigenvectors=False
                )
            ),
        )
    _attempt("dense: eigvalsh(G @ I)", G, lambda: off(np.linalg.eigvalsh(G @ np.eye(n))[:2]))
    _attempt(
        "lobpcg(G, largest=False, tol=1e-9)",
        G,
        lambda: off(
            sla.lobpcg(
                G,
                np.random.default_rng(0).standard_normal((n, 2)),
                largest=False,
                tol=1e-9,
                maxiter=500,
            )[0]
        ),
    )


def slq() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    x, y = torch.randn(256, 10, dtype=torch.float64), torch.randint(0, 3, (256,))
    G = GGNLinearOperator(model, nn.CrossEntropyLoss(), (x, y))
    n = G.shape[0]
    start = time.perf_counter()
    Gd = G @ np.eye(n)
    dense_s = time.perf_counter() - start
    ev = np.linalg.eigvalsh(Gd)
    lam = 1e-3 * ev[-1]
    logdet = float(np.sum(np.log(ev + lam)))
    small = np.sum(ev < 1e-3 * ev[-1])
    print(f"load {os.getloadavg()[0]:.1f}; n = {n}; λ_max {ev[-1]:.3g}; λ = {lam:.2g}")
    print(f"G @ I: {dense_s:.2f} s; eigenvalues below λ: {small}; log det(G + λI) = {logdet:.4f}")
    lam_all, Q = np.linalg.eigh(Gd + lam * np.eye(n))
    M = (Q * np.log(lam_all)) @ Q.T
    sd1 = np.sqrt(2 * (np.sum(M**2) - np.sum(np.diag(M) ** 2)))
    print(f"Hutchinson's exact standard deviation, one probe of log(G + λI): {sd1:.3f}")
    print("probes steps   estimate     error  std_error  |err|/se  quadrature  products      s")
    for m, k in ((10, 5), (10, 10), (10, 20), (10, 40), (40, 20), (100, 20)):
        rec = _Counted(G.damped(lam), record=True)
        start = time.perf_counter()
        sd = spectral_density(rec, num_probes=m, num_steps=k, seed=0, batch_size=128)
        est = sd.trace(np.log)
        took = time.perf_counter() - start
        Z = rec.first * np.sqrt(n)  # the probes: Lanczos starts from z / ‖z‖, ‖z‖ = √n
        hutch = float(np.einsum("ij,ij->j", Z, M @ Z).mean())  # the same probes, exact forms
        err = est.estimate - logdet
        print(
            f"{m:6d} {k:5d} {est.estimate:10.4f} {err:9.4f} {est.std_error:10.4f} "
            f"{abs(err) / est.std_error:9.2f} {est.estimate - hutch:11.1e} {sd.num_matvecs:9d} "
            f"{took:6.2f}"
        )
    # the density against the eigenvalues smoothed by the same kernel (L1 distance on a grid)
    width = 0.01 * (ev[-1] - ev[0])
    grid = np.linspace(ev[0] - 5 * width, ev[-1] + 5 * width, 4001)
    kernel = np.exp(-0.5 * ((grid[:, None] - ev) / width) ** 2)
    exact = kernel.sum(1) / (n * width * np.sqrt(2 * np.pi))
    for m, k in ((1, 30), (10, 30), (10, 80)):
        sd = spectral_density(G, num_probes=m, num_steps=k, seed=0)
        l1 = np.trapezoid(np.abs(sd.density(grid, width) - exact), grid)
        print(f"density (width {width:.2g}), {m} x {k}: L1 off the smoothed eigenvalues {l1:.3f}")
    tr = hutchinson_trace(G, num_probes=200, seed=0)
    est = spectral_density(G, num_probes=10, num_steps=20, seed=0).trace(lambda t: t)
    print(
        f"tr G = {ev.sum():.4f}; Hutchinson, 200 probes: {tr.estimate:.4f} ± {tr.std_error:.4f}; "
        f"SLQ 10 x 20: {est.estimate:.4f} ± {est.std_error:.4f}"
    )


def cost() -> None:
    """Products against Lanczos on a 101,770-parameter float32 GGN, 10 probes x 30 steps."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 10))
    x, y = torch.randn(512, 784), torch.randint(0, 10, (512,))
    G = GGNLinearOperator(model, nn.CrossEntropyLoss(), (x, y))
    n = G.shape[0]
    G.matmat(np.ones((n, 10), dtype=np.float32))  # the first batched product's warm-up

    class Timed(sla.LinearOperator):
        def __init__(self) -> None:
            super().__init__(G.dtype, G.shape)
            self.seconds = 0.0

        def _matvec(self, v: np.ndarray) -> np.ndarray:
            return self._matmat(v[:, None])[:, 0]

        def _matmat(self, X: np.ndarray) -> np.ndarray:
            start = time.perf_counter()
            Y = G.matmat(X)
            self.seconds += time.perf_counter() - start
            return Y

    op, start = Timed(), time.perf_counter()
    spectral_density(op, num_probes=10, num_steps=30, seed=0)
    total = time.perf_counter() - start
    print(
        f"load {os.getloadavg()[0]:.1f}; n = {n}; 10 probes x 30 steps: {total:.2f} s, of which "
        f"products {op.seconds:.2f} s, Lanczos and the rest {total - op.seconds:.2f} s"
    )


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    {"bottom": bottom, "slq": slq, "cost": cost}[sys.argv[1] if len(sys.argv) > 1 else "slq"]()
