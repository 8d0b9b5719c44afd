"""spectral18: hessfree.spectral and the operators on the inputs users give them next.

``symmetry`` measures how far from symmetric the dense ``A @ I`` of float32 Hessian/GGN
operators is (the threshold's margin) and what ARPACK returned for a non-symmetric matrix before
the check. ``deflate`` compares ``spectral_density``'s log det(G + λI) with and without
``num_deflated`` on two GGNs (the tests' 163-parameter one and a 451-parameter one) against
``slogdet``, with the exact per-probe standard deviations from the dense matrix. ``bottom``
tries remedies for a stalled ``bottom_eigenpairs`` on a 3,110-parameter GGN (past the dense
fallback's n = 2048): ARPACK as is, ARPACK on ``λ_max I - G``, shift-invert with MINRES solves
and a shift from a short Lanczos run, and the dense ``A @ I``; products and error against
``numpy.linalg.eigvalsh``.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_spectral18.py symmetry
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_spectral18.py deflate
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_spectral18.py bottom
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import scipy.sparse.linalg as sla
import torch
from torch import nn

from hessfree import GGNLinearOperator, HessianLinearOperator
from hessfree.spectral import bottom_eigenpairs, spectral_density


class _Counted(sla.LinearOperator):
    """``op`` counting its products (columns); past ``cap`` products it raises ``_Cap``."""

    def __init__(self, op: sla.LinearOperator, cap: int | None = None) -> None:
        super().__init__(op.dtype, op.shape)
        self.op, self.count, self.cap = op, 0, cap

    def _matvec(self, x):
        self.count += 1
        if self.cap is not None and self.count > self.cap:
            raise _Cap
        return self.op.matvec(x)

    def _matmat(self, X):
        self.count += X.shape[1]
        return self.op.matmat(X)

    _rmatvec = _matvec


class _Cap(Exception):
    pass


def _mlp(n_in: int, n_hidden: int, n_out: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.Tanh(), nn.Linear(n_hidden, n_out))


def symmetry() -> None:
    print("| model | n | kind | max|A-A^T|/max|A| | ||A-A^T||_F/||A||_F |")
    print("|---|---|---|---|---|")
    for seed, (nin, nh, nout, N) in enumerate([(4, 6, 3, 5), (10, 32, 3, 256), (20, 64, 10, 512)]):
        model = _mlp(nin, nh, nout, seed)
        x, y = torch.randn(N, nin), torch.randint(0, nout, (N,))
        for name, Op in (("Hessian", HessianLinearOperator), ("GGN", GGNLinearOperator)):
            op = Op(model, nn.CrossEntropyLoss(), (x, y))
            A = op @ np.eye(op.shape[0], dtype=np.float32)
            D = np.abs(A - A.T)
            print(
                f"| {nin}-{nh}-{nout} | {op.shape[0]} | {name} float32 | "
                f"{D.max() / np.abs(A).max():.2e} | {np.linalg.norm(D) / np.linalg.norm(A):.2e} |"
            )
    # what eigsh returned for a non-symmetric matrix (the branch refuses it before eigsh)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 12))
    A = X @ X.T / 12 + np.eye(12)
    A[0, 5] += 0.3
    got = sla.eigsh(A, k=2, which="LA", return_eigenvectors=False)[::-1]
    print("eigsh(A) top-2", got, "eigvals(A)", np.sort(np.linalg.eigvals(A).real)[::-1][:2])
    print("eigvalsh((A + A^T)/2)", np.linalg.eigvalsh((A + A.T) / 2)[::-1][:2])
    got = sla.eigsh(A, k=2, which="SA", return_eigenvectors=False)
    print("eigsh(A) bottom-2", got, "eigvals(A)", np.sort(np.linalg.eigvals(A).real)[:2])
    print("eigvalsh((A + A^T)/2) bottom", np.linalg.eigvalsh((A + A.T) / 2)[:2])


def _sphere_sd(mu: np.ndarray) -> float:
    r, t1, t2 = mu.size, mu.sum(), (mu**2).sum()
    return float(np.sqrt(max(0.0, 2 * (r * t2 - t1**2) / (r + 2))))


def deflate() -> None:
    for label, (nin, nh, nout, N, seed) in {
        "163 (6-16-3, 20 ex.)": (6, 16, 3, 20, 11),
        "451 (10-32-3, 40 ex.)": (10, 32, 3, 40, 0),
    }.items():
        model = _mlp(nin, nh, nout, seed).double()
        x, y = torch.randn(N, nin, dtype=torch.float64), torch.randint(0, nout, (N,))
        G = GGNLinearOperator(model, nn.CrossEntropyLoss(), (x, y))
        n = G.shape[0]
        Gd = G @ np.eye(n)
        ev = np.linalg.eigvalsh(Gd)
        lam = 1e-3 * ev[-1]
        A = Gd + lam * np.eye(n)
        logdet = np.linalg.slogdet(A)[1]
        w, Q = np.linalg.eigh(A)
        M = (Q * np.log(w)) @ Q.T
        hutch = np.sqrt(2 * (np.sum(M**2) - np.sum(np.diag(M) ** 2)))
        mu = np.log(w)[::-1]
        print(
            f"\n{label}: n = {n}, rank {int((ev > 1e-12 * ev[-1]).sum())}, λ = {lam:.3g}, "
            f"log det {logdet:.2f}; Hutchinson's exact sd per probe {hutch:.2f}"
        )
        print("| d | exact sd per probe | 50 probes x 30 steps: error | std_error | products |")
        print("|---|---|---|---|---|")
        for d in (0, 5, 10, 20, 40, 80):
            if d >= n:
                continue
            sd_exact = hutch if d == 0 else _sphere_sd(mu[d:])
            errs, ses, prods = [], [], []
            for seed in range(5):
                s = spectral_density(G.damped(lam), 50, 30, seed=seed, num_deflated=d)
                t = s.trace(np.log)
                errs.append(t.estimate - logdet)
                ses.append(t.std_error)
                prods.append(s.num_matvecs)
            print(
                f"| {d} | {sd_exact:.3f} | {np.sqrt(np.mean(np.square(errs))):.3f} (rms of 5 "
                f"seeds) | {np.mean(ses):.3f} | {int(np.mean(prods))} |"
            )


def bottom() -> None:
    torch.set_num_threads(1)
    model = _mlp(20, 100, 10, 0).double()
    x, y = torch.randn(400, 20, dtype=torch.float64), torch.randn(400, 10, dtype=torch.float64)
    G = GGNLinearOperator(model, nn.MSELoss(), (x, y))
    n, k = G.shape[0], 2
    t0 = time.perf_counter()
    Gd = G @ np.eye(n)
    t_dense_products = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = np.linalg.eigvalsh((Gd + Gd.T) / 2)
    t_eigh = time.perf_counter() - t0
    want, lmax = ev[:k], ev[-1]
    print(
        f"n = {n}; smallest {ev[:4]}, largest {lmax:.4g}; relative gap "
        f"{(ev[1] - ev[0]) / (ev[-1] - ev[0]):.2e}"
    )
    print(f"dense: {n} products in {t_dense_products:.1f} s, eigvalsh {t_eigh:.1f} s")
    cap = 20 * n
    rows = []

    def run(name, f):
        c = _Counted(G, cap)
        t = time.perf_counter()
        try:
            vals = np.sort(f(c))[:k]
            err = float(np.abs(vals - want).max() / lmax)
            out = f"{err:.1e} of λ_max"
        except _Cap:
            out = f"stopped at the cap ({cap} products)"
        except sla.ArpackNoConvergence as e:
            out = f"ArpackNoConvergence ({len(e.eigenvalues)} of {k})"
        rows.append((name, c.count, time.perf_counter() - t, out))
        print(rows[-1], flush=True)

    v0 = np.random.default_rng(0).standard_normal(n)
    run(
        "ARPACK 'SA' (bottom_eigenpairs past n = 2048)",
        lambda c: sla.eigsh(c, k=k, which="SA", v0=v0, return_eigenvectors=False, tol=0),
    )
    run(
        "ARPACK 'LA' on λ_max I - G",
        lambda c: (
            lmax
            - sla.eigsh(_Flip(c, lmax), k=k, which="LA", v0=v0, return_eigenvectors=False, tol=0)
        ),
    )
    for steps in (50, 200):

        def shift_invert(c, steps=steps):
            # a short Lanczos run: its smallest Ritz value bounds λ_min from above
            s = -_ritz_min(c, v0, steps)
            print(
                f"  s = {s:.3e}: |s - λ_1| = {abs(s - want[0]):.2e}, gap λ_2 - λ_1 = "
                f"{want[1] - want[0]:.2e}",
                flush=True,
            )

            def solve(b, c=c, s=s):
                return sla.minres(c, b, shift=s, rtol=1e-12, maxiter=5 * n)[0]

            inv = sla.LinearOperator(c.shape, matvec=solve, dtype=c.dtype)
            return sla.eigsh(c, k=k, sigma=s, OPinv=inv, v0=v0, return_eigenvectors=False)

        run(f"shift-invert, MINRES, s = -(Ritz min after {steps} Lanczos steps)", shift_invert)
    run(
        "LOBPCG (largest=False, tol 1e-10, 2000 iterations)",
        lambda c: sla.lobpcg(
            c,
            np.random.default_rng(0).standard_normal((n, k)),
            largest=False,
            tol=1e-10,
            maxiter=2000,
        )[0],
    )
    run(
        "bottom_eigenpairs(G, k=2) (ARPACK for n products, then A @ I)",
        lambda c: bottom_eigenpairs(c, k=k).values,
    )
    print("| method | products | s | result |")
    print("|---|---|---|---|")
    for name, count, secs, out in rows:
        print(f"| {name} | {count} | {secs:.1f} | {out} |")
    print(f"| dense `A @ I` + eigh | {n} | {t_dense_products + t_eigh:.1f} | exact |")


class _Flip(sla.LinearOperator):
    def __init__(self, op, shift):
        super().__init__(op.dtype, op.shape)
        self.op, self.shift = op, shift

    def _matvec(self, x):
        return self.shift * x.ravel() - self.op.matvec(x).ravel()


def _ritz_min(op, v0, steps):
    """The smallest Ritz value of ``steps`` Lanczos steps (fully reorthogonalised) from v0."""
    n = op.shape[0]
    V = np.zeros((steps, n))
    V[0] = v0 / np.linalg.norm(v0)
    alpha, beta = np.zeros(steps), np.zeros(steps)
    for i in range(steps):
        w = op.matvec(V[i])
        alpha[i] = V[i] @ w
        w -= V[: i + 1].T @ (V[: i + 1] @ w)
        w -= V[: i + 1].T @ (V[: i + 1] @ w)
        if i + 1 < steps:
            beta[i] = np.linalg.norm(w)
            V[i + 1] = w / beta[i]
    T = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
    return float(np.linalg.eigvalsh(T)[0])


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    torch.set_num_threads(1)
    {"symmetry": symmetry, "deflate": deflate, "bottom": bottom}[sys.argv[1]]()
