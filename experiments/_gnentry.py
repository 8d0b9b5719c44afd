"""The local (Newton) phase's entry (#14, topic "gnentry"; follow-up to "gnquad").

Two defects gnquad left: (1) on entering the phase the first plain CG solves (cap 250, tight
:math:`\\eta`) at the tiny :math:`\\lambda` the K-FAC steps left overshoot, and ~15 steps pass
before quadratic convergence shows; (2) a growing gradient batch that has become the whole
data set never enters the phase.

Problems (float64): ``smallres`` and ``interp`` (``_gnquad.py``'s; other starts: the problem's
start plus ``0.1 N(0, 1)`` per weight from generator ``500 + seed``, as gnquad's ``starts``),
``curve`` (gnquad's damped oscillation; other starts: each parameter of the start times
``1 + 0.15 N(0, 1)``), ``osborne`` (Osborne's 11-parameter sum of exponentials, the MINPACK-2
test problem, data generated from its known solution plus noise), ``digits`` (the scorecard's
full-batch digits MLP, float32 cross-entropy; other starts: torch's default init redrawn),
``sine`` (a 1-10-1 tanh MLP fitted to sin(3x) plus 1e-3 noise on 200 points; starts: torch's
default init from seed 40 + start).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_gnentry.py trace PROBLEM \\
        [--seed S] [--steps N] [--variant NAME]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_gnentry.py tail PROBLEM \\
        [--seeds 0,1,2] [--steps N] [--variants a,b]
    git archive main hessfree | tar -x -C /tmp/gnentry-main
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_gnentry.py growing [--steps N] \\
        [--other /tmp/gnentry-main]

``trace``: per step of one variant, f - f*, ρ, rate, λ, λ's share, CG iterations and stop,
η, ‖x‖ (CG's final iterate), ‖g‖/‖g₁‖, whether the phase is on. ``tail``: the variants
interleaved (one step each in turn, 1 thread), per start: the step at which the phase began,
steps and CPU seconds (``time.process_time`` of the variant's own steps) until f - f* ≤
``1e-8 f*`` (or ``1e-12 (f0 - f*)`` where f* = 0), f - f* at the end. ``growing``: a linear
least-squares fit (f* closed form) and the small-residual MLP (f* by scipy's LM) on a gradient
batch that grows by 1.3x a step to the whole set; f - f* per step, main's rule against this
branch.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gnquad as Q  # noqa: E402

import hessfree  # noqa: E402
import hessfree._damping_control
from hessfree import HessianFree  # noqa: E402
from hessfree.cg import relative_forcing_term  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


# ------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------
class Osborne(nn.Module):
    """Osborne 2 (MINPACK-2): b1 e^{-b5 t} + b2 e^{-b6 (t-b9)^2} + b3 e^{-b7 (t-b10)^2}
    + b4 e^{-b8 (t-b11)^2}."""

    def __init__(self, theta: list[float]) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b = self.theta
        out = b[0] * torch.exp(-b[4] * t)
        for j in range(3):
            out = out + b[1 + j] * torch.exp(-b[5 + j] * (t - b[8 + j]) ** 2)
        return out.unsqueeze(-1)


OSBORNE_SOLUTION = [1.31, 0.4315, 0.6336, 0.5994, 0.7541, 0.9043, 1.3658, 4.8237, 2.3987, 4.5689,
                    5.6753]  # fmt: skip
OSBORNE_START = [1.3, 0.65, 0.65, 0.7, 0.6, 3.0, 5.0, 7.0, 2.0, 4.5, 5.5]  # MINPACK's x0


def _fstar(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """min mean((model(x) - y)^2) near the model's weights: scipy's Levenberg-Marquardt with
    the residuals' exact float64 Jacobian (as tests/test_local_phase.py)."""
    from scipy.optimize import least_squares

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def residuals(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return (torch.func.functional_call(model, params, (x,)) - y).flatten()

    jac = torch.func.jacfwd(residuals)
    sol = least_squares(
        lambda th: residuals(torch.from_numpy(th)).detach().numpy(),
        theta0.numpy(),
        jac=lambda th: jac(torch.from_numpy(th)).detach().numpy(),
        method="lm",
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
    )
    return float(np.mean(sol.fun**2))


def problem(key: str, seed: int) -> Q.Problem:
    """``key`` from start ``seed`` (0: the problem's own start)."""
    if key == "osborne":
        gen = torch.Generator().manual_seed(7)
        t = torch.linspace(0, 6.4, 65, dtype=torch.float64)
        with torch.no_grad():
            y = Osborne(OSBORNE_SOLUTION)(t)
            y = y + 0.01 * torch.randn(y.shape, generator=gen, dtype=torch.float64)
        start = torch.tensor(OSBORNE_START, dtype=torch.float64)
        if seed:
            g = torch.Generator().manual_seed(500 + seed)
            start = start * (1 + 0.05 * torch.randn(start.shape, generator=g, dtype=start.dtype))
        prob = Q.Problem("osborne", Osborne(start.tolist()), t, y, F.mse_loss, 0.0)
    elif key == "sine":
        gen = torch.Generator().manual_seed(4)
        x = torch.linspace(-2, 2, 200, dtype=torch.float64).unsqueeze(-1)
        y = torch.sin(3 * x) + 1e-3 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        torch.manual_seed(40 + seed)
        model = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1)).double()
        prob = Q.Problem("sine", model, x, y, F.mse_loss, 0.0)
        prob.fstar = _fstar(copy.deepcopy(model), x, y)
    elif key == "digits":
        prob = Q.p_digits()
    else:
        prob = Q.PROBLEMS[key]()
    if seed and key in ("smallres", "interp"):
        with torch.no_grad():
            gen = torch.Generator().manual_seed(500 + seed)
            for p in prob.model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    elif seed and key == "curve":
        with torch.no_grad():
            gen = torch.Generator().manual_seed(500 + seed)
            th = prob.model.theta
            th.mul_(1 + 0.15 * torch.randn(th.shape, generator=gen, dtype=th.dtype))
    elif seed and key == "digits":
        gen = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for mod in prob.model.modules():
                if isinstance(mod, nn.Linear):
                    bound = 1.0 / math.sqrt(mod.in_features)
                    mod.weight.uniform_(-bound, bound, generator=gen)
                    mod.bias.uniform_(-bound, bound, generator=gen)
    if key not in ("digits", "interp", "sine") and (seed or key == "osborne"):  # interp: f* = 0
        prob.fstar = _fstar(copy.deepcopy(prob.model), prob.x, prob.y)
    return prob


# ------------------------------------------------------------------------------------------
# variants: the library's rule, and candidate entries as subclasses (not in the library)
# ------------------------------------------------------------------------------------------
class _Entry(HessianFree):
    """Hooks for the candidate entries; with no flag set, the library's rule."""

    #: λ at entry raised to the share bound: λ ← λ · _NEWTON_SHARE / share
    lam_share = False
    #: the phase's relative forcing term from ‖g‖ at entry, not ‖g₁‖
    g_entry = False
    #: cold start (no warm start) on the phase's first step
    cold = False
    #: enter only where the K-FAC steps of the streak ended by CG's residual test
    kfac_converged = False
    #: in the phase, a step the line search cut to rate t < 1 raises λ to λ / t (at least the
    #: rule's ×2): the step was 1/t times too long, as extrapolation's λ / rate for t > 1
    rate_lam = False

    def _track_newton(self, state, run, rho, rate, share):  # noqa: ANN001, ANN202
        was = state.get("newton")
        if self.kfac_converged and not was and run.report.get("cg_reason") != "converged":
            state["newton_share"] = share
            state.pop("newton_streak", None)
            return
        super()._track_newton(state, run, rho, rate, share)
        if state.get("newton") and not was:
            state["entry_step"] = state["step"]
            state["entry_grad"] = run.report["grad_norm"]
            state["entry_fresh"] = True
            if self.lam_share and share > 0:
                state["damping"] = max(
                    state["damping"],
                    state["damping"] * hessfree._damping_control._NEWTON_SHARE / share,
                )

    def _finish(self, run, status, *, accepted=False, loss_after=None):  # noqa: ANN001, ANN202
        st = run.state
        rate = run.report.get("step_rate", 0.0)
        if self.rate_lam and accepted and st.get("newton") and 0.0 < rate < 1.0:
            st["damping"] = max(st["damping"], run.damping / rate)
        return super()._finish(run, status, accepted=accepted, loss_after=loss_after)

    def _warm_start(self, product, g, state):  # noqa: ANN001, ANN202
        if self.cold and state.pop("entry_fresh", False):
            state.pop("warm_start", None)
            return None
        return super()._warm_start(product, g, state)

    def _cg_rtol(self, run):  # noqa: ANN001, ANN202
        rtol = super()._cg_rtol(run)
        st = run.state
        if self.g_entry and st.get("newton") and "entry_grad" in st and run.structural_damping == 0:
            g = run.report["grad_norm"]
            rel = relative_forcing_term(g, st["entry_grad"])
            rtol = min(rel, g / st["entry_grad"])
            run.report["cg_rtol"] = rtol
        return rtol


VARIANTS: dict[str, dict] = {
    "rule": {},  # the library's (main's) rule
    "lam-share": {"lam_share": True},
    "g-entry": {"g_entry": True},
    "cold": {"cold": True},
    "kfac-conv": {"kfac_converged": True},
    "rate-lam": {"rate_lam": True},
    "lam-share+g-entry": {"lam_share": True, "g_entry": True},
    "lam-share+cold": {"lam_share": True, "cold": True},
    "no phase": {},
}


def make_opt(model: nn.Module, variant: str):  # noqa: ANN201
    cls = type(f"_V_{variant}", (_Entry,), dict(VARIANTS[variant]))
    if variant == "no phase":
        cls._newton_phase = False
    return cls(model.parameters())


@dataclass
class Run:
    name: str
    model: nn.Module
    opt: HessianFree
    closure: Callable
    cpu: float = 0.0
    gaps: list = field(default_factory=list)
    cpus: list = field(default_factory=list)
    entry: int = -1

    def step(self) -> None:
        c0 = time.process_time()
        self.opt.step(self.closure)
        self.cpu += time.process_time() - c0
        if self.entry < 0 and self.opt._global_state().get("newton"):
            self.entry = len(self.gaps)


def make_run(prob: Q.Problem, variant: str) -> Run:
    m = copy.deepcopy(prob.model)
    opt = make_opt(m, variant)

    def closure():
        out = m(prob.x)
        return prob.loss(out, prob.y), out

    return Run(variant, m, opt, closure)


# ------------------------------------------------------------------------------------------
# trace, tail
# ------------------------------------------------------------------------------------------
def trace(key: str, seed: int, steps: int, variant: str) -> None:
    prob = problem(key, seed)
    r = make_run(prob, variant)
    print(f"## trace {key} start {seed}, {variant}: f* = {prob.fstar:.10g}; load {load()}\n")
    print("| k | f − f* | ρ | rate | λ | λ share | CG | stop | η | ‖x‖ | ‖g‖/‖g1‖ | phase |")
    print("|---" * 12 + "|")
    g1 = None
    for k in range(steps):
        r.step()
        i, st = r.opt.last_step, r.opt._global_state()
        g1 = g1 or i.grad_norm
        ws = st.get("warm_start")
        xn = float(ws.norm()) if ws is not None else math.nan
        print(
            f"| {k} | {Q.gap(prob, r.model):.2e} | {i.rho:.3f} | {i.step_rate:.3g} "
            f"| {i.damping:.1e} | {st.get('newton_share', math.nan):.1e} | {i.cg_iters} "
            f"| {i.cg_reason} | {i.cg_rtol:.1e} | {xn:.2e} | {i.grad_norm / g1:.1e} "
            f"| {'on' if st.get('newton') else ''} |"
        )
    print(f"\nload after {load()}; CPU {r.cpu:.2f} s\n")


def _level(prob: Q.Problem, f0: float) -> float:
    return 1e-8 * prob.fstar if prob.fstar > 0 else 1e-12 * f0


def tail(key: str, seeds: list[int], steps: int, variants: list[str]) -> dict:
    print(f"## tail {key}: {steps} steps, variants interleaved; load {load()}\n")
    print(
        "f* per start by scipy's LM from the start (exact Jacobian), or the lowest any variant "
        "reached if lower; levels L1, L2 = 1e-4 f*, 1e-7 f* (f* = 0: 1e-6 f0, 1e-8 f0); "
        "'-': not reached; entry: the step the phase began (-1: never); end: f - f* after "
        "the last step.\n"
    )
    head = " | ".join(f"{v}: entry / steps to L1 / L2 / CPU s to L1 / L2 / end" for v in variants)
    print(f"| start | f* | {head} |")
    print("|---" * (2 + len(variants)) + "|")
    out: dict = {}
    for seed in seeds:
        prob = problem(key, seed)
        with torch.no_grad():
            f0 = float(prob.loss(prob.model(prob.x), prob.y))
        runs = [make_run(prob, v) for v in variants]
        for _ in range(steps):
            for r in runs:
                r.step()
                with torch.no_grad():
                    r.gaps.append(float(prob.loss(r.model(prob.x), prob.y)))
                r.cpus.append(r.cpu)
        fstar = min([prob.fstar] + [min(r.gaps) for r in runs]) if key != "digits" else 0.0
        if key == "interp":
            fstar = 0.0
        levels = [1e-4 * fstar, 1e-7 * fstar] if fstar > 0 else [1e-6 * f0, 1e-8 * f0]
        cells = []
        for r in runs:
            ks = [next((j for j, f in enumerate(r.gaps) if f - fstar <= lv), None) for lv in levels]
            cpus = [r.cpus[k] if k is not None else math.inf for k in ks]
            steps_ = " / ".join("-" if k is None else str(k + 1) for k in ks)
            cpus_ = " / ".join(f"{c:.3f}" for c in cpus)
            cells.append(f"{r.entry} / {steps_} / {cpus_} / {r.gaps[-1] - fstar:.1e}")
            out.setdefault(r.name, []).append((ks, cpus, r.gaps[-1] - fstar, r.entry))
        print(f"| {seed} | {fstar:.6g} | " + " | ".join(cells) + " |")
        sys.stdout.flush()
    print(f"\nload after {load()}\n")
    return out


# ------------------------------------------------------------------------------------------
# growing batch
# ------------------------------------------------------------------------------------------
def _linear(deep: bool = False) -> tuple:
    """Linear least squares, 400 cases, 8 inputs, 2 outputs: an nn.Linear, or (``deep``) two
    stacked, 8-4-2, nonlinear in the parameters but with the same f* (closed form)."""
    gen = torch.Generator().manual_seed(3)
    n = 400
    x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(8, 2, generator=gen, dtype=torch.float64)
    y = y + 0.1 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    model = (nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)) if deep else nn.Linear(8, 2)).double()
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(xa, y).solution
    return model, x, y, float(F.mse_loss(xa @ sol, y))


def growing(steps: int, other: str) -> None:
    """A gradient batch of ``16 · 1.3^k`` cases (the first ones), up to the whole set, main's
    package (``other``) against this branch, ``HessianFree(params)`` with no arguments."""
    packs = {"main": Q._package(other), "branch": Q._package(None)}
    print(f"## growing: batch 16 · 1.3^k up to the set; load {load()}\n")
    for key in ("linear", "deeplinear", "smallres"):
        if key in ("linear", "deeplinear"):
            model0, x, y, fstar = _linear(key == "deeplinear")
        else:
            prob = Q.p_smallres()
            x, y, model0, fstar = prob.x, prob.y, prob.model, prob.fstar
        n = len(x)
        for name, mods in packs.items():
            Q._use(mods)
            m = copy.deepcopy(model0)
            opt = mods["hessfree"].HessianFree(m.parameters())
            gaps, sizes, phase, cpu = [], [], [], 0.0
            for k in range(steps):
                b = min(n, int(16 * 1.3**k))
                xb, yb = x[:b], y[:b]

                def closure(xb=xb, yb=yb, m=m):  # noqa: ANN001, ANN202
                    out = m(xb)
                    return F.mse_loss(out, yb), out

                c0 = time.process_time()
                opt.step(closure)
                cpu += time.process_time() - c0
                with torch.no_grad():
                    gaps.append(float(F.mse_loss(m(x), y)) - fstar)
                sizes.append(b)
                phase.append(bool(opt._global_state().get("newton")))
            first_full = sizes.index(n) if n in sizes else -1
            entry = phase.index(True) if any(phase) else -1
            early = any(p and s < n for p, s in zip(phase, sizes, strict=True))
            print(
                f"- {key}, {name}: f* = {fstar:.10g}; whole set from step {first_full}, phase "
                f"from step {entry} (on a partial batch: {early}); CPU {cpu:.2f} s; f - f* per "
                "step: " + " ".join(f"{g:.1e}" for g in gaps)
            )
    print(f"\nload after {load()}\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["trace", "tail", "growing"])
    ap.add_argument("what", nargs="?", default="smallres")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--variant", default="rule")
    ap.add_argument("--variants", default="rule,lam-share,g-entry,cold")
    ap.add_argument("--other", default="/tmp/gnentry-main", help="growing: main's package")
    args = ap.parse_args()
    if args.mode == "trace":
        trace(args.what, args.seed, args.steps, args.variant)
    elif args.mode == "tail":
        seeds = [int(s) for s in args.seeds.split(",")]
        tail(args.what, seeds, args.steps, args.variants.split(","))
    else:
        growing(args.steps, args.other)


if __name__ == "__main__":
    main()
