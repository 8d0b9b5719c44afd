"""Marquardt's scale-invariant damping (``damping_metric='marquardt'``) against λI (topic
"jacscale"; ``experiments/README.md``).

Problems (full batch, fixed seeds):

- ``exps``: the badly scaled curve fit of "unseen3" (``_unseen3.p_exps``: a₁e^(−k₁t) +
  a₂e^(−k₂t) + c, a ~ 10³, k ~ 10⁻²-1, 200 points, float64);
- ``scaled``: a float64 tanh MLP 4-16-2 fitted to a teacher, its first input feature in
  units 1000× too small (the model sees x₀·10³), 300 points: badly scaled through the data;
- ``smallres``: the same teacher fit with every feature as is (``_unseen3.p_smallres``'s
  data, width 16): a well-scaled control;
- ``digits``: a tanh MLP 64-32-10 on sklearn's digits, cross-entropy, float32, all 1,797
  images in every step: a well-scaled control whose outputs (17,970 entries) get the
  diagonal from 8 probes.

Contenders, interleaved in one process at equal CPU time (``time.process_time`` of each
step; the one with the least time so far steps next; evaluation off the clock), from the
same initial weights: ``HessianFree`` defaults (λI), ``damping_metric='marquardt'``, each
also with ``precond=None`` where that differs, and ``torch.optim.LBFGS`` (strong Wolfe; a
step is one call: up to 20 iterations, as "unseen3" ran it). scipy's ``least_squares``
(``x_scale='jac'`` and the default ``x_scale=1``, method 'lm', Jacobian from torch) runs to its
own convergence off the interleaving (median CPU of 3 calls).

Since bb1511d ``precond='auto'`` under Marquardt is no preconditioner, so the "HF marquardt"
and "HF marquardt precond=None" rows run the same code; the recorded tables
(``results/2026-12-03-jacscale.md``) are from before, when "HF marquardt" was Jacobi's.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_jacscale.py \
        [exps scaled smallres digits] [--budget-scale 1.0]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _unseen3 as U  # noqa: E402

import hessfree  # noqa: E402
import hessfree._damping_control as damping_control  # noqa: E402

torch.set_num_threads(1)


@dataclass
class Problem:
    model: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    loss: Callable
    budget: float  # CPU seconds per contender
    residual: bool = True  # an MSE fit: scipy's least_squares applies


def _teacher_data(factor: float):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(300, 4, generator=gen, dtype=torch.float64)
    torch.manual_seed(123)
    teacher = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    with torch.no_grad():
        y = teacher(x) + 1e-3 * torch.randn(300, 2, generator=gen, dtype=torch.float64)
    seen = x.clone()
    seen[:, 0] *= factor  # what the student sees: feature 0 in units `factor` times smaller
    return seen, y


def _student():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def problems(budget_scale: float) -> dict[str, Callable[[], Problem]]:
    def exps():
        t, y = U.p_exps().full
        return Problem(U.Exps, t, y, F.mse_loss, 3.0 * budget_scale)

    def scaled():
        x, y = _teacher_data(1e3)
        return Problem(_student, x, y, F.mse_loss, 8.0 * budget_scale)

    def smallres():
        x, y = _teacher_data(1.0)
        return Problem(_student, x, y, F.mse_loss, 8.0 * budget_scale)

    def digits():
        x, lab = U.digits()

        def model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

        return Problem(model, x, lab, F.cross_entropy, 15.0 * budget_scale, residual=False)

    return {"exps": exps, "scaled": scaled, "smallres": smallres, "digits": digits}


@dataclass
class Run:
    name: str
    model: nn.Module
    step: Callable[[], None]
    opt: object
    cpu: float = 0.0
    wall: float = 0.0
    steps: int = 0
    failed: str = ""
    curve: list = field(default_factory=list)  # (cpu, loss, steps)
    infos: list = field(default_factory=list)


def make_runs(prob: Problem, init: dict, variants: dict[str, dict]) -> list[Run]:
    runs = []
    for name, kw in variants.items():
        m = prob.model()
        m.load_state_dict(init)
        if name.startswith("LBFGS"):
            opt = torch.optim.LBFGS(m.parameters(), line_search_fn="strong_wolfe")

            def step(m=m, opt=opt):
                def closure():
                    opt.zero_grad()
                    f = prob.loss(m(prob.x), prob.y)
                    f.backward()
                    return f

                opt.step(closure)
        else:
            kw = dict(kw)
            exact = kw.pop("_exact_outputs", None)  # the optimizer's cut-over, for a variant
            opt = hessfree.HessianFree(m.parameters(), **kw)

            def step(m=m, opt=opt, exact=exact):
                def closure():
                    out = m(prob.x)
                    return prob.loss(out, prob.y), out

                saved = damping_control._MARQUARDT_EXACT_OUTPUTS
                if exact is not None:
                    damping_control._MARQUARDT_EXACT_OUTPUTS = exact
                try:
                    opt.step(closure)
                finally:
                    damping_control._MARQUARDT_EXACT_OUTPUTS = saved

        runs.append(Run(name, m, step, opt))
    return runs


def evaluate(prob: Problem, m: nn.Module) -> float:
    with torch.no_grad():
        return float(prob.loss(m(prob.x), prob.y))


def interleave(prob: Problem, runs: list[Run]) -> None:
    for r in runs:
        r.curve.append((0.0, evaluate(prob, r.model), 0))
    while True:
        live = [r for r in runs if not r.failed and r.cpu < prob.budget]
        if not live:
            return
        r = min(live, key=lambda r: r.cpu)
        t0, c0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                r.step()
            except Exception as err:  # noqa: BLE001 - a failing optimizer is a result
                r.failed = f"{type(err).__name__}: {str(err)[:160]}"
        r.cpu += time.process_time() - c0
        r.wall += time.perf_counter() - t0
        r.steps += 1
        if isinstance(r.opt, hessfree.HessianFree):
            r.infos.append(r.opt.last_step)
        r.curve.append((r.cpu, evaluate(prob, r.model), r.steps))


def at(curve, t):
    best = curve[0][1]
    for s, f, _ in curve:
        if s <= t + 1e-12:
            best = f
    return best


def first_below(curve, target, what: int = 0):
    """CPU seconds (``what=0``) or steps (2) until the loss is at most ``target``."""
    for point in curve:
        if point[1] <= target:
            return point[what]
    return math.inf


def scipy_fits(prob: Problem, init: dict) -> dict[str, tuple[float, float, int]]:
    """least_squares on the residuals (Jacobian from torch): name -> (loss, median CPU, nfev)."""
    from scipy.optimize import least_squares

    m = prob.model()
    m.load_state_dict(init)
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in m.parameters()]).numpy()
    sizes = [int(np.prod(s)) for s in shapes]

    def unflat(v):
        parts = torch.split(torch.as_tensor(v, dtype=torch.float64), sizes)
        return {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}

    def residual_t(v):
        out = torch.func.functional_call(m, unflat(v), (prob.x,))
        return (out - prob.y).reshape(-1)

    def fun(v):
        with torch.no_grad():
            return residual_t(v).numpy()

    def jac(v):
        vt = torch.as_tensor(v, dtype=torch.float64)
        return torch.autograd.functional.jacobian(residual_t, vt, vectorize=True).numpy()

    out = {}
    for name, kw in (("scipy lm x_scale='jac'", {"x_scale": "jac"}), ("scipy lm x_scale=1", {})):
        cpus, res = [], None
        for _ in range(3):
            c0 = time.process_time()
            res = least_squares(fun, x0, jac=jac, method="lm", **kw)
            cpus.append(time.process_time() - c0)
        out[name] = (float(np.mean(res.fun**2)), statistics.median(cpus), int(res.nfev))
    return out


def hf_summary(r: Run) -> str:
    if not r.infos:
        return ""
    lam = [i.damping for i in r.infos if math.isfinite(i.damping)]
    cg = [i.cg_iters for i in r.infos]
    acc = sum(i.accepted for i in r.infos)
    return (
        f"λ first/median/last {lam[0]:.3g}/{statistics.median(lam):.3g}/{lam[-1]:.3g}; "
        f"CG median {statistics.median(cg)}; accepted {acc}/{len(r.infos)}"
    )


VARIANTS: dict[str, dict] = {
    "HF defaults (λI)": {},
    "HF marquardt": {"damping_metric": "marquardt"},
    "HF precond=None (λI)": {"precond": None},
    "HF marquardt precond=None": {"damping_metric": "marquardt", "precond": None},
    "LBFGS-sw": {},
}


#: ``--diagonal``: Marquardt's diag(G) exact in every step, or from 8 output probes
DIAGONAL: dict[str, dict] = {
    "HF defaults (λI)": {},
    "HF marquardt, exact diag": {"damping_metric": "marquardt", "_exact_outputs": 10**9},
    "HF marquardt, 8 probes": {"damping_metric": "marquardt", "_exact_outputs": 0},
    "HF marquardt precond=None, exact": {
        "damping_metric": "marquardt",
        "precond": None,
        "_exact_outputs": 10**9,
    },
    "HF marquardt precond=None, 8 probes": {
        "damping_metric": "marquardt",
        "precond": None,
        "_exact_outputs": 0,
    },
}


def run_problem(key: str, prob: Problem, extra: dict[str, dict] | None = None) -> str:
    load0 = os.getloadavg()
    init_model = prob.model()
    init = {k: v.clone() for k, v in init_model.state_dict().items()}
    variants = dict(VARIANTS) if extra is None else extra
    if (
        key == "exps" and extra is None
    ):  # no nn.Linear: 'auto' is already no preconditioner under λI
        variants.pop("HF precond=None (λI)")
        variants["HF marquardt cg_rtol=0"] = {"damping_metric": "marquardt", "cg_rtol": 0.0}
        variants["HF cg_rtol=0 (λI)"] = {"cg_rtol": 0.0}
    # warm-up: two steps of each contender, thrown away
    warm = make_runs(prob, init, variants)
    for r in warm:
        for _ in range(2):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    r.step()
                except Exception:  # noqa: BLE001
                    break
    runs = make_runs(prob, init, variants)
    interleave(prob, runs)
    fits = scipy_fits(prob, init) if prob.residual else {}
    load1 = os.getloadavg()
    best = min([min(p[1] for p in r.curve) for r in runs] + [f for f, _, _ in fits.values()])
    f0 = runs[0].curve[0][1]
    target = best + 0.01 * (f0 - best)
    tight = best * 1.01 if prob.residual else best + 1e-3 * (f0 - best)
    B = prob.budget
    lines = [
        f"### {key} (budget {B:g} CPU s per contender; load {load0[0]:.2f} -> {load1[0]:.2f})",
        "",
        f"f0 = {f0:.6g}; best seen f* = {best:.6g}; target T1 = f* + 1 % of (f0 − f*) = "
        f"{target:.6g}; T2 = {tight:.6g} ("
        + ("1.01 f*)" if prob.residual else "f* + 0.1 % of (f0 − f*))"),
        "",
        "| contender | steps | loss at B/4 | B/2 | B | CPU s to T1 | steps to T1 | CPU s to T2 "
        "| steps to T2 | wall s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        q = [at(r.curve, B * f) for f in (0.25, 0.5, 1.0)]
        note = r.failed or hf_summary(r)
        lines.append(
            f"| {r.name} | {r.steps} | {q[0]:.4g} | {q[1]:.4g} | {q[2]:.4g} | "
            f"{first_below(r.curve, target):.3g} | {first_below(r.curve, target, 2)} | "
            f"{first_below(r.curve, tight):.3g} | {first_below(r.curve, tight, 2)} | "
            f"{r.wall:.3g} | {note} |"
        )
    for name, (f, cpu, nfev) in fits.items():
        lines.append(f"| {name} | nfev {nfev} | | | {f:.4g} | | | {cpu:.3g} (to its end) | | | |")
    base = next(r for r in runs if r.name == "HF defaults (λI)")
    marq = next(r for r in runs if r.name.startswith("HF marquardt"))
    ratios = [at(marq.curve, B * f) / at(base.curve, B * f) for f in (0.25, 0.5, 1.0)]
    lines += [
        "",
        "marquardt / defaults loss at B/4, B/2, B: " + ", ".join(f"{x:.3g}" for x in ratios),
        "marquardt / defaults CPU to T1, T2: "
        + ", ".join(
            f"{first_below(marq.curve, t) / first_below(base.curve, t):.3g}"
            for t in (target, tight)
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="*", default=["exps", "scaled", "smallres", "digits"])
    ap.add_argument("--budget-scale", type=float, default=1.0)
    ap.add_argument(
        "--diagonal", action="store_true", help="exact diag(G) against 8 probes (the cut-over)"
    )
    args = ap.parse_args()
    table = problems(args.budget_scale)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for key in args.problems:
        print(run_problem(key, table[key](), DIAGONAL if args.diagonal else None), flush=True)


if __name__ == "__main__":
    main()
