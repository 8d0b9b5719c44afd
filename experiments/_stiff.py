"""Small stiff deterministic fits where L-BFGS / scipy is the incumbent (topic "stiff").

Why `HessianFree(params)` with no arguments loses on small, deterministic, stiff fits, and
whether a general change of its damping closes the gap. Problems (float64, full batch, each
seconds on 1 thread, known optimum):

* ``lotka``: ``_unseen6.py``'s Lotka-Volterra fit (RK4 × 100 unrolled, 4 log-parameters);
  f* by scipy LM polished (off the clock). Seeds are noise draws.
* ``misra1a``, ``mgh09``: NIST StRD Misra1a and MGH09 with their certified RSS (NIST,
  https://www.itl.nist.gov/div898/strd/nls/; values in ``_unseen6.py``). Seed 0 = NIST start 1,
  seed 1 = start 2.
* ``expsum``: a three-exponential (pharmacokinetic-like) decay, rates 5, 0.3, 0.01 per unit
  time, amplitudes 1, 0.5, 0.2, 40 samples log-spaced over t ∈ [0.01, 300], 1 % multiplicative
  noise; parameters (log amplitude, log rate) × 3 from a start 2× / ½× off; f* by scipy LM
  polished with an exact Jacobian (off the clock).
* ``rosen``: the extended Rosenbrock function, n = 50, as the sum of squares
  r = (10(x_{i+1} − x_i²), 1 − x_i): ``scipy.optimize.rosen`` is that sum (checked), f* = 0 at
  x = 1; start (−1.2, 1, −1.2, 1, …) (seed 0) or that + 0.1 N(0, 1) (seed 1).
* ``illsq``: linear least squares ½‖Ax − y‖², A 200 × 50 with singular values log-spaced 1 …
  1e-4 (κ(A) = 1e4, κ(AᵀA) = 1e8), y = A x_true + 1e-3 noise; f* from numpy's lstsq.

Contenders (interleaved in one process by each run's own ``time.process_time``; same start):
``HF`` = ``HessianFree(params)``, LBFGS-style closure (exact Hessian); ``HF lo`` = the
``(loss, outputs)`` closure (Gauss-Newton); ``LBFGS``, ``LBFGS sw`` (strong Wolfe); scipy's
``least_squares(method='lm')`` (2-point Jacobian, as a user calls it) and
``minimize(method='L-BFGS-B')`` (gradient by torch autograd), each run alone on the same
clock. Variants ``HF[v]`` / ``HF lo[v]`` are subclasses with a candidate rule (``VARIANTS``).

Parts: ``race`` (time to target and final error, ratios), ``trace`` (per-step λ, ρ, λ's share
of the step λ‖p‖²/pᵀCp, CG iterations and stop, closure calls, rate).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_stiff.py [problem ...] \
        [--part race|trace] [--budget S] [--seeds 0,1] [--contenders HF,HF[geo]]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _unseen6 as u6  # noqa: E402

import hessfree  # noqa: E402

torch.set_num_threads(1)
Problem = u6.Problem


# ------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------
class Vector(nn.Module):
    """One parameter vector b; ``residual(b)`` gives the residuals (targets folded in)."""

    def __init__(self, residual: Callable[[torch.Tensor], torch.Tensor], b0: list[float]):
        super().__init__()
        self.residual = residual
        self.b = nn.Parameter(torch.tensor(b0, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return self.residual(self.b)


def _residual_problem(
    title: str,
    residual: Callable[[torch.Tensor], torch.Tensor],
    b0: list[float],
    f_star: float,
    certified: list[float] | None = None,
) -> Problem:
    """A sum of squared residuals ``Σ r(b)²`` with its scipy runners."""
    model = Vector(residual, b0)

    def lo_of(m):
        r = m()
        return F.mse_loss(r, torch.zeros_like(r), reduction="sum"), r

    def scipy_run(budget: float, method: str = "lm") -> list[tuple[float, float]]:
        import scipy.optimize

        curve: list[tuple[float, float]] = []
        t0 = time.process_time()
        if method == "lm":

            def res(b):
                with torch.no_grad():
                    r = residual(torch.from_numpy(b)).numpy()
                curve.append((time.process_time() - t0, float(r @ r)))
                return r

            scipy.optimize.least_squares(res, b0, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
            return curve

        def fg(b):
            bt = torch.from_numpy(b).requires_grad_(True)
            r = residual(bt)
            f = (r * r).sum()
            (grad,) = torch.autograd.grad(f, bt)
            curve.append((time.process_time() - t0, float(f)))
            return float(f), grad.numpy()

        opts = dict(ftol=1e-16, gtol=1e-13, maxiter=100000, maxfun=100000)
        scipy.optimize.minimize(fg, np.array(b0), jac=True, method="L-BFGS-B", options=opts)
        return curve

    p = Problem(title, model, lambda m: lo_of(m)[0], lo_of, n=0, f_star=f_star, certified=certified)
    p.scipy = scipy_run
    return p


def _polished(residual: Callable[[torch.Tensor], torch.Tensor], b0: list[float]) -> float:
    """f* by scipy LM with the exact (autograd) Jacobian, to 1e-15 (off the clock)."""
    import scipy.optimize

    def res(b):
        with torch.no_grad():
            return residual(torch.from_numpy(b)).numpy()

    def jac(b):
        return torch.autograd.functional.jacobian(residual, torch.from_numpy(b)).numpy()

    best = math.inf
    start = np.array(b0)
    for _ in range(3):
        out = scipy.optimize.least_squares(
            res, start, jac=jac, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
        )
        best, start = min(best, float(out.fun @ out.fun)), out.x
    return best


def p_lotka(seed: int) -> Problem:
    return u6.p_lotka(seed)


def p_misra1a(seed: int) -> Problem:
    b0 = [500.0, 1e-4] if seed == 0 else [250.0, 5e-4]
    p = u6._nist(f"NIST Misra1a, start {seed + 1}", u6._misra, u6.MISRA_X, u6.MISRA_Y, b0,
                 u6.MISRA_RSS, u6.MISRA_B)  # fmt: skip
    return p


def p_mgh09(seed: int) -> Problem:
    b0 = [25.0, 39.0, 41.5, 39.0] if seed == 0 else [0.25, 0.39, 0.415, 0.39]
    return u6._nist(f"NIST MGH09, start {seed + 1}", u6._mgh09, u6.MGH09_X, u6.MGH09_Y, b0,
                    u6.MGH09_RSS, u6.MGH09_B)  # fmt: skip


EXP_A, EXP_K = [1.0, 0.5, 0.2], [5.0, 0.3, 0.01]


def p_expsum(seed: int) -> Problem:
    t = torch.logspace(-2, math.log10(300.0), 40, dtype=torch.float64)
    a, k = torch.tensor(EXP_A, dtype=torch.float64), torch.tensor(EXP_K, dtype=torch.float64)
    clean = (a[:, None] * torch.exp(-k[:, None] * t)).sum(0)
    g = torch.Generator().manual_seed(seed)
    y = clean * (1 + 0.01 * torch.randn(t.shape, generator=g, dtype=torch.float64))

    def residual(b):
        amp, rate = b[0::2].exp(), b[1::2].exp()
        return (amp[:, None] * torch.exp(-rate[:, None] * t)).sum(0) - y

    off = [2.0, 0.5, 0.5, 2.0, 2.0, 0.5]
    b0 = [math.log(v * f) for v, f in zip([x for ak in zip(EXP_A, EXP_K, strict=True) for x in ak],
                                          off, strict=True)]  # fmt: skip
    truth = [math.log(x) for ak in zip(EXP_A, EXP_K, strict=True) for x in ak]
    f_star = min(_polished(residual, b0), _polished(residual, truth))
    return _residual_problem("three-exponential decay, rates 5 / 0.3 / 0.01", residual, b0, f_star)


def p_rosen(seed: int, n: int = 50) -> Problem:
    import scipy.optimize

    x0 = torch.tensor([-1.2, 1.0] * (n // 2), dtype=torch.float64)
    if seed:
        g = torch.Generator().manual_seed(seed)
        x0 = x0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)

    def residual(x):
        return torch.cat([10.0 * (x[1:] - x[:-1] ** 2), 1.0 - x[:-1]])

    r = residual(x0)
    assert abs(float(r @ r) - scipy.optimize.rosen(x0.numpy())) <= 1e-12 * float(r @ r)
    return _residual_problem(f"extended Rosenbrock, n = {n}", residual, x0.tolist(), 0.0)


def p_illsq(seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    m, n = 200, 50
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -4, n, dtype=torch.float64)
    a = u * s @ v.T
    x_true = torch.randn(n, generator=g, dtype=torch.float64)
    y = a @ x_true + 1e-3 * torch.randn(m, generator=g, dtype=torch.float64)
    sol = np.linalg.lstsq(a.numpy(), y.numpy(), rcond=None)[0]
    res = a.numpy() @ sol - y.numpy()
    f_star = float(res @ res)

    def residual(x):
        return a @ x - y

    return _residual_problem("linear least squares, κ(A) = 1e4", residual, [0.0] * n, f_star)


PROBLEMS: dict[str, Callable[[int], Problem]] = {
    "lotka": p_lotka,
    "misra1a": p_misra1a,
    "mgh09": p_mgh09,
    "expsum": p_expsum,
    "rosen": p_rosen,
    "illsq": p_illsq,
}
BUDGET = {"lotka": 10.0, "misra1a": 1.0, "mgh09": 1.0, "expsum": 1.5, "rosen": 2.0, "illsq": 1.0}


# ------------------------------------------------------------------------------------------
# HF variants (subclasses; "main" = the library as it is)
# ------------------------------------------------------------------------------------------
class Traced(hessfree.HessianFree):
    """Records λ's share of each step (λ‖p‖²/pᵀCp, what the fblam streak reads)."""

    def _good_streak(self, state: dict, rho: float, share: float) -> int:
        self.shares = getattr(self, "shares", {})
        self.shares[state["step"]] = share
        return super()._good_streak(state, rho, share)


class Geometric(Traced):
    """Candidate "geo": Nielsen's ν mirrored downward on a deterministic objective. The s-th
    consecutive accepted step with |ρ − 1| ≤ ``band`` lowers λ by a further ⅓^(s−1) after
    Nielsen's factor (⅓, ⅑, 1/27, …, at most ``deepest`` in one step), whatever λ's share of
    the step (fblam's streak needs λ‖p‖² > pᵀCp, which a step along the stiff direction never
    has). Any other step ends the streak (the library's ``state['good_streak']`` resets on
    rejections and converged steps)."""

    band = 0.1
    deepest = 1e-4

    def _good_streak(self, state: dict, rho: float, share: float) -> int:
        Traced._good_streak(self, state, math.nan, share)  # record share, end fblam's streak
        s = self.settings
        eligible = (
            state.get("deterministic") is True
            and s.adapt_damping
            and s.damping_rule == "nielsen"
            and not state.get("structurally_damped", False)
        )
        if not (eligible and abs(rho - 1.0) <= self.band):
            state.pop("geo_streak", None)
            return 0
        state["geo_streak"] = streak = state.get("geo_streak", 0) + 1
        if streak > 1:
            extra = max((1.0 / 3.0) ** (streak - 1), self.deepest)
            self._adapt_damping(state, state["damping"], lambda pol, lam: pol.clip(lam * extra))
        return 0


class Geometric25(Geometric):
    """Candidate "geo25": the band |ρ − 1| ≤ 0.25 (ρ ≥ ¾, Martens' "good")."""

    band = 0.25


class GeometricShare(Geometric):
    """Candidate "geos": "geo" only while λ is not small against the model along the step
    (share = λ‖p‖²/pᵀCp > 0.1; fblam's GELU failure cut λ at share 0.04)."""

    def _good_streak(self, state: dict, rho: float, share: float) -> int:
        return super()._good_streak(state, rho if share > 0.1 else math.nan, share)


def interpolating_armijo(
    objective: Callable[[float], float],
    f0: float,
    slope: float,
    f1: float,
    *,
    c: float,
    shrink: float,
    max_iter: int,
    resolution: float = 0.0,
) -> tuple[float, float]:
    """``hessfree._line_search.armijo`` with a safeguarded quadratic-interpolation backtrack
    (Nocedal & Wright 2006, §3.5): the next rate is the minimiser of the quadratic through
    f(0), f'(0) = slope and f(t), clipped to [t/10, shrink·t]; t/10 where f(t) is not finite."""
    rate, f = 1.0, f1
    for _ in range(max_iter - 1):
        if f <= f0 + c * rate * slope or shrink * rate * -slope <= resolution:
            break
        curv = f - f0 - slope * rate
        if math.isfinite(f) and curv > 0:
            new = -slope * rate * rate / (2.0 * curv)
            rate = min(max(new, 0.1 * rate), shrink * rate)
        else:
            rate *= 0.1
        f = objective(rate)
    if not f <= f0 + c * rate * slope:
        return 0.0, f
    return rate, f


class Interpolating(Traced):
    """Candidate "interp": the Armijo search backtracks by quadratic interpolation instead of
    0.8 a try (on Lotka-Volterra a search after ρ = −∞ took 19 tries, 0.8¹⁹ = 0.014)."""

    def _line_search(self, objective, f0, slope, f_full, resolution):  # noqa: ANN001, ANN202
        st = self.settings
        if not slope < 0.0:
            return 0.0, f_full
        if st.line_search is None:
            return (1.0 if f_full < math.inf else 0.0), f_full
        return interpolating_armijo(
            objective, f0, slope, f_full, c=st.armijo_c, shrink=st.line_search_shrink,
            max_iter=st.line_search_max_iter, resolution=resolution,
        )  # fmt: skip


class NoGradTolerance(Traced):
    """Diagnosis "tg0": ``tolerance_grad=0`` (the default 1e-7 is absolute, as LBFGS')."""

    def __init__(self, params, **kwargs):  # noqa: ANN001, ANN003, ANN204
        super().__init__(params, **{"tolerance_grad": 0.0, **kwargs})


VARIANTS: dict[str, type] = {
    "tg0": NoGradTolerance,
    "interp": Interpolating,
    "": Traced,
    "geo": Geometric,
    "geo25": Geometric25,
    "geos": GeometricShare,
}


def _hf(name: str, params: list, **kwargs: Any) -> hessfree.HessianFree:
    v = name.split("[")[1][:-1] if "[" in name else ""
    return VARIANTS[v](params, **kwargs)


def make_run(name: str, prob: Problem, seed: int) -> u6.Run:
    model = copy.deepcopy(prob.model)
    params = list(model.parameters())
    if name.startswith("HF"):
        opt: Any = _hf(name, params)
    else:
        opt = torch.optim.LBFGS(params, line_search_fn="strong_wolfe" if "sw" in name else None)

    def closure():
        opt.zero_grad()
        loss = prob.loss_of(model)
        loss.backward()
        return loss

    if name.startswith("HF lo"):

        def step():
            return opt.step(lambda: prob.lo_of(model))

    else:

        def step():
            return opt.step(closure)

    def evaluate() -> float:
        with torch.no_grad():
            return prob.loss_of(model).item()

    r = u6.Run(name, step, evaluate, opt)
    r.model = model  # type: ignore[attr-defined]
    return r


def _scipy_curves(prob: Problem, budget: float) -> dict[str, list[tuple[float, float]]]:
    """scipy alone on the same clock; each curve the best value so far per evaluation."""
    import inspect

    takes_method = "method" in inspect.signature(prob.scipy).parameters
    out = {}
    for m in ["lm", "lbfgsb"] if takes_method else ["lm"]:
        sc = prob.scipy(budget, m) if takes_method else prob.scipy(budget)
        best, curve = math.inf, []
        for t, f in sc:
            best = min(best, f)
            curve.append((t, best))
        out[f"scipy {m}"] = curve
    return out


def race(key: str, seed: int, budget: float, names: list[str], rows: list) -> None:
    prob = PROBLEMS[key](seed)
    runs = [make_run(n, prob, seed) for n in names]
    load0 = os.getloadavg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u6.interleave(runs, budget, eval_every=budget / 100)
    curves = {r.name: r.curve for r in runs}
    curves.update(_scipy_curves(prob, budget))
    load1 = os.getloadavg()
    f_star = prob.f_star
    # target: f − f* ≤ 1e-8 f* (f* > 0), else f ≤ 1e-10 (f* = 0: Rosenbrock)
    tol = 1e-8 * f_star if f_star > 0 else 1e-10
    target = f_star + tol
    floor = 1e-10 * f_star if f_star > 0 else 1e-20
    print(f"\n#### {key}, seed {seed}, {budget:g} CPU s each: {prob.title}\n")
    print(f"load {load0[0]:.2f} → {load1[0]:.2f}; f* = {f_star:.10g}; target f − f* ≤ {tol:.3g}\n")
    works: dict[str, float] = {}
    print("| run | steps | CPU / wall s | f − f* at ½ / 1 | t to target (CPU s) | HF trace |")
    print("|---|---|---|---|---|---|")
    for name, curve in curves.items():
        vals = [max(u6.best_at(curve, fr * budget) - f_star, floor) for fr in (0.5, 1.0)]
        tt = u6.time_to(curve, target)
        r = next((r for r in runs if r.name == name), None)
        notes = ""
        if r is not None:
            notes = "; ".join(x for x in (r.failed, u6.hf_notes(r.infos)) if x)
            if r.infos:  # load-free: steps and work (closure calls + products) to the target
                k, work = _work_to(r.infos, target)
                notes = f"**steps {k}, work {work}** to target; " + notes
                works[name] = work
        steps = r.steps if r else len(curve)
        cw = f"{r.clock:.2f} / {r.wall:.2f}" if r else f"{curve[-1][0]:.3f}"
        v2 = " / ".join(f"{v:.3g}" for v in vals)
        print(f"| {name} | {steps} | {cw} | {v2} | {tt:.3g} | {notes} |")
        rows.append((key, seed, name, tt, vals[1]))
    for name, w in works.items():
        if "[" in name and name.split("[")[0] in works:
            base = works[name.split("[")[0]]
            print(f"\nwork to target {name} / {name.split('[')[0]}: {w / base:.3g}")


def _work_to(infos: list, target: float) -> tuple[int | float, int | float]:
    """Steps and closure calls + curvature products until ``loss_after`` ≤ ``target``."""
    work = 0
    for k, s in enumerate(infos, 1):
        work += s.closure_calls + s.cg_matvecs
        if s.loss_after <= target:
            return k, work
    return math.inf, math.inf


def summary(rows: list, budget_of: dict) -> None:
    """Per problem and seed: each contender's time to target and final error over the best
    baseline's (non-HF)."""
    print("\n#### summary: time to target / best baseline's, final f − f* / best baseline's\n")
    names = list(dict.fromkeys(r[2] for r in rows))
    print("| problem, seed | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for key, seed in dict.fromkeys((r[0], r[1]) for r in rows):
        mine = {r[2]: r for r in rows if r[0] == key and r[1] == seed}
        base = [r for n, r in mine.items() if not n.startswith("HF")]
        bt = min(r[3] for r in base)
        bf = min(r[4] for r in base)
        cells = []
        for n in names:
            if n not in mine:
                cells.append("")
                continue
            _, _, _, tt, fv = mine[n]
            tq = (
                f"{tt / bt:.3g}"
                if math.isfinite(tt) and bt > 0
                else ("never" if not math.isfinite(tt) else "0")
            )
            cells.append(f"{tq} ({fv / bf:.2g})")
        print(f"| {key} {seed} | " + " | ".join(cells) + " |")


def trace(key: str, seed: int, budget: float, name: str) -> None:
    prob = PROBLEMS[key](seed)
    r = make_run(name, prob, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u6.interleave([r], budget, eval_every=budget / 20)
    shares = getattr(r.opt, "shares", {})
    print(f"\n#### trace {key} `{name}`, seed {seed}, {budget:g} CPU s, {r.steps} steps\n")
    print("| step | f − f* | status | λ | ρ | share | CG iters / stop | calls | rate | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, s in enumerate(r.infos):
        print(
            f"| {i} | {s.loss - prob.f_star:.3e} | {s.status} | {s.damping:.2e} | {s.rho:.3f} | "
            f"{shares.get(i, math.nan):.3g} | {s.cg_iters} / {s.cg_reason} | {s.closure_calls} | "
            f"{s.step_rate:.3g} | {s.time_total:.3f} |"
        )
    if r.infos:
        s = r.infos[-1]
        print(f"\nlast loss_after − f* {s.loss_after - prob.f_star:.3e}; {r.failed}")


def lam0(key: str, seed: int, budget: float) -> None:
    """Given λ₀ against the default's Rayleigh quotient: CPU time and steps to the target, one
    run at a time (diagnosis: what a right λ₀ alone would buy)."""
    prob = PROBLEMS[key](seed)
    target = 1e-8 * prob.f_star if prob.f_star > 0 else 1e-10
    print(f"\n#### lam0 {key}, seed {seed}, load {os.getloadavg()[0]:.2f}\n")
    print("| λ₀ | closure | CPU s to target | steps | f − f* / λ / CG iterations per step |")
    print("|---|---|---|---|---|")
    for lam in [None, 100.0, 1.0, 1e-2]:
        for lo in (True, False):
            model = copy.deepcopy(prob.model)
            opt = hessfree.HessianFree(list(model.parameters()), **({} if lam is None else
                                                                    dict(damping=lam)))  # fmt: skip

            def closure(m=model, o=opt):
                o.zero_grad()
                loss = prob.loss_of(m)
                loss.backward()
                return loss

            clock, hit, out = 0.0, math.inf, []
            while clock < budget and hit == math.inf:
                c0 = time.process_time()
                opt.step((lambda m=model: prob.lo_of(m)) if lo else closure)
                clock += time.process_time() - c0
                with torch.no_grad():
                    f = prob.loss_of(model).item() - prob.f_star
                s = opt.last_step
                out.append(f"{f:.1e}/{s.damping:.0e}/{s.cg_iters}")
                hit = clock if f <= target else hit
            name = "auto" if lam is None else f"{lam:g}"
            print(f"| {name} | {'lo' if lo else 'H'} | {hit:.3g} | {len(out)} | {' '.join(out)} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="*", default=list(PROBLEMS))
    ap.add_argument("--part", default="race", choices=["race", "trace", "lam0"])
    ap.add_argument("--budget", type=float, default=0.0)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--contenders", default="HF,HF lo,LBFGS,LBFGS sw")
    args = ap.parse_args()
    rows: list = []
    for key in args.problems:
        budget = args.budget or BUDGET[key]
        for seed in [int(s) for s in args.seeds.split(",")]:
            if args.part == "race":
                race(key, seed, budget, args.contenders.split(","), rows)
            elif args.part == "lam0":
                lam0(key, seed, budget)
            else:
                for name in args.contenders.split(","):
                    trace(key, seed, budget, name)
    if rows:
        summary(rows, BUDGET)


if __name__ == "__main__":
    main()
