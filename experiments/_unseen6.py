"""`HessianFree(params)` with no arguments on six problems no earlier pass had tried (topic
"unseen6"), against what a second-order user would pick instead, at equal CPU time.

Problems (each builds data, model and initial weights from a seed; all run in seconds on 1 thread):

* ``misra1a``: NIST StRD Misra1a, y = b1 (1 − exp(−b2 x)), 14 cases, NIST's start 1
  (500, 1e-4), float64. Certified b = (2.3894212918e2, 5.5015643181e-4), RSS 1.2455138894e-1
  (the data below reproduce it with ``scipy.optimize.least_squares``). Badly scaled: b1/b2 ~ 4e5.
* ``mgh09``: NIST StRD MGH09 (Kowalik & Osborne), y = b1 (x² + x b2) / (x² + x b3 + b4), 11
  cases, NIST's start 2 (0.25, 0.39, 0.415, 0.39), float64 (``mgh09f32``: the same in float32).
  Certified RSS 3.0750560385e-4.
* ``illlogreg``: binary logistic regression, 2,000 × 40 features scaled to a condition number of
  XᵀX ≈ 1e6, labels from a noisy logistic model, L2 1e-4, float64; f* by scipy L-BFGS-B to 1e-14.
* ``deepae``: Hinton & Salakhutdinov-style deep narrow sigmoid autoencoder 64-32-16-4-16-32-64
  (linear code layer) on sklearn's digits (/16), squared error summed over pixels, mean over cases.
* ``mult``: the multiplication task (Hochreiter & Schmidhuber 1997; Martens & Sutskever 2011):
  T = 30 pairs (value ~ U(0, 1), marker), two marked values, target their product; a tanh
  ``nn.RNN`` (hidden 32) + linear read-out, MSE; 2,000 training sequences, 1,000 held out.
* ``lotka``: parameter identification of Lotka-Volterra (α, β, δ, γ) = (1.0, 0.5, 0.2, 0.6) from
  20 noisy observations of both species over t ∈ [0, 10], an RK4 integration (100 steps) unrolled
  in torch, log-parameters fitted from a start 2× / 0.5× off, float64.

Contenders (interleaved in one process; each run's clock is ``time.process_time`` of its own
``step`` calls, wall time recorded too; the objective is evaluated off the clock):
``HF`` = ``HessianFree(params)``, LBFGS-style closure (``zero_grad``, ``backward``, return the
loss); ``HF lo`` = the same with a ``(loss, outputs)`` closure (Gauss-Newton); ``HF mb`` (mult,
deepae) a fresh mini-batch of 250 per step with the ``(loss, outputs)`` closure; ``LBFGS sw`` =
``torch.optim.LBFGS(params, line_search_fn='strong_wolfe')``; ``LBFGS`` its default;
``Adam <lr>`` at 1e-3/3e-3/1e-2 on mini-batches of 64 (deepae, mult). scipy
(``least_squares(method='lm')``, ``minimize(method='L-BFGS-B')``) runs alone on the same clock,
its curve recorded at each function evaluation.

Parts: ``race`` (the tables), ``trace`` (HF's per-step record: λ, ρ, CG iterations and stop, rate),
``misuse`` (wrong closures and data: the error, and whether the parameters stayed bit-identical).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_unseen6.py [problem ...] \
        [--part race|trace|misuse] [--budget S] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hessfree

torch.set_num_threads(1)

# NIST StRD, https://www.itl.nist.gov/div898/strd/nls/ (data and certified values)
MISRA_X = [77.6, 114.9, 141.1, 190.8, 239.9, 289.0, 332.8, 378.4, 434.8, 477.3, 536.8, 593.1,
           689.1, 760.0]  # fmt: skip
MISRA_Y = [10.07, 14.73, 17.94, 23.93, 29.61, 35.18, 40.02, 44.82, 50.76, 55.05, 61.01, 66.40,
           75.47, 81.78]  # fmt: skip
MISRA_B = [2.3894212918e02, 5.5015643181e-04]
MISRA_RSS = 1.2455138894e-01
MGH09_X = [4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625]
MGH09_Y = [1.957e-1, 1.947e-1, 1.735e-1, 1.6e-1, 8.44e-2, 6.27e-2, 4.56e-2, 3.42e-2, 3.23e-2,
           2.35e-2, 2.46e-2]  # fmt: skip
MGH09_B = [1.9280693458e-01, 1.9128232873e-01, 1.2305650693e-01, 1.3606233068e-01]
MGH09_RSS = 3.0750560385e-04


@dataclass
class Problem:
    """``model``: initial weights; ``loss_of(model)``: the full objective (what is reported);
    ``lo_of(model)``: the ``(loss, outputs)`` closure body; ``batch_of(model, idx)``: the
    ``(loss, outputs)`` of a mini-batch (None: full batch only); ``n``: number of cases;
    ``f_star``: known optimum; ``scipy``: a function running scipy alone (curve, final b)."""

    title: str
    model: nn.Module
    loss_of: Callable[[nn.Module], torch.Tensor]
    lo_of: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]
    batch_of: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    n: int = 0
    f_star: float | None = None
    held_out: Callable[[nn.Module], float] | None = None
    scipy: Callable[[float], list[tuple[float, float]]] | None = None
    certified: list[float] | None = None


class Curve(nn.Module):
    """Parameters b (one vector) of a closed-form curve ``fn(x, b)``."""

    def __init__(self, fn: Callable, x: torch.Tensor, b0: list[float]) -> None:
        super().__init__()
        self.fn, self.x = fn, x
        self.b = nn.Parameter(torch.tensor(b0, dtype=x.dtype))

    def forward(self) -> torch.Tensor:
        return self.fn(self.x, self.b)


def _misra(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b[0] * (1 - torch.exp(-b[1] * x))


def _mgh09(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b[0] * (x**2 + x * b[1]) / (x**2 + x * b[2] + b[3])


def _nist(title, fn, xs, ys, b0, rss, cert, dtype=torch.float64) -> Problem:
    x, y = torch.tensor(xs, dtype=dtype), torch.tensor(ys, dtype=dtype)
    model = Curve(fn, x, b0)

    def lo_of(m):
        out = m()
        return F.mse_loss(out, y, reduction="sum"), out

    def scipy_run(budget: float) -> list[tuple[float, float]]:
        import scipy.optimize

        xn, yn = np.array(xs), np.array(ys)
        curve: list[tuple[float, float]] = []
        t0 = time.process_time()

        def res(b):
            r = fn(torch.from_numpy(xn), torch.from_numpy(b)).numpy() - yn
            curve.append((time.process_time() - t0, float(r @ r)))
            return r

        scipy.optimize.least_squares(res, b0, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
        return curve

    return Problem(title, model, lambda m: lo_of(m)[0], lo_of, n=len(xs), f_star=rss,
                   scipy=scipy_run, certified=cert)  # fmt: skip


def p_misra1a(seed: int) -> Problem:
    return _nist("NIST Misra1a, start 1, f64 (RSS)", _misra, MISRA_X, MISRA_Y, [500.0, 1e-4],
                 MISRA_RSS, MISRA_B)  # fmt: skip


def p_mgh09(seed: int) -> Problem:
    return _nist("NIST MGH09, start 2, f64 (RSS)", _mgh09, MGH09_X, MGH09_Y,
                 [0.25, 0.39, 0.415, 0.39], MGH09_RSS, MGH09_B)  # fmt: skip


def p_mgh09s1(seed: int) -> Problem:
    return _nist("NIST MGH09, start 1 (hard), f64 (RSS)", _mgh09, MGH09_X, MGH09_Y,
                 [25.0, 39.0, 41.5, 39.0], MGH09_RSS, MGH09_B)  # fmt: skip


def p_mgh09f32(seed: int) -> Problem:
    p = _nist("NIST MGH09, start 2, float32 (RSS)", _mgh09, MGH09_X, MGH09_Y,
              [0.25, 0.39, 0.415, 0.39], MGH09_RSS, MGH09_B, torch.float32)  # fmt: skip
    return p


def p_illlogreg(seed: int) -> Problem:
    import scipy.optimize

    g = torch.Generator().manual_seed(seed)
    n, d, l2 = 2000, 40, 1e-4
    scale = torch.logspace(0, -3, d, dtype=torch.float64)  # cond(XᵀX) ≈ 1e6
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale @ q.T
    w_true = torch.randn(d, generator=g, dtype=torch.float64) @ q.T / scale.mean()
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w_true)).double()
    model = nn.Linear(d, 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()

    def lo_of(m):
        out = m(x).squeeze(1)
        return F.binary_cross_entropy_with_logits(out, y) + l2 / 2 * m.weight.pow(2).sum(), out

    xn, yn = x.numpy(), y.numpy()

    def fg(wb):
        z = xn @ wb[:d] + wb[d]
        f = np.mean(np.logaddexp(0, z) - yn * z) + l2 / 2 * wb[:d] @ wb[:d]
        s = 1 / (1 + np.exp(-z)) - yn
        return f, np.concatenate([xn.T @ s / n + l2 * wb[:d], [s.mean()]])

    opt = scipy.optimize.minimize(fg, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                                  options=dict(ftol=1e-16, gtol=1e-13, maxiter=100000))  # fmt: skip
    f_star = opt.fun
    # polish with Newton in float64 (the problem is smooth and strongly convex)
    wb = opt.x
    for _ in range(5):
        z = xn @ wb[:d] + wb[d]
        s = 1 / (1 + np.exp(-z))
        a = np.hstack([xn, np.ones((n, 1))])
        h = a.T @ (a * (s * (1 - s))[:, None]) / n + np.diag([l2] * d + [0.0])
        wb = wb - np.linalg.solve(h, fg(wb)[1])
    f_star = min(f_star, fg(wb)[0])

    def scipy_run(budget: float) -> list[tuple[float, float]]:
        curve: list[tuple[float, float]] = []
        t0 = time.process_time()

        def f(wb):
            out = fg(wb)
            curve.append((time.process_time() - t0, float(out[0])))
            return out

        scipy.optimize.minimize(f, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                                options=dict(ftol=1e-16, gtol=1e-13, maxiter=100000))  # fmt: skip
        return curve

    return Problem("ill-conditioned logistic regression, cond(XᵀX) 1e6, f64", model,
                   lambda m: lo_of(m)[0], lo_of, n=n, f_star=f_star, scipy=scipy_run)  # fmt: skip


def p_deepae(seed: int) -> Problem:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = x[torch.randperm(len(x), generator=g)]
    xtr, xte = x[:1500], x[1500:]
    torch.manual_seed(seed)
    sizes = [64, 32, 16, 4, 16, 32, 64]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i != 2 and i != len(sizes) - 2:  # linear code layer, sigmoid read-out below
            layers.append(nn.Sigmoid())
    layers.append(nn.Sigmoid())
    model = nn.Sequential(*layers)

    def batch_of(m, idx):
        out = m(xtr[idx])
        return F.mse_loss(out, xtr[idx], reduction="sum") / out.shape[0], out

    def held_out(m):
        with torch.no_grad():
            return (F.mse_loss(m(xte), xte, reduction="sum") / len(xte)).item()

    return Problem("deep sigmoid autoencoder 64-32-16-4-16-32-64, digits, SSE/case",
                   model, lambda m: batch_of(m, slice(None))[0],
                   lambda m: batch_of(m, slice(None)), batch_of, n=1500,
                   held_out=held_out)  # fmt: skip


class RNNReg(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True, nonlinearity="tanh")
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.out(h[:, -1]).squeeze(1)


def mult_data(n: int, t: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    vals = torch.rand(n, t, generator=g)
    marks = torch.zeros(n, t)
    first = torch.randint(0, t // 2, (n,), generator=g)  # one mark in each half (M&S 2011)
    second = torch.randint(t // 2, t, (n,), generator=g)
    marks[torch.arange(n), first] = 1.0
    marks[torch.arange(n), second] = 1.0
    y = vals[torch.arange(n), first] * vals[torch.arange(n), second]
    return torch.stack([vals, marks], dim=2), y


def p_mult(seed: int) -> Problem:
    g = torch.Generator().manual_seed(1234)
    xtr, ytr = mult_data(2000, 30, g)
    xte, yte = mult_data(1000, 30, g)
    torch.manual_seed(seed)
    model = RNNReg()
    var = yte.var().item()

    def batch_of(m, idx):
        out = m(xtr[idx])
        return F.mse_loss(out, ytr[idx]) / var, out

    def held_out(m):
        with torch.no_grad():
            return (F.mse_loss(m(xte), yte) / var).item()

    return Problem("multiplication task T = 30, tanh RNN 32, MSE / Var(y)", model,
                   lambda m: batch_of(m, slice(None))[0], lambda m: batch_of(m, slice(None)),
                   batch_of, n=2000, held_out=held_out)  # fmt: skip


class LotkaVolterra(nn.Module):
    def __init__(self, logp0: list[float], t_end: float = 10.0, steps: int = 100) -> None:
        super().__init__()
        self.logp = nn.Parameter(torch.tensor(logp0, dtype=torch.float64))
        self.dt, self.steps = t_end / steps, steps

    def forward(self, every: int = 1) -> torch.Tensor:
        a, b, d, c = self.logp.exp()

        def f(u):
            return torch.stack([a * u[0] - b * u[0] * u[1], d * u[0] * u[1] - c * u[1]])

        u = torch.tensor([2.0, 1.0], dtype=torch.float64)
        out = []
        for i in range(self.steps):
            k1 = f(u)
            k2 = f(u + self.dt / 2 * k1)
            k3 = f(u + self.dt / 2 * k2)
            k4 = f(u + self.dt * k3)
            u = u + self.dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            if (i + 1) % every == 0:
                out.append(u)
        return torch.stack(out)


def p_lotka(seed: int) -> Problem:
    import scipy.optimize

    true = [1.0, 0.5, 0.2, 0.6]
    truth = LotkaVolterra([math.log(v) for v in true])
    with torch.no_grad():
        clean = truth()[4::5]
    g = torch.Generator().manual_seed(seed)
    obs = clean * (1 + 0.05 * torch.randn(clean.shape, generator=g, dtype=torch.float64))
    start = [math.log(v * f) for v, f in zip(true, [2.0, 0.5, 2.0, 0.5], strict=True)]
    model = LotkaVolterra(start)

    def lo_of(m):
        out = m()[4::5]
        return F.mse_loss(out, obs, reduction="sum"), out

    def run_np(p):
        with torch.no_grad():
            m = LotkaVolterra(list(p))
            return (m()[4::5] - obs).reshape(-1).numpy()

    # reference optimum: scipy LM with forward differences, polished (off the clock)
    ref = scipy.optimize.least_squares(run_np, start, method="lm", xtol=1e-15, ftol=1e-15)
    f_star = float(ref.fun @ ref.fun)

    def scipy_run(budget: float) -> list[tuple[float, float]]:
        curve: list[tuple[float, float]] = []
        t0 = time.process_time()

        def res(p):
            r = run_np(p)
            curve.append((time.process_time() - t0, float(r @ r)))
            return r

        scipy.optimize.least_squares(res, start, method="lm", xtol=1e-15, ftol=1e-15)
        return curve

    return Problem("Lotka-Volterra parameter fit, RK4 × 100 unrolled, f64 (SSE)", model,
                   lambda m: lo_of(m)[0], lo_of, n=40, f_star=f_star, scipy=scipy_run)  # fmt: skip


PROBLEMS: dict[str, Callable[[int], Problem]] = {
    "misra1a": p_misra1a,
    "mgh09": p_mgh09,
    "mgh09s1": p_mgh09s1,
    "mgh09f32": p_mgh09f32,
    "illlogreg": p_illlogreg,
    "deepae": p_deepae,
    "mult": p_mult,
    "lotka": p_lotka,
}
MINIBATCH = {"deepae", "mult"}
#: ``"HF lo[marq]"``: HF with these settings (diagnosis only; the tables' ``HF`` rows are defaults)
VARIANTS: dict[str, dict] = {
    "marq": {"damping_metric": "marquardt"},
    "eta": {"cg_rtol": 1e-4},  # a tight CG residual instead of the Eisenstat-Walker forcing term
    "lam": {"damping": 1e-2},  # a small given λ₀ instead of the Rayleigh quotient along g
}


# ------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    step: Callable[[], Any]
    evaluate: Callable[[], float]
    opt: Any = None
    clock: float = 0.0  # process_time of its own steps
    wall: float = 0.0
    steps: int = 0
    failed: str = ""
    curve: list[tuple[float, float]] = field(default_factory=list)
    infos: list[Any] = field(default_factory=list)
    warns: list[str] = field(default_factory=list)


def make_run(name: str, prob: Problem, seed: int) -> Run:
    model = copy.deepcopy(prob.model)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(100 + seed)  # same batch stream for every mini-batch run
    if name.startswith("HF"):
        kwargs = VARIANTS[name.split("[")[1][:-1]] if "[" in name else {}
        opt: Any = hessfree.HessianFree(params, **kwargs)
    elif name.startswith("Adam"):
        opt = torch.optim.Adam(params, lr=float(name.split()[1]))
    else:
        opt = torch.optim.LBFGS(params, line_search_fn="strong_wolfe" if "sw" in name else None)

    base = name.split("[")[0]
    if base == "HF":

        def closure():
            opt.zero_grad()
            loss = prob.loss_of(model)
            loss.backward()
            return loss

        def step():
            return opt.step(closure)

    elif base == "HF lo":

        def step():
            return opt.step(lambda: prob.lo_of(model))

    elif base == "HF mb":

        def step():
            idx = torch.randint(0, prob.n, (250,), generator=g)
            return opt.step(lambda: prob.batch_of(model, idx))

    elif name.startswith("Adam"):

        def step():
            idx = torch.randint(0, prob.n, (64,), generator=g)
            opt.zero_grad()
            loss = prob.batch_of(model, idx)[0]
            loss.backward()
            opt.step()

    else:

        def closure():
            opt.zero_grad()
            loss = prob.loss_of(model)
            loss.backward()
            return loss

        def step():
            return opt.step(closure)

    def evaluate() -> float:
        with torch.no_grad():
            return prob.loss_of(model).item()

    r = Run(name, step, evaluate, opt)
    r.model = model  # type: ignore[attr-defined]
    return r


def interleave(runs: list[Run], budget: float, eval_every: float) -> None:
    """Step the run with the least CPU time so far until each has spent ``budget``."""
    for r in runs:
        r.curve.append((0.0, r.evaluate()))
    next_eval = {r.name: eval_every for r in runs}
    while True:
        live = [r for r in runs if not r.failed and r.clock < budget]
        if not live:
            break
        r = min(live, key=lambda r: r.clock)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                r.step()
            except Exception as err:  # noqa: BLE001 - a failing optimizer is a result
                r.failed = f"{type(err).__name__}: {str(err)[:200]}"
            r.clock += time.process_time() - c0
            r.wall += time.perf_counter() - w0
        r.warns += [f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught]
        r.steps += 1
        if isinstance(r.opt, hessfree.HessianFree) and r.opt.last_step is not None:
            r.infos.append(r.opt.last_step)
        if r.clock >= next_eval[r.name] or r.clock >= budget or r.failed:
            next_eval[r.name] = r.clock + eval_every
            r.curve.append((r.clock, r.evaluate()))


def best_at(curve: list[tuple[float, float]], t: float) -> float:
    """The lowest value recorded at or before ``t`` (scipy's curve is per evaluation)."""
    return min(f for s, f in curve if s <= t) if any(s <= t for s, _ in curve) else curve[0][1]


def time_to(curve: list[tuple[float, float]], target: float) -> float:
    for t, f in curve:
        if f <= target:
            return t
    return math.inf


def hf_notes(infos: list[Any]) -> str:
    if not infos:
        return ""
    st = Counter(str(i.status) for i in infos)
    lam = [i.damping for i in infos if math.isfinite(i.damping)]
    rho = [i.rho for i in infos if math.isfinite(i.rho)]
    cg = [i.cg_iters for i in infos]
    reasons = Counter(str(i.cg_reason) for i in infos if i.cg_reason)
    k = max(1, len(lam) // 4)
    path = "→".join(f"{x:.1e}" for x in lam[::k][:4] + lam[-1:])
    return (
        f"{dict(st)}; λ {path}; ρ med {statistics.median(rho) if rho else math.nan:.2f}; "
        f"CG med {statistics.median(cg):.0f} max {max(cg)}; stops {dict(reasons)}"
    )


def race(key: str, seed: int, budget: float, contenders: str = "") -> None:
    prob = PROBLEMS[key](seed)
    if contenders:
        names = contenders.split(",")
    elif key in MINIBATCH:
        names = ["HF", "HF lo", "HF mb", "Adam 1e-3", "Adam 3e-3", "Adam 1e-2", "LBFGS sw"]
    else:
        names = ["HF", "HF lo", "LBFGS", "LBFGS sw", "HF lo[marq]"]
    runs = [make_run(n, prob, seed) for n in names]
    load0 = os.getloadavg()
    interleave(runs, budget, eval_every=budget / 50)
    curves = {r.name: r.curve for r in runs}
    if prob.scipy is not None:
        sc = prob.scipy(budget)
        curves["scipy"] = [(t, min(f for _, f in sc[: i + 1])) for i, (t, _f) in enumerate(sc)]
    load1 = os.getloadavg()
    off = prob.f_star or 0.0
    base = [n for n in curves if not n.startswith("HF")]
    floor = 1e-10 * abs(prob.f_star or 0.0)  # certified values carry 11 digits
    fr = (0.25, 0.5, 1.0)
    best = {f: max(min(best_at(curves[n], f * budget) - off for n in base), floor) for f in fr}
    # target: the best baseline's objective at ½ the budget (or f* within 1e-8 relative)
    ref = min(base, key=lambda n: best_at(curves[n], budget / 2))
    target = best_at(curves[ref], budget / 2)
    if prob.f_star is not None:
        target = max(target, off + 1e-8 * abs(off))
    t_ref = time_to(curves[ref], target)
    print(f"\n#### {key}, seed {seed}, {budget:g} CPU s each: {prob.title}\n")
    print(f"load {load0[0]:.2f} → {load1[0]:.2f}; f* = {prob.f_star}; target {target:.6g} "
          f"(the best baseline `{ref}` at ½ budget, {t_ref:.3g} s)\n")  # fmt: skip
    hdr = "f − f*" if prob.f_star is not None else "loss"
    print(
        f"| run | steps | CPU / wall s | {hdr} at ¼ / ½ / 1 | ratio to best baseline at ¼ / ½ / 1"
        " | t to target / ref's | held-out | HF trace, warnings, errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, curve in curves.items():
        vals = [max(best_at(curve, f * budget) - off, floor) for f in fr]
        ratios = [v / max(best[f], 1e-300) for v, f in zip(vals, fr, strict=True)]
        tt = time_to(curve, target) / t_ref if t_ref > 0 else math.nan
        r = next((r for r in runs if r.name == name), None)
        ho = f"{prob.held_out(r.model):.4g}" if (r and prob.held_out) else ""
        cert = ""
        if r is not None and prob.certified is not None:
            b = r.model.b.detach().double().numpy()
            lre = -np.log10(np.abs(b - prob.certified) / np.abs(prob.certified) + 1e-300)
            cert = "LRE " + "/".join(f"{v:.1f}" for v in lre) + "; "
        notes = ""
        if r is not None:
            notes = "; ".join(x for x in (cert, r.failed, hf_notes(r.infos)) if x)
            if r.warns:
                notes += " WARN: " + " | ".join(sorted(set(r.warns))[:2])
        steps = r.steps if r else len(curve)
        cw = f"{r.clock:.2f} / {r.wall:.2f}" if r else f"{curve[-1][0]:.3f}"
        v3 = " / ".join(f"{v:.3g}" for v in vals)
        q3 = " / ".join(f"{q:.3g}" for q in ratios)
        print(f"| {name} | {steps} | {cw} | {v3} | {q3} | {tt:.3g} | {ho} | {notes} |")


def trace(key: str, seed: int, budget: float, name: str = "HF") -> None:
    prob = PROBLEMS[key](seed)
    r = make_run(name, prob, seed)
    interleave([r], budget, eval_every=budget / 20)
    print(f"\n#### trace {key} `{name}`, seed {seed}\n")
    print("| step | loss | status | λ | ρ | CG iters | CG stop | rate | ‖g‖ |")
    print("|---|---|---|---|---|---|---|---|---|")
    k = max(1, len(r.infos) // 25)
    for i, s in enumerate(r.infos):
        if i % k == 0 or i == len(r.infos) - 1:
            print(
                f"| {i} | {s.loss:.6g} | {s.status} | {s.damping:.2e} | {s.rho:.3f} | "
                f"{s.cg_iters} | {s.cg_reason} | {s.step_rate:.3g} | {s.grad_norm:.2e} |"
            )
    print(f"\n{r.failed} {sorted(set(r.warns))[:3]}")


# ------------------------------------------------------------------------------------------
# misuse
# ------------------------------------------------------------------------------------------
def _misuse_cases(prob: Problem) -> dict[str, Callable[[nn.Module], Any]]:
    """Closure bodies a user might get wrong, each a function of the model."""

    def nan_data(m):
        loss, out = prob.lo_of(m)
        return loss * torch.tensor(float("nan"), dtype=loss.dtype), out

    def no_grad_loss(m):
        with torch.no_grad():
            return prob.loss_of(m)

    return {
        "closure returns per-case losses (reduction='none')": lambda m: prob.lo_of(m)[1] ** 2,
        "(loss, outputs.detach())": lambda m: (prob.lo_of(m)[0], prob.lo_of(m)[1].detach()),
        "(outputs, loss) swapped": lambda m: tuple(reversed(prob.lo_of(m))),
        "loss × NaN (bad data)": nan_data,
        "loss computed under no_grad": no_grad_loss,
        "closure returns None": lambda m: None,
        "closure returns a float": lambda m: prob.loss_of(m).item(),
        "closure returns loss + Inf": lambda m: prob.loss_of(m) + math.inf,
    }


def misuse() -> None:
    print("\n#### misuse: error or warning, parameters bit-identical after\n")
    print("| problem | case | outcome | params unchanged |")
    print("|---|---|---|---|")
    for key in ("misra1a", "mult", "lotka"):
        prob = PROBLEMS[key](0)

        cases = _misuse_cases(prob)
        for case, fn in cases.items():
            m = copy.deepcopy(prob.model)
            before = [p.detach().clone() for p in m.parameters()]
            opt = hessfree.HessianFree(m.parameters())
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    for _ in range(2):
                        opt.step(lambda m=m, fn=fn: fn(m))
                    outcome = f"no error; status {opt.last_step.status}"
                except Exception as err:  # noqa: BLE001
                    outcome = f"{type(err).__name__}: {str(err)[:220]}"
            if caught:
                outcome += " WARN: " + " | ".join(
                    sorted({f"{w.category.__name__}: {str(w.message)[:120]}" for w in caught})
                )
            same = all(torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))
            print(f"| {key} | {case} | {outcome} | {same} |")
        for kw in ({"lr": -1.0}, {"damping": 0.0}, {"cg_max_iter": 0}, {"curvature": "gauss"}):
            try:
                hessfree.HessianFree(copy.deepcopy(prob.model).parameters(), **kw)
                outcome = "accepted"
            except Exception as err:  # noqa: BLE001
                outcome = f"{type(err).__name__}: {str(err)[:160]}"
            print(f"| {key} | HessianFree(params, **{kw}) | {outcome} | — |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="*", default=list(PROBLEMS))
    ap.add_argument("--part", default="race", choices=["race", "trace", "misuse"])
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--name", default="HF")
    ap.add_argument("--contenders", default="", help='e.g. "HF lo,HF lo[eta],LBFGS sw"')
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")  # fmt: skip
    if args.part == "misuse":
        misuse()
        return
    for key in args.problems:
        for seed in map(int, args.seeds.split(",")):
            if args.part == "race":
                race(key, seed, args.budget, args.contenders)
            else:
                trace(key, seed, args.budget, args.name)


if __name__ == "__main__":
    main()
