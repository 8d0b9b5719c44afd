"""Throwaway: HF's momentum form (momentum='quadratic') on the scorecard's CURVES quick task.

The option was removed after these measurements (it helped on no task); the harness runs at
commit 05ef4aa, where ``HessianFree(momentum='quadratic')`` exists.

Interleaved runs from the same initial weights (scorecard.hf_run/interleave): Adam's best
quick setting as the reference, the tuned HF (250/62, cg<=5, K-FAC rank 32) and the defaults
(250/62, no arguments), each with momentum off and 'quadratic'. Modes (third argument):
'cg10' adds 250/62 cg<=10 +- momentum; 'cold' CG from zero (cg_decay=0) with the plane;
'heavy' a heavy ball (beta 0.5, 0.9) on HF's accepted updates, outside the optimizer;
'digits', 'swap', 'mnist1d' the scorecard's other quick tasks against L-BFGS (budget 0: the
task's). Results: experiments/README.md, "What did not help".

    PYTHONPATH=$PWD python3 experiments/_momentum_study.py [rounds] [budget_s] [mode]
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402

PLANES: list = []  # (optimizer id, f_d < f_p, f_d / f_p) of every plane step evaluated
_plane_step = sc.HessianFree._plane


def _logged_plane(self, solution, chosen, f_chosen, objective, run):  # noqa: ANN001, ANN202
    def logged(x):  # noqa: ANN001, ANN202
        f = objective(x)
        PLANES.append((id(self), f < f_chosen, f / f_chosen))
        return f

    return _plane_step(self, solution, chosen, f_chosen, logged, run)


sc.HessianFree._plane = _logged_plane


def _heavy_ball(run, beta: float):  # noqa: ANN001, ANN202
    """θ += β v after each HF step, v = (the step's own change) + β v (heavy ball)."""
    inner, params = run.step, list(run.model.parameters())
    v = [torch.zeros_like(p) for p in params]

    def step() -> None:
        before = [p.detach().clone() for p in params]
        inner()
        with torch.no_grad():
            for p, b, vi in zip(params, before, v, strict=True):
                vi.mul_(beta).add_(p - b)
                p.add_(vi, alpha=beta)

    return step


def _other(key: str, budget: float) -> None:
    """The scorecard's quick digits / swap / MNIST-1D task: defaults and its tuned HF, each
    with momentum off and 'quadratic', against L-BFGS; final error (and time to 100 %)."""
    task = sc.make_swap_task(True) if key == "swap" else sc._classifier(key, True)
    tuned_name = {"digits": "full batch, cg≤50, λ0=1", "swap": "cg≤20"}.get(key) or next(
        n for n in task.hf if "to 4 full steps" in n
    )
    tuned = task.hf[tuned_name]
    default = task.hf_default_regime or task.hf["defaults"]
    default = {k: v for k, v in default.items() if k != "kfac"} | {"kw": {}}
    regimes = {}
    for name, r in (("default", default), ("tuned", tuned)):
        regimes[name] = r
        regimes[name + "+mom"] = dict(r, kw=dict(r["kw"], momentum="quadratic"))
    name, kw = next(iter(task.lbfgs.items()))
    runs = [sc.lbfgs_run(task, name, kw)]
    runs += [sc.hf_run(task, n, "HF", r) for n, r in regimes.items()]
    sc.interleave(runs, task, budget or task.budget, 8, "cpu")
    ref = sc.final_error(runs[0])
    print(f"{key} ({tuned_name}), load {os.getloadavg()}")
    for r in runs:
        line = f"  {r.name:16s} {sc.final_error(r):.3g} ({sc.final_error(r) / ref:.3g}x)"
        if r.acc_curve:
            line += f" 100% at {sc.time_to(r.acc_curve, 1.0, above=True):.2f} s"
        print(line + f" steps {r.steps} {r.statuses} {r.failed}", flush=True)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    budget = float(sys.argv[2]) if len(sys.argv) > 2 else 15.0
    extra = sys.argv[3] if len(sys.argv) > 3 else ""  # '', 'cg10', 'cold' or 'heavy'
    print("load before:", os.getloadavg(), "threads", torch.get_num_threads(), flush=True)
    for k in range(rounds):
        if extra in ("digits", "swap", "mnist1d"):
            _other(extra, budget)
            continue
        task = sc.make_curves_task(True)
        tuned = task.hf["250/62, cg≤5, K-FAC rank 32"]
        default = dict(batch=250, curvature_batch=62, kw={})
        infos: dict[str, list] = {}

        def with_mom(regime: dict, name: str, mom: str, infos: dict = infos) -> dict:
            infos[name] = []
            kw = dict(regime["kw"], callback=infos[name].append)
            if mom != "off":
                kw["momentum"] = mom
            return dict(regime, kw=kw)

        contenders = {
            "tuned": (tuned, "off"),
            "tuned+mom": (tuned, "quadratic"),
            "default": (default, "off"),
            "default+mom": (default, "quadratic"),
        }
        if extra == "cg10":
            c10 = dict(batch=250, curvature_batch=62, kw=dict(cg_max_iter=10))
            contenders |= {"cg10": (c10, "off"), "cg10+mom": (c10, "quadratic")}
        if extra == "cold":  # CG from zero (cg_decay=0): the plane's δ0 is the only memory
            cold = dict(tuned, kw=dict(tuned["kw"], cg_decay=0.0))
            dcold = dict(default, kw=dict(cg_decay=0.0))
            contenders = {
                "tuned": (tuned, "off"),
                "tuned cold": (cold, "off"),
                "tuned cold+mom": (cold, "quadratic"),
                "default": (default, "off"),
                "default cold+mom": (dcold, "quadratic"),
            }
        heavy = {}
        if extra == "heavy":  # heavy ball on top of HF's accepted updates, outside the optimizer
            cold = dict(tuned, kw=dict(tuned["kw"], cg_decay=0.0))
            contenders = {"tuned": (tuned, "off"), "tuned cold": (cold, "off")}
            for b in (0.5, 0.9):
                contenders[f"tuned hb{b}"] = (tuned, "off")
                contenders[f"tuned cold hb{b}"] = (cold, "off")
                heavy[f"tuned hb{b}"] = heavy[f"tuned cold hb{b}"] = b
        hf = {n: with_mom(r, n, m) for n, (r, m) in contenders.items()}
        runs = [sc.first_order_run(task, "Adam", 3e-3, 100)]
        runs += [sc.hf_run(task, n, "HF", h) for n, h in hf.items()]
        for r in runs:
            if r.name in heavy:
                r.step = _heavy_ball(r, heavy[r.name])
        t0 = time.perf_counter()
        sc.interleave(runs, task, budget, 8, "cpu")
        adam = sc.final_error(runs[0])
        print(f"round {k}: {time.perf_counter() - t0:.0f} s, load {os.getloadavg()}")
        for r in runs:
            err = sc.final_error(r)
            line = f"  {r.name:16s} err {err:7.3f} ({err / adam:.3f}x Adam)"
            line += f" steps {r.steps:4d} {r.failed}"
            inf = infos.get(r.name)
            if inf:
                used = [i for i in inf if math.isfinite(i.momentum_beta) and i.momentum_beta != 0]
                acc = sum(i.accepted for i in inf)
                line += f" accepted {acc}/{len(inf)} plane used {len(used)}"
                if used:
                    a = statistics.median(i.momentum_alpha for i in used)
                    b = statistics.median(i.momentum_beta for i in used)
                    line += f" median alpha {a:.3g} beta {b:.3g}"
                line += f" median lam {statistics.median(i.damping for i in inf):.3g}"
                line += f" mean time/step {statistics.mean(i.time_total for i in inf) * 1e3:.0f} ms"
            print(line, flush=True)
    won = sum(w for _, w, _ in PLANES)
    print(f"planes evaluated {len(PLANES)}, below f(p) {won}", end=" ")
    if PLANES:
        print(f"median f_d/f_p {statistics.median(r for *_, r in PLANES):.4f}")
    print("load after:", os.getloadavg())


if __name__ == "__main__":
    main()
