"""Diagnostics behind the "unseen3" findings (``experiments/README.md``), off the clock.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_unseen3_diag.py {cew,gn,exps,xor}

- ``cew``: the digits MLP with weighted cross-entropy and 20 % of labels ``ignore_index``,
  241 steps of batch 100: is the rising train loss the loss's (ignore_index, class weights) or
  the data's? Variants drop the ignored rows, the weights, or K-FAC.
- ``gn``: the float64 small-residual tanh MLP (``_unseen3.p_smallres``): f - f* per step of
  the ``(loss, outputs)`` closure (Gauss-Newton), defaults against ``precond=None`` and
  ``cg_rtol=0``, and the LBFGS-style closure (exact Hessian). f* from 60 steps of CG to 500
  iterations at rtol 0.
- ``exps``: the badly scaled sum of exponentials (``_unseen3.p_exps``): scipy's
  ``least_squares`` (``x_scale='jac'``) against 100 HF steps with each closure.
- ``xor``: where an HF step's time goes on the T = 50 LSTM (structural damping or not).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _unseen3 as U  # noqa: E402

import hessfree  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")


def cew() -> None:
    x, lab = U.digits()
    y = lab.clone()
    y[torch.rand(len(y), generator=torch.Generator().manual_seed(5)) < 0.2] = -100
    w = torch.linspace(0.5, 2.0, 10)
    weighted = lambda o, t: F.cross_entropy(o, t, weight=w)  # noqa: E731
    plain = lambda o, t: F.cross_entropy(o, t)  # noqa: E731
    variants = {
        "weights+ignore": (weighted, y, {}),
        "ignore only (closed form)": (plain, y, {}),
        "weights only (all labels)": (weighted, lab, {}),
        "weights+ignore precond=None": (weighted, y, {"precond": None}),
        "drop ignored rows, weights": (weighted, None, {}),
        "drop ignored rows": (plain, None, {}),
    }
    for name, (loss, yy, kw) in variants.items():
        xx = x
        if yy is None:
            keep = y != -100
            xx, yy = x[keep], y[keep]
        batch = U._batcher(xx, yy, 100)
        m = U._mlp(64, 10)
        opt = hessfree.HessianFree(m.parameters(), **kw)
        row = []
        for s in range(241):
            xb, yb = batch(s)

            def closure(xb=xb, yb=yb, m=m, loss=loss):
                out = m(xb)
                return loss(out, yb), out

            opt.step(closure)
            if s % 40 == 0:
                with torch.no_grad():
                    row.append(f"{float(loss(m(xx), yy)):.4f}")
        norm = sum(float(p.detach().norm() ** 2) for p in m.parameters()) ** 0.5
        print(f"| {name} | {' '.join(row)} | {opt.last_step.damping:.3g} | {norm:.1f} |")


def gn() -> None:
    prob = U.p_smallres()
    x, y = prob.full

    def run(kw, n, kind="lo"):
        m = prob.model()
        opt = hessfree.HessianFree(m.parameters(), **kw)
        fs = []

        def closure():
            if kind == "lo":
                out = m(x)
                return F.mse_loss(out, y), out
            opt.zero_grad()
            f = F.mse_loss(m(x), y)
            f.backward()
            return f

        for _ in range(n):
            opt.step(closure)
            with torch.no_grad():
                fs.append(float(F.mse_loss(m(x), y)))
        return fs

    tight = {"precond": None, "cg_rtol": 0.0, "cg_max_iter": 500}
    fstar = min(run({**tight, "tolerance_grad": 0, "tolerance_change": 0}, 60))
    print("f*", fstar)
    for name, kw, kind in [
        ("defaults, (loss, outputs)", {}, "lo"),
        ("precond=None", {"precond": None}, "lo"),
        ("precond=None, cg_rtol=0", {"precond": None, "cg_rtol": 0.0}, "lo"),
        ("defaults, LBFGS-style closure", {}, "bw"),
    ]:
        fs = run(kw, 30, kind)
        print(f"{name:30s}", " ".join(f"{f - fstar:.1e}" for f in fs))


def exps() -> None:
    from scipy.optimize import least_squares

    t, y = U.p_exps().full
    m0 = U.Exps()
    x0 = torch.cat([m0.a, m0.k, m0.c[None]]).detach().numpy()
    tn, yn = t.numpy(), y.numpy()

    def res(p):
        return p[0] * np.exp(-p[2] * tn) + p[1] * np.exp(-p[3] * tn) + p[4] - yn

    for method in ("lm", "trf"):
        r = least_squares(res, x0, method=method, x_scale="jac")
        print(f"scipy {method}: f {np.mean(r.fun**2):.6g} p {np.round(r.x, 4)} nfev {r.nfev}")
    for name, kind in (("HF (loss, outputs)", "lo"), ("HF LBFGS-style", "bw")):
        m = U.Exps()
        opt = hessfree.HessianFree(m.parameters())

        def closure(m=m, opt=opt, kind=kind):
            if kind == "lo":
                out = m(t)
                return F.mse_loss(out, y), out
            opt.zero_grad()
            f = F.mse_loss(m(t), y)
            f.backward()
            return f

        for _ in range(100):
            opt.step(closure)
        p = [round(float(v), 4) for v in torch.cat([m.a, m.k, m.c[None]])]
        with torch.no_grad():
            f = float(F.mse_loss(m(t), y))
        print(f"{name}, 100 steps: f {f:.6g} p {p} λ {opt.last_step.damping:.3g}")


def xor() -> None:
    prob = U.p_xor()
    xb, yb = prob.batches(0)
    for name, hidden in (("record_hidden (structural damping)", True), ("(loss, outputs)", False)):
        m = prob.model()
        opt = hessfree.HessianFree(m.parameters())

        def closure(m=m, hidden=hidden):
            if hidden:
                with hessfree.record_hidden(m) as rec:
                    out = m(xb)
                return F.cross_entropy(out, yb), out, rec.hidden
            out = m(xb)
            return F.cross_entropy(out, yb), out

        for _ in range(4):
            opt.step(closure)
        i = opt.last_step
        print(
            f"{name}: step {i.time_total:.3f} s, products {i.time_products:.3f} s over "
            f"{i.cg_matvecs} products, CG {i.cg_iters}"
        )
    m = prob.model()
    t0 = time.perf_counter()
    for _ in range(5):
        m.zero_grad()
        F.cross_entropy(m(xb), yb).backward()
    print(f"one gradient: {(time.perf_counter() - t0) / 5:.4f} s")


if __name__ == "__main__":
    {"cew": cew, "gn": gn, "exps": exps, "xor": xor}[sys.argv[1]]()
