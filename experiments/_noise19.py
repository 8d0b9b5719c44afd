"""noise19: line searches inside a float32 loss's rounding noise (topic "noise19").

Deterministic counts, not seconds: per problem, the steps' statuses, closure calls, CG
products (``StepInfo.cg_matvecs``, the floor check's included), λ at the end and the final
loss against a float64 oracle (f − f* in float64, and over δ = 8 ε₃₂ |f*|). Run once with
main's package on ``PYTHONPATH`` and once with the branch's for before/after:

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_noise19.py [floors|f64|raw|swap]

- ``floors``: fullbatch16's / floor16's badly scaled least squares ``lsq32`` (f* by
  ``numpy.linalg.lstsq``), floor16's float32 quadratic at / 3 ulps from numpy's minimiser,
  Rosenbrock + 1 (n = 4) 3 ulps from scipy's BFGS optimum and from (−1.2, 1, −1.2, 1) (f* by
  ``scipy.optimize.rosen`` at scipy's optimum), floor16's convex quadratic ½xᵀAx − bᵀx + 1000,
  A = diag(1e4, 3e3, 1, 1e-2) (closed form b/a), 200 Hessian steps each;
- ``f64``: the same problems in float64 (must reach their optima: the rule must not stop
  early where float64 can still make progress);
- ``raw``: floor16's float32 raw-unit regression, Hessian, LBFGS-style closure, 60 steps;
- ``swap``: the scorecard's swap task (the freeze task, 580 steps of the defaults): statuses,
  closure calls, curvature products, final loss.

1 thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import collections
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import hessfree
from hessfree import HessianFree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _floor16 import _quadratic32, _rosen32  # noqa: E402

torch.set_num_threads(1)
EPS32 = 2.0**-23


def _counts(statuses: list[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in collections.Counter(statuses).items())


def _lsq(dtype: torch.dtype):
    rng = np.random.default_rng(3)  # floor16's _lsq32
    A = rng.standard_normal((40, 6)) * np.logspace(0, 4, 6)
    b = A @ rng.standard_normal(6) + 0.1 * rng.standard_normal(40)
    x_star = np.linalg.lstsq(A, b, rcond=None)[0]
    At, bt = torch.tensor(A, dtype=dtype), torch.tensor(b, dtype=dtype)
    xt = torch.zeros(6, dtype=dtype, requires_grad=True)

    def f64(v):
        return 0.5 * np.sum((A @ v - b) ** 2)

    return xt, lambda: 0.5 * ((At @ xt - bt) ** 2).sum(), f64, f64(x_star)


def _convex(dtype: torch.dtype):
    a = np.array([1e4, 3e3, 1.0, 1e-2])
    b = np.array([1.0, -2.0, 0.5, 3e-3])
    at, bt = torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)
    xt = torch.zeros(4, dtype=dtype, requires_grad=True)

    def f64(v):
        return 0.5 * np.sum(a * v * v) - b @ v + 1000.0

    return xt, lambda: 0.5 * (at * xt * xt).sum() - bt @ xt + 1000.0, f64, f64(b / a)


def _rosen(dtype: torch.dtype, start: str):
    x32, _, f64, f_star = _rosen32(start)
    x = x32.detach().to(dtype).requires_grad_(True)

    def f():
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum() + 1.0

    return x, f, f64, f_star


def _quadratic(dtype: torch.dtype, ulps: int):
    x32, _, f64, f_star = _quadratic32(ulps)
    rng = np.random.default_rng(0)  # _quadratic32's A and b
    Q = rng.standard_normal((6, 6))
    A, b = 100 * (Q @ Q.T + 6 * np.eye(6)), 100 * rng.standard_normal(6)
    At, bt = torch.tensor(A, dtype=dtype), torch.tensor(b, dtype=dtype)
    x = x32.detach().to(dtype).requires_grad_(True)
    return x, lambda: 0.5 * x @ At @ x - bt @ x, f64, f_star


def problems(dtype: torch.dtype) -> dict:
    return {
        "lsq (scales 1 ... 1e4), from 0": lambda: _lsq(dtype),
        "quadratic, at x*": lambda: _quadratic(dtype, 0),
        "quadratic, 3 ulps": lambda: _quadratic(dtype, 3),
        "Rosenbrock+1, 3 ulps from scipy's x*": lambda: _rosen(dtype, "optimum"),
        "Rosenbrock+1, standard start": lambda: _rosen(dtype, "standard"),
        "convex diag(1e4, 3e3, 1, 1e-2) + 1000, from 0": lambda: _convex(dtype),
    }


def run(make, steps: int) -> dict:
    x, f, f64, f_star = make()
    opt = HessianFree([x], curvature="hessian")
    statuses, calls, products, lams = [], 0, 0, []
    for _ in range(steps):
        opt.step(f)
        s = opt.last_step
        statuses.append(f"{s.status}/{s.converged_by}" if s.converged_by else str(s.status))
        calls += s.closure_calls
        products += s.cg_matvecs
        lams.append(s.damping)
    gap = f64(x.detach().double().numpy()) - f_star
    return dict(
        gap=gap, delta=8 * EPS32 * abs(f_star), calls=calls, products=products, lams=lams,
        statuses=statuses,
    )  # fmt: skip


def part_floors(dtype: torch.dtype = torch.float32, steps: int = 200) -> None:
    print(f"\n## {str(dtype)[6:]}: {steps} Hessian steps each\n")
    print("| problem | f − f* (float64) | / δ₃₂ | λ first → last | calls | products | statuses |")
    print("|---|---|---|---|---|---|---|")
    for name, make in problems(dtype).items():
        r = run(make, steps)
        print(
            f"| {name} | {r['gap']:.3g} | {r['gap'] / r['delta']:.3g} | "
            f"{r['lams'][0]:.3g} → {r['lams'][-1]:.3g} | {r['calls']} | {r['products']} | "
            f"{_counts(r['statuses'])} |",
            flush=True,
        )


def part_raw(steps: int = 60) -> None:
    from _floor16 import _hf_run
    from _unseen15 import _raw_regression

    print(f"\n## raw: floor16's float32 raw-unit regression, Hessian, {steps} steps\n")
    model, x, y = _raw_regression()
    r = _hf_run(model, x, y, steps)
    print(f"loss {r['loss']:.4g}, λ {r['lam']:.3g}, calls {r['calls']}: {_counts(r['statuses'])}")


def part_swap(steps: int = 580) -> None:
    import scorecard

    print(f"\n## swap: {steps} steps of the defaults (the freeze task)\n")
    task = scorecard.make_swap_task(quick=False)
    base = {k: v for k, v in task.hf["defaults"].items() if k not in ("kfac", "early_kw")}
    hf = scorecard.hf_run(task, "defaults", "HF", base | {"kw": {}})
    seen = []
    original = HessianFree.step

    def step(self, closure, curvature_closure=None):
        out = original(self, closure, curvature_closure)
        seen.append(self.last_step)
        return out

    def loss64() -> float:  # the float64 oracle: the same parameters and data, widened
        m = copy.deepcopy(hf.model).double()
        with torch.no_grad():
            return float(F.mse_loss(m(task.x.double()), task.y.double()))

    HessianFree.step = step
    f64 = {}
    try:
        for k in range(steps):
            hf.step()
            if k >= steps - 120:
                f64[k] = loss64()
    finally:
        HessianFree.step = original
    kinds = [f"{s.status}/{s.converged_by}" if s.converged_by else str(s.status) for s in seen]
    failed = [i for i, s in enumerate(seen) if s.status == "line_search_failed"]
    noise = [i for i, s in enumerate(seen) if s.converged_by == "rounding_noise"]
    print(f"statuses: {_counts(kinds)}")
    print(
        f"closure calls {sum(s.closure_calls for s in seen)}, products "
        f"{sum(s.cg_matvecs for s in seen)}, final loss {task.error(hf.model):.6e}"
    )
    print(f"failed line searches at steps {failed[:10]}...; rounding_noise at {noise[:10]}...")
    first = (failed + noise + [steps - 1])[0]
    start = max(first - 1, steps - 120)
    print(
        f"float64 loss after step {start}: {f64[start]:.9e}, after step {steps - 1}: "
        f"{f64[steps - 1]:.9e}; float32 resolution δ at the end "
        f"{8 * EPS32 * seen[-1].loss:.3g}"
    )
    moved = [k for k in range(start + 1, steps) if seen[k].accepted]
    print("accepted after it:", [(k, f"{f64[k] - f64[k - 1]:.3g}") for k in moved])


PARTS = {
    "floors": part_floors,
    "f64": lambda: part_floors(torch.float64),
    "raw": part_raw,
    "swap": part_swap,
}

if __name__ == "__main__":
    print("hessfree from", hessfree.__file__)
    for part in sys.argv[1:] or list(PARTS):
        PARTS[part]()
