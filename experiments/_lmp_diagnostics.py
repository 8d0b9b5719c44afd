"""Why the CG-pair preconditioner helps little (#14): stale pairs and short CG runs.

1. ``steps``: the defaults and ``CGPairPreconditioner(16)`` step by step on the quick scorecard's
   MNIST-1D or digits task: loss, CG iterations and stop, λ, η, and (with the pairs) how far
   the previous step's pairs are from the new curvature, max over pairs of
   ‖(C_new + λ_old)s − y‖/‖y‖ (extra Gauss-Newton products, off the count).
2. ``synthetic``: six related SPD systems (n = 150, spectrum 1e-3..10, λ × 0.7 a solve) whose
   eigenvectors rotate and eigenvalues scale by ``drift`` a solve; CG iterations to rtol 1e-6
   with the previous solve's last 20 pairs against plain CG.

    python experiments/_lmp_diagnostics.py [mnist1d|digits|synthetic]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import expm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard  # noqa: E402

from hessfree import CGPairPreconditioner, GGNProduct, HessianFree, cg  # noqa: E402
from hessfree.preconditioning import two_loop  # noqa: E402


def steps(key: str, pre: CGPairPreconditioner | None, num_steps: int = 14) -> None:
    task = scorecard._classifier(key, quick=True)
    m = copy.deepcopy(task.model)
    infos: list = []
    opt = HessianFree(m.parameters(), precond=pre, callback=infos.append)

    def closure() -> tuple:
        out = m(task.x)
        return task.loss(out, task.y), out

    print("step loss CG stop products λ η pair-error")
    for k in range(num_steps):
        err = None
        if pre is not None and pre._recorded:
            out = m(task.x)
            G = GGNProduct(task.loss(out, task.y), out, list(m.parameters()))
            lam = pre._step_damping
            rel = [(G.matvec(s) + lam * s - y).norm() / y.norm() for s, y in pre._recorded]
            err = float(max(rel))
        opt.step(closure)
        i = infos[-1]
        e = "–" if err is None else f"{err:.2f}"
        print(k, f"{i.loss:.3g}", i.cg_iters, i.cg_reason, i.cg_matvecs, f"{i.damping:.1e}",
              f"{i.cg_rtol:.2f}", e)  # fmt: skip


def synthetic(drift: float, n: int = 150, m: int = 20) -> None:
    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.logspace(-3, 1, n)
    lam, lam_prev, prev, with_pairs, plain, errors = 1e-2, 0.0, None, 0, 0, [0.0]
    kw = dict(max_iter=500, rtol=1e-6, progress_tol=None)
    for k in range(6):
        K = rng.standard_normal((n, n))
        Q = expm((K - K.T) / np.sqrt(n) * drift) @ Q
        ev = ev * np.exp(drift * rng.standard_normal(n))
        A = torch.from_numpy((Q * ev) @ Q.T + lam * np.eye(n))
        b = torch.from_numpy(rng.standard_normal(n))
        rec = []

        def matvec(v: torch.Tensor, A: torch.Tensor = A, rec: list = rec) -> torch.Tensor:
            rec.append((v.clone(), A @ v))
            return rec[-1][1]

        M = None
        if prev:
            pairs = [(s, y + (lam - lam_prev) * s) for s, y in prev[-m:]]
            M = two_loop(pairs)
            errors.append(max(float((A @ s - y).norm() / y.norm()) for s, y in pairs))
        res = cg(matvec, b, precond=M, **kw)
        if k > 0:
            with_pairs += res.num_iter
            plain += cg(lambda v, A=A: A @ v, b, **kw).num_iter
        prev, lam_prev, lam = rec, lam, lam * 0.7
    print(f"drift {drift}: {with_pairs} vs {plain} iterations ({with_pairs / plain:.2f}×), "
          f"pair error max {max(errors):.2f}")  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    what = sys.argv[1] if len(sys.argv) > 1 else "synthetic"
    if what == "synthetic":
        for drift in (0.0, 0.01, 0.1, 0.3):
            synthetic(drift)
        return
    for name, pre in (("defaults", None), ("CGPairPreconditioner(16)", CGPairPreconditioner(16))):
        print(name)
        steps(what, pre)


if __name__ == "__main__":
    main()
