"""Gauss-Newton on large-residual full-batch fits: when the model fails, the exact Hessian?
(topic "gnfall"; follow-up to "unseen7", "negcurv", "negdelta").

Problems (full batch, ``(loss, outputs)`` closure). Large residual: ``scaled32`` /
``scaled64`` (``_unseen7.py``'s 3-output regression, target scales 1 / 30 / 1000, tanh MLP),
``noisy`` (a 2-16-1 tanh MLP on 300 points, target sin(2 x1) + x2² plus N(0, 1) noise, float64),
``misfit`` (a misspecified curve: a e^{-b t} + c fitted to 5 sin(2t) + t on 80 points, float64;
its f* by ``scipy.optimize.least_squares``). Small-residual controls: ``_gnentry.py``'s
``smallres``, ``interp``, ``sine``, ``osborne`` and the scorecard's full-batch ``digits``.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_gnfall.py trace PROBLEM \\
        [--seed S] [--steps N] [--variant main|rule]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_gnfall.py signal [--steps N]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_gnfall.py race PROBLEMS \\
        [--seeds 0,1] [--seconds 4]

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_gnfall.py failures [--steps N]

Variants (``--variant``, ``--extra``): ``main``; ``rule`` (``_gn_fallback``: switch to the
exact Hessian after 4 failing steps of 6); ``first`` (``_gn_first_test``: switch from step 1
when xᵀHx ≤ 0 < xᵀGx along step 0's CG solution x); ``firstkeep`` / ``norestart`` (the same
without recalibrating λ at the switch); ``hess`` (``curvature='hessian'`` from the start);
``lbfgs`` (strong-Wolfe L-BFGS, LBFGS-style closure).

``trace``: per step loss, ρ, λ before and after, rate, CG iterations and stop, the curvature
kind in use and, at the step's start, pᵀHp / pᵀGp along the step it took (one extra Hessian
and one Gauss-Newton product, outside the optimizer). ``signal``: per problem (seed 0, main's
code) how often the failure signal (ρ < 0 with λ rising) fires, the first step where it fired
4 times in 6, and the median pᵀHp/pᵀGp. ``race``: ``main``, ``rule`` (the fallback switched on)
and strong-Wolfe L-BFGS (LBFGS-style closure) from the same weights, interleaved by each
contender's own CPU time (``time.process_time``), 1 thread; loss at the end over the best of the
three, and the load average at start and end. ``failures``: on main's failing steps, the
actual change of the full step over the Gauss-Newton and the exact-Hessian models' predictions.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gnentry as E  # noqa: E402
import _unseen7 as U7  # noqa: E402

from hessfree import HessianFree, StepStatus  # noqa: E402
from hessfree.curvature import GGNProduct, HessianProduct  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")
LARGE = ("scaled32", "scaled64", "noisy", "misfit")
CONTROLS = ("smallres", "interp", "sine", "osborne", "digits")


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


class Misfit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a, b, c = self.theta
        return a * torch.exp(-b * t) + c


def problem(key: str, seed: int):
    """(model, x, y, loss_fn) for ``key`` from start ``seed``."""
    if key in ("scaled32", "scaled64"):
        p = U7.PROBLEMS[key](seed)
        return p.model, p.data[0], p.data[1], p.loss_fn
    if key == "noisy":
        g = torch.Generator().manual_seed(11)
        x = torch.randn(300, 2, generator=g, dtype=torch.float64)
        y = torch.sin(2 * x[:, :1]) + x[:, 1:] ** 2
        y = y + torch.randn(y.shape, generator=g, dtype=torch.float64)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        return model, x, y, F.mse_loss
    if key == "misfit":
        t = torch.linspace(0, 4, 80, dtype=torch.float64)
        y = 5 * torch.sin(2 * t) + t
        model = Misfit()
        if seed:
            g = torch.Generator().manual_seed(500 + seed)
            with torch.no_grad():
                model.theta.add_(0.3 * torch.randn(3, generator=g, dtype=torch.float64))
        return model, t, y, F.mse_loss
    p = E.problem(key, seed)
    return p.model, p.x, p.y, p.loss


class Rule(HessianFree):
    _gn_fallback = True


class FirstNoStep(HessianFree):
    """``first``, but step 0 does not take the Gauss-Newton step the test condemned: the
    parameters stay, and the Hessian starts from θ0 at step 1 (as ``hess``, one solve later)."""

    _gn_first_test = True

    def _backtrack_and_search(self, closure, solution, run) -> None:
        state = run.state
        if state["step"] == 0 and state.get("gn_failed") == "first_step":
            return self._finish(run, StepStatus.LINE_SEARCH_FAILED)
        return super()._backtrack_and_search(closure, solution, run)


def make_opt(model: nn.Module, variant: str) -> torch.optim.Optimizer:
    if variant == "lbfgs":
        return torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe")
    if variant == "hess":  # the exact Hessian from the start (unseen7's 0.18x)
        return HessianFree(model.parameters(), curvature="hessian")
    if variant == "first":  # the first-step test: x'Hx <= 0 < x'Gx along step 0's solution
        return type("First", (HessianFree,), {"_gn_first_test": True})(model.parameters())
    if variant == "first0":
        return FirstNoStep(model.parameters())
    if variant == "firstkeep":  # the same, λ kept at the switch (no recalibration)
        attrs = {"_gn_first_test": True, "_gn_restart": False}
        return type("FirstKeep", (HessianFree,), attrs)(model.parameters())
    if variant == "norestart":
        return type("NoRestart", (Rule,), {"_gn_restart": False})(model.parameters())
    return (Rule if variant == "rule" else HessianFree)(model.parameters())


def step_of(opt, model, x, y, loss_fn):
    if isinstance(opt, HessianFree):

        def lo():
            out = model(x)
            return loss_fn(out, y), out

        return lambda: opt.step(lo)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return lambda: opt.step(closure)


def curvatures_along(model, x, y, loss_fn, p: torch.Tensor) -> tuple[float, float]:
    """pᵀHp and pᵀGp at the model's current parameters (float64 where the model is)."""
    params = list(model.parameters())
    out = model(x)
    loss = loss_fn(out, y)
    H = HessianProduct(loss, params)
    G = GGNProduct(loss, out, params)
    return float(p @ H.matvec(p)), float(p @ G.matvec(p))


def trace(key: str, seed: int, steps: int, variant: str, quiet: bool = False) -> list[dict]:
    model, x, y, loss_fn = problem(key, seed)
    opt = make_opt(model, variant)
    step = step_of(opt, model, x, y, loss_fn)
    rows, sizes = [], [q.numel() for q in model.parameters()]
    if not quiet:
        print(f"## trace {key} seed {seed} {variant}; load {load()}\n")
        print("| k | loss | ρ | λ | λ next | rate | CG | stop | kind | pᵀHp/pᵀGp |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for k in range(steps):
        before = torch.cat([q.detach().reshape(-1).clone() for q in model.parameters()])
        step()
        info = opt.last_step
        after = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
        d = after - before
        ratio = math.nan
        if float(d.norm()) > 0:
            with torch.no_grad():
                for q, v in zip(model.parameters(), torch.split(before, sizes), strict=True):
                    q.copy_(v.view_as(q))
            pHp, pGp = curvatures_along(model, x, y, loss_fn, d)
            ratio = pHp / pGp if pGp else math.nan
            with torch.no_grad():
                for q, v in zip(model.parameters(), torch.split(after, sizes), strict=True):
                    q.copy_(v.view_as(q))
        kind = "H" if opt._global_state().get("gn_failed") is True else "G"
        row = dict(k=k, loss=info.loss, rho=info.rho, lam=info.damping, lam_next=info.next_damping,
                   rate=info.step_rate, cg=info.cg_iters, stop=info.cg_reason, kind=kind,
                   ratio=ratio)  # fmt: skip
        rows.append(row)
        if not quiet:
            print(f"| {k} | {info.loss:.6g} | {info.rho:.3g} | {info.damping:.3g} | "
                  f"{info.next_damping:.3g} | {info.step_rate:.3g} | {info.cg_iters} | "
                  f"{info.cg_reason} | {kind} | {ratio:.3g} |")  # fmt: skip
    return rows


def models_on_failures(key: str, seed: int, steps: int) -> dict:
    """On each failing step of main's run (ρ < 0, λ up), the full step p = d / rate from θ0:
    the actual change f(θ0 + p) − f(θ0) over the undamped Gauss-Newton and exact-Hessian models'
    predictions (ρ_G, ρ_H), float64 products."""
    model, x, y, loss_fn = problem(key, seed)
    opt = make_opt(model, "main")
    step = step_of(opt, model, x, y, loss_fn)
    params = list(model.parameters())
    sizes = [q.numel() for q in params]

    def put(v):
        with torch.no_grad():
            for q, u in zip(params, torch.split(v, sizes), strict=True):
                q.copy_(u.view_as(q))

    def f_at(v):
        put(v)
        with torch.no_grad():
            return float(loss_fn(model(x), y))

    out = dict(fails=0, h_explains=0, rho_g=[], rho_h=[])
    for _ in range(steps):
        before = torch.cat([q.detach().reshape(-1).clone() for q in params])
        step()
        info = opt.last_step
        after = torch.cat([q.detach().reshape(-1).clone() for q in params])
        if not (info.rho < 0 and info.next_damping > info.damping and info.step_rate > 0):
            continue
        p = (after - before) / info.step_rate
        put(before)
        o = model(x)
        loss = loss_fn(o, y)
        g = torch.cat([u.reshape(-1) for u in torch.autograd.grad(loss, params, retain_graph=True)])
        pHp = float(p @ HessianProduct(loss, params).matvec(p))
        pGp = float(p @ GGNProduct(loss, o, params).matvec(p))
        f0 = float(loss)
        df = f_at(before + p) - f0
        put(after)
        qG, qH = float(g @ p) + 0.5 * pGp, float(g @ p) + 0.5 * pHp
        rg, rh = df / qG if qG < 0 else -math.inf, df / qH if qH < 0 else math.inf
        out["fails"] += 1
        out["h_explains"] += rh >= 0.25 or qH >= 0  # H's model predicts it (or no decrease)
        out["rho_g"].append(rg)
        out["rho_h"].append(rh)
    return out


def failures(steps: int) -> None:
    print(f"## failing steps: Gauss-Newton vs exact-Hessian model (main, seed 0, {steps} "
          f"steps); load {load()}\n")  # fmt: skip
    print("| problem | failing steps | H's model explains (ρ_H ≥ ¼ or q_H ≥ 0) | median ρ_H |")
    print("|---|---|---|---|")
    for key in LARGE + CONTROLS:
        o = models_on_failures(key, 0, steps)
        med = statistics.median(o["rho_h"]) if o["rho_h"] else math.nan
        print(f"| {key} | {o['fails']} | {o['h_explains']} | {med:.3g} |", flush=True)
    print(f"\nload at end {load()}")


def signal(steps: int) -> None:
    print(f"## signal (main's code, seed 0, {steps} steps); load {load()}\n")
    print("| problem | final loss | fails (ρ<0, λ up) | first 4-of-6 | median pᵀHp/pᵀGp | "
          "min pᵀHp/pᵀGp |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for key in LARGE + CONTROLS:
        rows = trace(key, 0, steps, "main", quiet=True)
        fails = [r["rho"] < 0 and r["lam_next"] > r["lam"] for r in rows]
        first = next((k for k in range(len(fails)) if sum(fails[max(0, k - 5) : k + 1]) >= 4), None)
        ratios = [r["ratio"] for r in rows if math.isfinite(r["ratio"])]
        med = statistics.median(ratios) if ratios else math.nan
        mn = min(ratios) if ratios else math.nan
        print(f"| {key} | {rows[-1]['loss']:.4g} | {sum(fails)} | {first} | {med:.3g} | {mn:.3g} |",
              flush=True)  # fmt: skip
    print(f"\nload at end {load()}")


def race(keys: list[str], seeds: list[int], budget: float, extra: list[str]) -> None:
    variants = ["main", "rule", "lbfgs", *extra]
    print(f"## race {budget:g} s CPU each, seeds {seeds}; load {load()}\n")
    print("| problem | seed | main | rule | L-BFGS sw | rule/main | rule/best other | "
          "steps main/rule | switched at | load |" + "".join(f" {v} |" for v in extra))  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra))
    for key in keys:
        for seed in seeds:
            l0 = load()
            base = problem(key, seed)
            runs = []
            for v in variants:
                model = copy.deepcopy(base[0])
                opt = make_opt(model, v)
                runs.append(dict(v=v, model=model, opt=opt, cpu=0.0, steps=0, dead=False,
                                 step=step_of(opt, model, *base[1:]), switched=None))  # fmt: skip
            while True:
                live = [r for r in runs if not r["dead"] and r["cpu"] < budget]
                if not live:
                    break
                r = min(live, key=lambda r: r["cpu"])
                c0 = time.process_time()
                try:
                    r["step"]()
                except Exception:  # noqa: BLE001 - a failing optimizer stops where it is
                    r["dead"] = True
                r["cpu"] += time.process_time() - c0
                r["steps"] += 1
                if (
                    r["switched"] is None
                    and isinstance(r["opt"], HessianFree)
                    and r["opt"]._global_state().get("gn_failed")
                ):
                    r["switched"] = r["steps"]
            final = {}
            for r in runs:
                with torch.no_grad():
                    final[r["v"]] = float(base[3](r["model"](base[1]), base[2]))
            best_other = min(final["main"], final["lbfgs"])
            print(f"| {key} | {seed} | {final['main']:.5g} | {final['rule']:.5g} | "
                  f"{final['lbfgs']:.5g} | {final['rule'] / final['main']:.3g} | "
                  f"{final['rule'] / best_other:.3g} | {runs[0]['steps']}/{runs[1]['steps']} | "
                  f"{runs[1]['switched']} | {l0} → {load()} |"
                  + "".join(f" {final[v]:.5g} |" for v in extra), flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["trace", "signal", "failures", "race"])
    ap.add_argument("problem", nargs="?", default="scaled64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--variant", default="main")
    ap.add_argument("--extra", default="", help="more variants in the race: hess, norestart")
    a = ap.parse_args()
    if a.mode == "trace":
        trace(a.problem, a.seed, a.steps, a.variant)
    elif a.mode == "signal":
        signal(a.steps)
    elif a.mode == "failures":
        failures(a.steps)
    else:
        keys = list(LARGE + CONTROLS) if a.problem == "all" else a.problem.split(",")
        extra = [v for v in a.extra.split(",") if v]
        race(keys, [int(s) for s in a.seeds.split(",")], a.seconds, extra)


if __name__ == "__main__":
    main()
