"""floor16: a false "converged" (``converged_by='float_resolution'``) in Hessian mode.

Parts (``python experiments/_floor16.py [raw|model|floors]``, default all; markdown to stdout;
run with main's package and with the branch's on ``PYTHONPATH`` for before/after):

- ``raw``: ``experiments/_unseen15.py``'s float32 raw-unit regression (4-16-1 tanh MLP, loss
  2.3e13, ``reduction='sum'``) with ``curvature='hessian'`` and an LBFGS-style closure, 60
  steps: statuses, the loss, λ, closure calls; beside it the same network in float64 (no
  float floor near: does the Hessian model train at all?) and L-BFGS (strong Wolfe).
- ``model``: the oracle of what the quadratic model offers at the start: the dense float64
  Hessian (``torch.autograd.functional.hessian``, 97 parameters), its eigenvalues, the
  Cauchy decrease ½‖g‖⁴/gᵀHg, and the trust-region model's exact minimum over ‖p‖ ≤ r
  (eigendecomposition, More-Sorensen's secular equation by bisection) for r = Δ₀·2^k, each
  against float32's resolution δ = 8 ε |f| and the true (float64) change of f at that p.
- ``floors``: genuine float floors that must stay ``'converged'`` with λ unchanged: the test
  suite's float32 quadratic at / 3 ulps from its numpy minimiser; float32 Rosenbrock (n = 4,
  + 1 so that f has a resolution) from scipy's optimum and from the standard start; a badly
  scaled float32 least-squares problem (column scales 1 ... 1e4) from 0. Oracles:
  ``numpy.linalg.solve``/``lstsq``, ``scipy.optimize.minimize`` (BFGS, gtol 1e-10, float64).

1 thread (``torch.set_num_threads(1)``; run with ``OPENBLAS_NUM_THREADS=1``).
"""

from __future__ import annotations

import collections
import math
import sys
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F

import hessfree
from hessfree import HessianFree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _unseen15 import _raw_regression  # noqa: E402

torch.set_num_threads(1)
EPS32 = 2.0**-23


def _counts(statuses: list[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in collections.Counter(statuses).items())


def _hf_run(model, x, y, steps: int, **kw) -> dict:
    opt = HessianFree(model.parameters(), curvature="hessian", **kw)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y, reduction="sum")
        loss.backward()
        return loss

    statuses, calls, first_move = [], 0, None
    for k in range(steps):
        opt.step(closure)
        s = opt.last_step
        statuses.append(f"{s.status}/{s.converged_by}" if s.converged_by else s.status)
        calls += s.closure_calls
        if s.accepted and first_move is None:
            first_move = k
    with torch.no_grad():
        loss = float(F.mse_loss(model(x), y, reduction="sum"))
    return dict(loss=loss, lam=opt.damping, calls=calls, statuses=statuses, first=first_move)


def part_raw(steps: int = 60) -> None:
    print(f"\n## raw: float32 raw-unit regression, Hessian, LBFGS-style closure, {steps} steps\n")
    print("| run | loss at the end | λ at the end | closure calls | first accepted | statuses |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        model, x, y = _raw_regression()
        model, x, y = model.to(dtype), x.to(dtype), y.to(dtype)
        r = _hf_run(model, x, y, steps)
        print(
            f"| HF hessian {str(dtype)[6:]} | {r['loss']:.4g} | {r['lam']:.3g} | {r['calls']} "
            f"| {r['first']} | {_counts(r['statuses'])} |"
        )
    model, x, y = _raw_regression()
    lbfgs = torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = F.mse_loss(model(x), y, reduction="sum")
        loss.backward()
        return loss

    for _ in range(steps // 20):  # LBFGS' step() is 20 iterations
        lbfgs.step(closure)
    with torch.no_grad():
        loss = float(F.mse_loss(model(x), y, reduction="sum"))
    print(f"| L-BFGS float32 ({steps} iterations) | {loss:.4g} | | | | |")


def _trust_region_min(lam_h: np.ndarray, gq: np.ndarray, r: float) -> tuple[float, np.ndarray]:
    """min gᵀp + ½pᵀHp over ‖p‖ ≤ r in H's eigenbasis (coefficients gq): the model's value
    and p's coefficients (the hard case is ignored: g has weight on every eigenvector here)."""

    def p_of(mu: float) -> np.ndarray:
        return -gq / (lam_h + mu)

    low = max(0.0, -lam_h.min())
    if lam_h.min() > 0 and np.linalg.norm(p_of(0.0)) <= r:
        p = p_of(0.0)
    else:
        lo, hi = low * (1 + 1e-12) + 1e-300, low + np.linalg.norm(gq) / r + 1.0
        for _ in range(300):  # ‖p(μ)‖ falls as μ grows: bisection on ‖p(μ)‖ = r
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if np.linalg.norm(p_of(mid)) > r else (lo, mid)
        p = p_of(hi)
    return float(gq @ p + 0.5 * p @ (lam_h * p)), p


def part_model() -> None:
    print("\n## model: what the quadratic model offers at θ0 (float64 oracle)\n")
    model, x, y = _raw_regression()
    model = model.double()
    x, y = x.double(), y.double()
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    theta0 = torch.cat([p.detach().flatten() for p in params])

    def f(theta):
        out, i = x, 0
        ws = []
        for s in shapes:
            n = math.prod(s)
            ws.append(theta[i : i + n].view(s))
            i += n
        out = torch.tanh(out @ ws[0].T + ws[1]) @ ws[2].T + ws[3]
        return F.mse_loss(out, y, reduction="sum")

    f0 = float(f(theta0))
    g = torch.autograd.functional.jacobian(f, theta0).numpy()
    H = torch.autograd.functional.hessian(f, theta0).numpy()
    lam_h, Q = np.linalg.eigh(H)
    gq = Q.T @ g
    gHg = g @ H @ g
    scale = abs(gHg) / (g @ g)
    delta = 8 * EPS32 * f0
    print(f"f0 {f0:.4g}, ‖g‖ {np.linalg.norm(g):.3g}, δ = 8 ε32 |f0| = {delta:.3g}")
    print(
        f"eigenvalues {lam_h.min():.3g} ... {lam_h.max():.3g} ({(lam_h < 0).sum()} negative); "
        f"λ₀ = |gᵀHg|/gᵀg = {scale:.3g}; Cauchy ½‖g‖⁴/gᵀHg = {0.5 * (g @ g) ** 2 / gHg:.3g}; "
        f"first step under λ₀ (p = −g/2λ₀) predicts {-0.375 * (g @ g) / scale:.3g}\n"
    )
    print(
        "| r / Δ₀ (Δ₀ = ‖g‖/λ₀) | r | model min over ‖p‖ ≤ r | / δ | f(θ0 + p) − f0 (float64) "
        "| f(θ0 − r g/‖g‖) − f0 |"
    )
    print("|---|---|---|---|---|---|")
    r0 = np.linalg.norm(g) / scale
    gt = torch.tensor(g)
    for k in range(0, 22, 2):
        r = r0 * 2.0**k
        q, pc = _trust_region_min(lam_h, gq, r)
        p = torch.tensor(Q @ pc)
        actual = float(f(theta0 + p)) - f0
        along = float(f(theta0 - r * gt / gt.norm())) - f0
        print(f"| 2^{k} | {r:.3g} | {q:.3g} | {abs(q) / delta:.3g} | {actual:.3g} | {along:.3g} |")


def _quadratic32(ulps_away: int):
    rng = np.random.default_rng(0)  # tests/test_optimizer.py's _float32_quadratic
    Q = rng.standard_normal((6, 6))
    A, b = 100 * (Q @ Q.T + 6 * np.eye(6)), 100 * rng.standard_normal(6)
    x = np.linalg.solve(A, b).astype(np.float32)
    for _ in range(ulps_away):
        x = np.nextafter(x, np.float32(np.inf))
    A32, b32 = torch.tensor(A, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    xt = torch.tensor(x, requires_grad=True)

    def f64(v):
        return 0.5 * v @ A @ v - b @ v

    return xt, lambda: 0.5 * xt @ A32 @ xt - b32 @ xt, f64, f64(np.linalg.solve(A, b))


def _rosen32(start: str):
    n = 4
    opt = scipy.optimize.minimize(
        scipy.optimize.rosen,
        -np.ones(n),
        jac=scipy.optimize.rosen_der,
        method="BFGS",
        options=dict(gtol=1e-10),
    )
    x0 = opt.x if start == "optimum" else np.array([-1.2, 1.0, -1.2, 1.0])
    x0 = x0.astype(np.float32)
    if start == "optimum":  # 3 ulps up in every entry (at x* itself the float32 gradient is 0)
        for _ in range(3):
            x0 = np.nextafter(x0, np.float32(np.inf))
    xt = torch.tensor(x0, requires_grad=True)

    def f32():
        return (100 * (xt[1:] - xt[:-1] ** 2) ** 2 + (1 - xt[:-1]) ** 2).sum() + 1.0

    return xt, f32, lambda v: scipy.optimize.rosen(v) + 1.0, opt.fun + 1.0


def _lsq32():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((40, 6)) * np.logspace(0, 4, 6)
    b = A @ rng.standard_normal(6) + 0.1 * rng.standard_normal(40)
    x_star = np.linalg.lstsq(A, b, rcond=None)[0]
    A32, b32 = torch.tensor(A, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    xt = torch.zeros(6, requires_grad=True)

    def f64(v):
        return 0.5 * np.sum((A @ v - b) ** 2)

    return xt, lambda: 0.5 * ((A32 @ xt - b32) ** 2).sum(), f64, f64(x_star)


def part_floors(steps: int = 200) -> None:
    print(f"\n## floors: genuine float32 floors ({steps} steps, Hessian products)\n")
    print("| problem | f − f* (float64) | / δ | λ first → last | calls | statuses |")
    print("|---|---|---|---|---|---|")
    problems = {
        "quadratic, at x*": lambda: _quadratic32(0),
        "quadratic, 3 ulps": lambda: _quadratic32(3),
        "Rosenbrock+1, 3 ulps from scipy's x*": lambda: _rosen32("optimum"),
        "Rosenbrock+1, standard start": lambda: _rosen32("standard"),
        "scaled least squares, from 0": _lsq32,
    }
    for name, make in problems.items():
        for curvature in ("hessian",):
            x, f, f64, f_star = make()
            opt = HessianFree([x], curvature=curvature)
            statuses, calls, lams = [], 0, []
            for _ in range(steps):
                opt.step(f)
                s = opt.last_step
                statuses.append(f"{s.status}/{s.converged_by}" if s.converged_by else s.status)
                calls += s.closure_calls
                lams.append(s.damping)
            gap = f64(x.detach().double().numpy()) - f_star
            delta = 8 * EPS32 * abs(f_star)
            print(
                f"| {name} | {gap:.3g} | {gap / delta:.2g} | {lams[0]:.3g} → {lams[-1]:.3g} "
                f"| {calls} | {_counts(statuses)} |"
            )


def part_swap(steps: int = 580) -> None:
    """The check's cost where the floor is genuine: the scorecard's swap task (defaults,
    LBFGS-style closure, exact Hessian), the freeze hash's 580 steps: curvature products
    (CG's and the check's) and step time, on the floor steps and in all."""
    import scorecard

    print(f"\n## swap: {steps} steps of the defaults, products and time\n")
    task = scorecard.make_swap_task(quick=False)
    base = {k: v for k, v in task.hf["defaults"].items() if k not in ("kfac", "early_kw")}
    run = scorecard.hf_run(task, "defaults", "HF", base | {"kw": {}})
    seen = []
    original = HessianFree.step

    def step(self, closure, curvature_closure=None):
        out = original(self, closure, curvature_closure)
        seen.append(self.last_step)
        return out

    HessianFree.step = step
    try:
        for _ in range(steps):
            run.step()
    finally:
        HessianFree.step = original
    floor = [s for s in seen if s.converged_by == "float_resolution"]
    kinds = [f"{s.status}/{s.converged_by}" if s.converged_by else s.status for s in seen]
    print(f"statuses: {_counts(kinds)}\n")
    print("| steps | products | time (s) | floor steps | their products | their time (s) |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {len(seen)} | {sum(s.cg_matvecs for s in seen)} | "
        f"{sum(s.time_total for s in seen):.2f} | {len(floor)} | "
        f"{sum(s.cg_matvecs for s in floor)} | {sum(s.time_total for s in floor):.2f} |"
    )


PARTS = {"raw": part_raw, "model": part_model, "floors": part_floors, "swap": part_swap}

if __name__ == "__main__":
    print("hessfree from", hessfree.__file__)
    for part in sys.argv[1:] or list(PARTS):
        PARTS[part]()
