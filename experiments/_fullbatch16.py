"""fullbatch16: full-batch fits where L-BFGS is the incumbent (topic "fullbatch16").

Does ``HessianFree(params)`` with its defaults reach the optimum a user of
``torch.optim.LBFGS`` / ``scipy.optimize.minimize`` reaches, in comparable time? Problems
(full batch, one parameter vector ``theta``):

- NIST StRD Rat42, Rat43, BoxBOD, MGH10 (data and starts from ``_first0.py``; MSE, so f* =
  certified RSS / N), each from NIST's start 1 and start 2; float64, ``(loss, outputs)``
  closure (Gauss-Newton, first0's switch to the Hessian where it fires);
- ``lsq32`` / ``lsq64``: floor16's badly scaled least squares (40 x 6, column scales 1 ... 1e4,
  from 0) in float32 / float64, loss-only closure (the Hessian); f* from ``numpy.linalg.lstsq``;
- ``mlp32``: a 1-10-10-1 tanh MLP (141 parameters) on sin(3x) + N(0, 0.1²), 200 points,
  float32, MSE, ``(loss, outputs)`` closure; f* the lowest loss any contender reached (a
  non-convex fit: contenders may end in different minima);
- ``logreg``: logistic regression, 500 x 20 Gaussian features, labels from a logistic model,
  L2 term 1e-2/2 |w|² in the loss, float64, loss-only closure (the Hessian); f* by scipy's
  trust-ncg to gtol 1e-12 (strictly convex).

Contenders: ``hf`` (``_Exact``: the rule measured, not landed), ``hf-eta`` (``HessianFree``,
main's forcing term),
``lbfgs`` (``torch.optim.LBFGS(line_search_fn='strong_wolfe')``, defaults otherwise), scipy's
``L-BFGS-B``, ``BFGS`` and ``trust-ncg`` (``hessp`` by double backward) in float64 with tight
tolerances (gtol 1e-12). Each run has the same wall-clock budget; contenders interleaved
within one process, one thread, 3 repeats; medians. Recorded per run: the best f at each
time (HF: the accepted loss after each step; the others: the best closure value seen), the
time to f <= f* + 1e-6 |f*| and HF's status counts.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_fullbatch16.py race [--budget 1]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_fullbatch16.py trace PROBLEM [--eta]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_fullbatch16.py noise

``trace``: one HF run step by step (f − f* in float64, status, ρ, λ, CG iterations, η, closure
calls, λ's share of the last accepted step); ``--eta`` with main's forcing term. ``noise``:
lsq32's float32 rounding noise near x* against HF's resolution δ = 8 ε |f*|.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F

from hessfree import HessianFree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _first0 import NIST, fstar_start  # noqa: E402

torch.set_num_threads(1)


class _Exact(HessianFree):
    """The rule measured here, not landed: with ``cg_rtol='auto'`` on an objective seen
    deterministic with at most CG's cap of parameters (250: ``cg_max_iter='auto'``), CG stops
    at eta = min(forcing term, sqrt(eps of the parameters' dtype)) instead of the forcing
    term alone (was ``HessianFree._exact_solve`` in commits efb7ff4 / ef92988, reverted)."""

    def _cg_rtol(self, run):  # noqa: ANN001, ANN202
        rtol = super()._cg_rtol(run)
        small = run.layout.numel <= 250 and self.settings.cg_max_iter == "auto"
        if (
            self.settings.cg_rtol == "auto"
            and run.state.get("deterministic") is True
            and run.structural_damping == 0
            and small
        ):
            rtol = min(rtol, math.sqrt(torch.finfo(run.layout.dtype).eps))
            run.report["cg_rtol"] = rtol
        return rtol


REL = 1e-6  # the target: f <= f* + REL |f*|
#: each contender's own CPU time: one thread, and other sessions' load (2 shared cores at load
#: 4-8) leaves it nearly unchanged where wall-clock time doubled
_clock = time.process_time


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


class Problem:
    """``outputs(theta)``, ``loss(outputs, theta)``; ``x0`` numpy float64; ``gn`` whether the
    HF closure returns ``(loss, outputs)``."""

    def __init__(self, name, x0, outputs, loss, dtype, gn, f_star=math.nan):  # noqa: ANN001
        self.name, self.x0, self.outputs, self.loss = name, np.asarray(x0, float), outputs, loss
        self.dtype, self.gn, self.f_star = dtype, gn, f_star

    def f64(self, x: np.ndarray) -> float:
        """f at ``x`` evaluated in float64 (the oracle's precision)."""
        t = torch.tensor(x, dtype=torch.float64)
        with torch.no_grad():
            return float(self.loss(self.outputs(t, torch.float64), t))


def _nist(key: str, start: int) -> Problem:
    fn, x, y, s1, rss = NIST[key]
    xs = {d: torch.tensor(x, dtype=d) for d in (torch.float32, torch.float64)}
    ys = {d: torch.tensor(y, dtype=d) for d in (torch.float32, torch.float64)}
    x0 = s1 if start == 1 else fstar_start(key)
    return Problem(
        f"{key}-s{start}",
        x0,
        lambda t, d: fn(t, xs[d]),
        lambda out, t: F.mse_loss(out, ys[out.dtype]),
        torch.float64,
        True,
        rss / len(x),
    )


def _lsq(dtype: torch.dtype) -> Problem:
    rng = np.random.default_rng(3)  # floor16's _lsq32
    A = rng.standard_normal((40, 6)) * np.logspace(0, 4, 6)
    b = A @ rng.standard_normal(6) + 0.1 * rng.standard_normal(40)
    x_star = np.linalg.lstsq(A, b, rcond=None)[0]
    As = {d: torch.tensor(A, dtype=d) for d in (torch.float32, torch.float64)}
    bs = {d: torch.tensor(b, dtype=d) for d in (torch.float32, torch.float64)}
    f_star = 0.5 * float(np.sum((A @ x_star - b) ** 2))
    name = "lsq32" if dtype == torch.float32 else "lsq64"
    return Problem(
        name,
        np.zeros(6),
        lambda t, d: As[d] @ t - bs[d],
        lambda r, t: 0.5 * (r**2).sum(),
        dtype,
        False,
        f_star,
    )


def _mlp32() -> Problem:
    g = torch.Generator().manual_seed(16)
    x = torch.rand(200, 1, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.sin(3 * x) + 0.1 * torch.randn(200, 1, generator=g, dtype=torch.float64)
    sizes = [(1, 10), (10, 10), (10, 1)]
    shapes = [s for a, b in sizes for s in ((b, a), (b,))]
    torch.manual_seed(16)
    x0 = torch.cat([(torch.randn(s) / math.sqrt(s[-1] if len(s) == 2 else 1)).flatten() * (
        1.0 if len(s) == 2 else 0.0) for s in shapes]).double().numpy()  # fmt: skip

    def outputs(t: torch.Tensor, d: torch.dtype) -> torch.Tensor:
        h, i = x.to(d), 0
        for k, (a, b) in enumerate(sizes):
            w = t[i : i + a * b].view(b, a)
            i += a * b
            h = h @ w.T + t[i : i + b]
            i += b
            if k < len(sizes) - 1:
                h = torch.tanh(h)
        return h

    return Problem(
        "mlp32", x0, outputs, lambda out, t: F.mse_loss(out, y.to(out.dtype)), torch.float32, True
    )


def _logreg() -> Problem:
    g = torch.Generator().manual_seed(17)
    X = torch.randn(500, 20, generator=g, dtype=torch.float64)
    w = torch.randn(20, generator=g, dtype=torch.float64)
    y = (torch.rand(500, generator=g, dtype=torch.float64) < torch.sigmoid(X @ w)).double()
    Xs = {torch.float64: X, torch.float32: X.float()}

    def loss(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(z, y.to(z.dtype)) + 5e-3 * (t[:20] ** 2).sum()

    p = Problem(
        "logreg", np.zeros(21), lambda t, d: Xs[d] @ t[:20] + t[20], loss, torch.float64, False
    )
    res = scipy.optimize.minimize(
        _scipy_fun(p)[0],
        p.x0,
        jac=True,
        method="trust-ncg",
        hessp=_scipy_hessp(p),
        options={"gtol": 1e-12},
    )
    p.f_star = float(res.fun)
    return p


def problems() -> list[Problem]:
    out = [_nist(k, s) for k in ("rat42", "rat43", "boxbod", "mgh10") for s in (1, 2)]
    return out + [_lsq(torch.float32), _lsq(torch.float64), _mlp32(), _logreg()]


# ------------------------------------------------------------------------------------------
def _scipy_fun(p: Problem):  # noqa: ANN202
    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        f = p.loss(p.outputs(t, torch.float64), t)
        (g,) = torch.autograd.grad(f, t)
        return float(f), g.numpy()

    return fun, p.x0, ()


def _scipy_hessp(p: Problem):  # noqa: ANN202
    def hessp(x: np.ndarray, v: np.ndarray) -> np.ndarray:
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        f = p.loss(p.outputs(t, torch.float64), t)
        (g,) = torch.autograd.grad(f, t, create_graph=True)
        (hv,) = torch.autograd.grad(g, t, torch.tensor(v))
        return hv.numpy()

    return hessp


def run_hf(p: Problem, budget: float, exact: bool, steps: int = 400) -> dict:
    theta = torch.nn.Parameter(torch.tensor(p.x0, dtype=p.dtype))
    opt = (_Exact if exact else HessianFree)([theta])

    def closure():  # noqa: ANN202
        out = p.outputs(theta, p.dtype)
        loss = p.loss(out, theta)
        return (loss, out) if p.gn else loss

    trace, statuses, t0 = [], collections.Counter(), _clock()
    best, work = math.inf, [0, 0]
    for _ in range(steps):
        opt.step(closure)
        s = opt.last_step
        statuses[str(s.status.value) + (f"/{s.converged_by.value}" if s.converged_by else "")] += 1
        best = min(best, s.loss_after)
        now = _clock() - t0
        work[0] += s.closure_calls
        work[1] += s.cg_matvecs
        trace.append((now, best, len(trace) + 1, work[0], work[1]))
        if now > budget:
            break
    return dict(trace=trace, x=theta.detach().double().numpy(), statuses=statuses)


def run_lbfgs(p: Problem, budget: float) -> dict:
    theta = torch.nn.Parameter(torch.tensor(p.x0, dtype=p.dtype))
    opt = torch.optim.LBFGS([theta], line_search_fn="strong_wolfe")
    seen, t0 = [math.inf], _clock()

    def closure():  # noqa: ANN202
        opt.zero_grad()
        loss = p.loss(p.outputs(theta, p.dtype), theta)
        loss.backward()
        seen.append(min(seen[-1], float(loss)))
        return loss

    trace = []
    while _clock() - t0 <= budget:
        opt.step(closure)
        trace.append((_clock() - t0, seen[-1]))
        if not all(map(math.isfinite, theta.detach().tolist())):
            break
    return dict(trace=trace, x=theta.detach().double().numpy(), statuses={})


class _Budget(Exception):
    pass


def run_scipy(p: Problem, budget: float, method: str) -> dict:
    fun, x0, _ = _scipy_fun(p)
    trace, best, t0 = [], [math.inf, None], _clock()

    def timed(x: np.ndarray) -> tuple[float, np.ndarray]:
        if _clock() - t0 > budget:
            raise _Budget
        f, g = fun(x)
        if f < best[0]:
            best[0], best[1] = f, x.copy()
        trace.append((_clock() - t0, best[0]))
        return f, g

    kw = {"hessp": _scipy_hessp(p)} if method == "trust-ncg" else {}
    opts = {"gtol": 1e-12, "maxiter": 100000}
    if method == "L-BFGS-B":
        opts.update(ftol=1e-15)
    try:
        scipy.optimize.minimize(timed, x0, jac=True, method=method, options=opts, **kw)
    except _Budget:
        pass
    return dict(trace=trace, x=best[1], statuses={})


CONTENDERS = {
    "hf": lambda p, b: run_hf(p, b, True),
    "hf-eta": lambda p, b: run_hf(p, b, False),
    "lbfgs": run_lbfgs,
    "L-BFGS-B": lambda p, b: run_scipy(p, b, "L-BFGS-B"),
    "BFGS": lambda p, b: run_scipy(p, b, "BFGS"),
    "trust-ncg": lambda p, b: run_scipy(p, b, "trust-ncg"),
}


def _time_to(trace: list[tuple], target: float, what: int = 0) -> float:
    """The first time (``what`` = 0; for HF also 2: steps, 3: closure calls, 4: CG products)
    at which the best f so far is within the target."""
    return next((r[what] for r in trace if r[1] <= target), math.inf)


def race(budget: float, repeats: int, names: list[str] | None, only: list[str]) -> None:
    probs = [p for p in problems() if not names or p.name in names]
    if only:
        contenders = {c: CONTENDERS[c] for c in only}
    else:
        contenders = CONTENDERS
    print(f"## race: {budget:g} CPU s each, {repeats} repeats interleaved; load {load()}\n")
    runs: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for rep in range(repeats):
        for p in probs:
            order = list(contenders)
            order = order[rep % len(order) :] + order[: rep % len(order)]
            for c in order:
                r = contenders[c](p, budget)
                r["f_end"] = p.f64(r["x"]) if r["x"] is not None else math.nan
                runs[p.name, c].append(r)
    print(f"load after: {load()}\n")
    for p in probs:
        if not math.isfinite(p.f_star):  # the lowest float64 value any run ended at
            p.f_star = min(r["f_end"] for (n, _), rs in runs.items() if n == p.name for r in rs)
    print("| problem | f* | contender | median f_end − f* | median (f_end − f*)/|f*| "
          "| median CPU s to f* | reached "
          "| HF: steps/calls/products to f*; statuses (last run) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for p in probs:
        target = p.f_star + REL * abs(p.f_star)
        for c in contenders:
            rs = runs[p.name, c]
            gaps = [r["f_end"] - p.f_star for r in rs]
            # f_end is float64 at the final point; time to f* by the run's own (dtype) values
            times = [_time_to(r["trace"], target) for r in rs]
            hit = sum(math.isfinite(t) for t in times)
            st = ", ".join(f"{k} {v}" for k, v in sorted(rs[-1]["statuses"].items()))
            if c.startswith("hf"):  # steps / closure calls / products to f* (the last run)
                st = "/".join(f"{_time_to(rs[-1]['trace'], target, w):.0f}" for w in (2, 3, 4)) + (
                    f"; {st}")  # fmt: skip
            print(f"| {p.name} | {p.f_star:.10g} | {c} | {statistics.median(gaps):.3g} | "
                  f"{statistics.median(gaps) / abs(p.f_star):.2g} | "
                  f"{statistics.median(times):.3g} | {hit}/{len(rs)} | {st} |")  # fmt: skip
    print(f"\nload at end: {load()}")


def trace(name: str, steps: int, exact: bool) -> None:
    p = next(q for q in problems() if q.name == name)
    theta = torch.nn.Parameter(torch.tensor(p.x0, dtype=p.dtype))
    opt = (_Exact if exact else HessianFree)([theta])

    def closure():  # noqa: ANN202
        out = p.outputs(theta, p.dtype)
        loss = p.loss(out, theta)
        return (loss, out) if p.gn else loss

    print(f"## {name}, {'exact' if exact else 'forcing term'}; f* = {p.f_star:.10g}\n")
    print("| step | f − f* (float64) | status | ρ | λ | CG iters | η | calls |")
    print("|---|---|---|---|---|---|---|---|")
    for k in range(steps):
        opt.step(closure)
        s = opt.last_step
        gap = p.f64(theta.detach().double().numpy()) - p.f_star
        share = opt._global_state().get("newton_share", math.nan) if True else (
            math.nan)  # fmt: skip
        print(f"| {k} | {gap:.4g} | {s.status.value} | {s.rho:.4g} | {s.damping:.3g} | "
              f"{s.cg_iters} | {s.cg_rtol:.3g} | {s.closure_calls} | {share:.3g} |")  # fmt: skip


def noise() -> None:
    """lsq32's float32 rounding noise near the optimum: f32 - f64 at the 1-ulp neighbours of
    x* rounded to float32, in units of delta = 8 eps |f*| (HF's float resolution)."""
    p = _lsq(torch.float32)
    rng = np.random.default_rng(3)  # _lsq's A, b again (float64)
    A = rng.standard_normal((40, 6)) * np.logspace(0, 4, 6)
    b = A @ rng.standard_normal(6) + 0.1 * rng.standard_normal(40)
    x32 = np.linalg.lstsq(A, b, rcond=None)[0].astype(np.float32)
    delta = 8 * np.finfo(np.float32).eps * p.f_star
    gap = p.f64(x32.astype(np.float64)) - p.f_star
    diffs = []
    for k in range(200):
        xx, i = x32.copy(), k % 6
        xx[i] = np.nextafter(xx[i], np.float32(np.inf if k % 2 else -np.inf))
        t = torch.tensor(xx)
        with torch.no_grad():
            f32 = float(p.loss(p.outputs(t, torch.float32), t))
        diffs.append(f32 - p.f64(xx.astype(np.float64)))
    d = np.array(diffs)
    print(f"f* {p.f_star:.10g}, delta {delta:.3g}; x* rounded to float32: {gap:.3g} = "
          f"{gap / delta:.3g} delta; float32 rounding error of f at its 1-ulp neighbours: "
          f"std {d.std():.3g} = {d.std() / delta:.3g} delta, "
          f"max |.| {np.abs(d).max():.3g}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["race", "trace", "noise"])
    ap.add_argument("problem", nargs="*")
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--contenders", default="", help="race: a comma-separated subset")
    ap.add_argument("--eta", action="store_true", help="trace: the forcing term (main's rule)")
    a = ap.parse_args()
    if a.part == "race":
        race(a.budget, a.repeats, a.problem, [c for c in a.contenders.split(",") if c])
    elif a.part == "noise":
        noise()
    else:
        trace(a.problem[0], a.steps, not a.eta)


if __name__ == "__main__":
    main()
