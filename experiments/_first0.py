"""first0: the Gauss-Newton -> exact Hessian switch decided at step 0, the GN step withdrawn
(topic "first0"; follow-up to "gnfall").

At step 0 under ``curvature='auto'`` with a ``(loss, outputs)`` closure the optimizer solves
the Gauss-Newton system and, along CG's solution x, compares xᵀHx with xᵀGx; where
xᵀHx ≤ 0 < xᵀGx the step is withdrawn (parameters unchanged, status
``gauss_newton_withdrawn``) and the exact Hessian runs from θ0 (``HessianFree._gn_first_test``).

Problems (full batch, float64, MSE, ``(loss, outputs)`` closure). Large residual, new here:
NIST StRD nonlinear regression problems typed in from their certified data files (certified
residual sums of squares: BoxBOD 1.1680088766E+03, Rat43 8.7864049080E+03, Rat42
8.0565229338E+00, MGH10 8.7945855171E+01; seed 0 = NIST's start 1, seed s > 0 = start 1 times
1 + 0.1 N(0, 1) from generator 500 + s); ``gauss`` (misspecified: one Gaussian peak fitted to
two), ``heavy`` (a 1-24-24-1 tanh MLP on sin(2x) plus N(0, 3²) noise), ``scales2`` (a 4-20-2
tanh MLP, two outputs of scales 1 and 300 on a different target family than unseen7's),
``outliers`` (a e^{-bt} + c on 10 % gross outliers), ``exps`` (jacscale's a₁e^{-k₁t} + a₂e^{-k₂t}
+ c, amplitudes ~1e3, one start; seeds ignored). gnfall's ``scaled64``, ``misfit``, ``noisy``.
Controls: gnentry's ``smallres``, ``interp``, ``sine``, ``osborne``, the scorecard's full-batch
``digits``, quadentry's ``tinyce``; first step only: the scorecard's ``mnist1d`` and ``curves``
(the CURVES autoencoder, full batch).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_first0.py oracle
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_first0.py signal [--seeds 0,1]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_first0.py race PROBLEMS \\
        [--seeds 0,1] [--seconds 4]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_first0.py cost [--repeats 3]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_first0.py steps PROBLEM [--steps N]

``oracle``: each NIST problem's optimum by ``scipy.optimize.least_squares`` against the
certified RSS (checks the typed-in data). ``signal``: per problem and start, xᵀHx / xᵀGx along
step 0's Gauss-Newton CG solution and whether the test fires. ``race``: ``main`` (switch off),
``first0`` (switch on), ``hess`` (``curvature='hessian'`` from the start) and strong-Wolfe
``lbfgs`` from the same weights, interleaved by each contender's own CPU time
(``time.process_time``), 1 thread; loss at the end, ratios, and CPU time to within 1 % of the
best final loss. ``cost``: step 0 on CURVES (full batch) and MNIST-1D with the test off and on,
interleaved, CPU and wall time; peak memory of step 0 in a fresh subprocess each
(``ru_maxrss`` before and after). ``steps``: loss after N steps, main against first0, with
scipy's optimum.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gnfall as G  # noqa: E402

from hessfree import HessianFree  # noqa: E402
from hessfree.curvature import GGNProduct, HessianProduct  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")

NEW = ("boxbod", "rat43", "rat42", "mgh10", "gauss", "heavy", "scales2", "outliers")
OLD = ("scaled64", "misfit", "noisy")
CONTROLS = ("smallres", "interp", "sine", "osborne", "digits", "tinyce")
FIRST_ONLY = ("mnist1d", "curves")

#: NIST StRD: (model, x, y, start 1, certified parameters, certified RSS)
NIST = {
    "boxbod": (
        lambda b, x: b[0] * (1 - torch.exp(-b[1] * x)),
        [1, 2, 3, 5, 7, 10],
        [109, 149, 149, 191, 213, 224],
        [1.0, 1.0],
        1.1680088766e03,
    ),
    "rat43": (
        lambda b, x: b[0] / (1 + torch.exp(b[1] - b[2] * x)) ** (1 / b[3]),
        list(range(1, 16)),
        [
            16.08,
            33.83,
            65.80,
            97.20,
            191.55,
            326.20,
            386.87,
            520.53,
            590.03,
            651.92,
            724.93,
            699.56,
            689.96,
            637.56,
            717.41,
        ],
        [100.0, 10.0, 1.0, 1.0],
        8.7864049080e03,
    ),  # fmt: skip
    "rat42": (
        lambda b, x: b[0] / (1 + torch.exp(b[1] - b[2] * x)),
        [9, 14, 21, 28, 42, 57, 63, 70, 79],
        [8.93, 10.8, 18.59, 22.33, 39.35, 56.11, 61.73, 64.62, 67.08],
        [100.0, 1.0, 0.1],
        8.0565229338e00,
    ),
    "mgh10": (
        lambda b, x: b[0] * torch.exp(b[1] / (x + b[2])),
        list(range(50, 126, 5)),
        [
            34780,
            28610,
            23650,
            19630,
            16370,
            13720,
            11540,
            9744,
            8261,
            7030,
            6005,
            5147,
            4427,
            3820,
            3307,
            2872,
        ],
        [2.0, 400000.0, 25000.0],
        8.7945855171e01,
    ),  # fmt: skip
}


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


class Curve(nn.Module):
    """A parametric curve ``fn(theta, x)`` with ``theta`` one float64 parameter vector."""

    def __init__(self, fn, start: list[float]) -> None:  # noqa: ANN001
        super().__init__()
        self.fn = fn
        self.theta = nn.Parameter(torch.tensor(start, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.theta, x)


def _start(start: list[float], seed: int) -> list[float]:
    if not seed:
        return list(start)
    g = torch.Generator().manual_seed(500 + seed)
    noise = torch.randn(len(start), generator=g, dtype=torch.float64)
    return [s * (1 + 0.1 * float(n)) for s, n in zip(start, noise, strict=True)]


def _mlp(sizes: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def problem(key: str, seed: int):
    """(model, x, y, loss_fn) for ``key`` from start ``seed``."""
    if key in NIST:
        fn, x, y, start, _ = NIST[key]
        x = torch.tensor(x, dtype=torch.float64)
        y = torch.tensor(y, dtype=torch.float64)
        return Curve(fn, _start(start, seed)), x, y, F.mse_loss
    if key == "gauss":  # one peak cannot fit two: the residual stays large
        t = torch.linspace(0, 6, 120, dtype=torch.float64)
        y = 3 * torch.exp(-((t - 1.5) ** 2) / 0.5) + 2 * torch.exp(-((t - 4.5) ** 2) / 0.8)
        fn = lambda b, t: b[0] * torch.exp(-b[1] * (t - b[2]) ** 2)  # noqa: E731
        return Curve(fn, _start([1.0, 1.0, 3.0], seed)), t, y, F.mse_loss
    if key == "outliers":  # a decay with 10 % of the points replaced by gross outliers
        g = torch.Generator().manual_seed(21)
        t = torch.linspace(0, 5, 100, dtype=torch.float64)
        y = 5 * torch.exp(-0.7 * t) + 1 + 0.1 * torch.randn(100, generator=g, dtype=torch.float64)
        bad = torch.randperm(100, generator=g)[:10]
        y[bad] += 20 * torch.rand(10, generator=g, dtype=torch.float64) + 10
        fn = lambda b, t: b[0] * torch.exp(-b[1] * t) + b[2]  # noqa: E731
        return Curve(fn, _start([1.0, 2.0, 0.0], seed)), t, y, F.mse_loss
    if key == "heavy":
        g = torch.Generator().manual_seed(31)
        x = 3 * torch.rand(400, 1, generator=g, dtype=torch.float64) - 1.5
        y = torch.sin(2 * x) + 3 * torch.randn(400, 1, generator=g, dtype=torch.float64)
        return _mlp([1, 24, 24, 1], seed), x, y, F.mse_loss
    if key == "scales2":
        g = torch.Generator().manual_seed(41)
        x = torch.rand(500, 4, generator=g, dtype=torch.float64) * 2 - 1
        y1 = torch.cos(3 * x[:, :1]) * x[:, 1:2]
        y2 = 300 * (x[:, 2:3] * x[:, 3:4] + 0.5 * x[:, :1] ** 2)
        y = torch.cat([y1, y2], 1) + 0.02 * torch.randn(500, 2, generator=g, dtype=torch.float64)
        return _mlp([4, 20, 2], seed), x, y, F.mse_loss
    if key == "exps":  # jacscale's badly scaled two-exponential fit (one start)
        import _jacscale as J

        prob = J.problems(1.0)["exps"]()
        return prob.model(), prob.x, prob.y, prob.loss
    if key == "tinyce":
        import _quadentry as Qe

        p = Qe.Tiny("tinyce", seed)
        return p.model, p.x, p.y, p.loss
    if key in ("mnist1d", "curves"):
        import scorecard

        task = (
            scorecard.make_curves_task(quick=True)
            if key == "curves"
            else scorecard._classifier(key, quick=True)
        )
        return copy.deepcopy(task.model), task.x, task.y, task.loss
    return G.problem(key, seed)


class Probe(HessianFree):
    """The library's first-step test computed and recorded, never acted on."""

    _gn_first_test = False
    seen: tuple[float, float] | None = None

    def _first_step_curvature(self, evaluation, product, x) -> bool:  # noqa: ANN001
        if self._global_state()["step"] == 0 and type(product) is GGNProduct:
            with torch.enable_grad():
                Hx = HessianProduct(evaluation.loss, self._params()).matvec(x)
            self.seen = tuple(torch.stack([x @ Hx, x @ product.matvec(x)]).tolist())
        return False


class Main(HessianFree):
    _gn_first_test = False


class First0(HessianFree):
    _gn_first_test = True


def make_opt(model: nn.Module, variant: str) -> torch.optim.Optimizer:
    if variant == "lbfgs":
        return torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe")
    if variant == "hess":
        return Main(model.parameters(), curvature="hessian")
    return {"main": Main, "first0": First0, "probe": Probe}[variant](model.parameters())


def f_of(model, x, y, loss_fn) -> float:  # noqa: ANN001
    with torch.no_grad():
        return float(loss_fn(model(x), y))


# ------------------------------------------------------------------------------------------
def oracle() -> None:
    from scipy.optimize import least_squares

    print("## NIST problems: scipy.optimize.least_squares from start 1 and 2 vs certified RSS\n")
    print("| problem | N | RSS (scipy) | certified | f* = RSS / N (the MSE) |")
    print("|---|---|---|---|---|")
    for key, (fn, x, y, start, rss) in NIST.items():
        xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)

        def res(b, fn=fn, xt=xt, yt=yt):  # noqa: ANN001, ANN202
            return (fn(torch.tensor(b), xt) - yt).numpy()

        best = min(
            (least_squares(res, s, xtol=1e-15, ftol=1e-15, gtol=1e-15, x_scale="jac")
             for s in (start, fstar_start(key))),
            key=lambda r: r.cost,
        )  # fmt: skip
        n = len(x)
        print(f"| {key} | {n} | {2 * best.cost:.10g} | {rss:.10g} | {2 * best.cost / n:.8g} |")


def fstar_start(key: str) -> list[float]:
    """NIST's start 2 (closer to the optimum), for scipy's oracle only."""
    return {"boxbod": [100, 0.75], "rat43": [700, 5, 0.75, 1.3], "rat42": [75, 2.5, 0.07],
            "mgh10": [0.02, 4000, 250]}[key]  # fmt: skip


def signal(keys: list[str], seeds: list[int]) -> list[dict]:
    print(f"## step 0: xᵀHx / xᵀGx along the Gauss-Newton CG solution; load {load()}\n")
    print("| problem | seed | xᵀHx | xᵀGx | ratio | fires |")
    print("|---|---|---|---|---|---|")
    rows = []
    for key in keys:
        for seed in seeds if key not in FIRST_ONLY else [0]:
            model, x, y, loss_fn = problem(key, seed)
            opt = make_opt(model, "probe")

            def closure(model=model, x=x, y=y, loss_fn=loss_fn):  # noqa: ANN001, ANN202
                out = model(x)
                return loss_fn(out, y), out

            opt.step(closure)
            xHx, xGx = opt.seen if opt.seen else (math.nan, math.nan)
            fires = xHx <= 0.0 < xGx
            rows.append(dict(key=key, seed=seed, xHx=xHx, xGx=xGx, fires=fires))
            print(f"| {key} | {seed} | {xHx:.4g} | {xGx:.4g} | {xHx / xGx:.3g} | "
                  f"{'**yes**' if fires else 'no'} |", flush=True)  # fmt: skip
    print(f"\nload at end {load()}")
    return rows


def step_of(opt, model, x, y, loss_fn):  # noqa: ANN001, ANN201
    if isinstance(opt, HessianFree):

        def lo():  # noqa: ANN202
            out = model(x)
            return loss_fn(out, y), out

        return lambda: opt.step(lo)

    def closure():  # noqa: ANN202
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return lambda: opt.step(closure)


VARIANTS = ("main", "first0", "hess", "lbfgs")


def race(keys: list[str], seeds: list[int], budget: float) -> list[dict]:
    print(f"## race {budget:g} s CPU each, seeds {seeds}; load {load()}\n")
    head = " | ".join(VARIANTS)
    print(
        f"| problem | seed | {head} | first0/main | first0/lbfgs | hess/lbfgs | "
        "CPU s to 1.01·best: " + " / ".join(VARIANTS) + " | steps | withdrawn | load |"
    )
    print("|---|---|" + "---|" * len(VARIANTS) + "---|---|---|---|---|---|---|")
    out = []
    for key in keys:
        for seed in seeds:
            l0 = load()
            base = problem(key, seed)
            runs = []
            for v in VARIANTS:
                model = copy.deepcopy(base[0])
                opt = make_opt(model, v)
                runs.append(dict(v=v, model=model, opt=opt, cpu=0.0, steps=0, dead=False,
                                 step=step_of(opt, model, *base[1:]),
                                 curve=[(0.0, f_of(model, *base[1:]))], withdrawn=0))  # fmt: skip
            # warm-up: one step of each on throwaway copies (first-call costs)
            for v in VARIANTS:
                m = copy.deepcopy(base[0])
                step_of(make_opt(m, v), m, *base[1:])()
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
                info = getattr(r["opt"], "last_step", None)
                r["withdrawn"] += info is not None and info.status == "gauss_newton_withdrawn"
                f = f_of(r["model"], *base[1:])
                r["curve"].append((r["cpu"], f if math.isfinite(f) else math.inf))
            final = {r["v"]: min(c[1] for c in r["curve"][-1:]) for r in runs}
            best = min(final.values())
            target = best + 0.01 * abs(best)
            tt = {}
            for r in runs:
                tt[r["v"]] = next((c for c, f in r["curve"] if f <= target), math.inf)
            row = dict(key=key, seed=seed, final=final, tt=tt, load=(l0, load()),
                       steps={r["v"]: r["steps"] for r in runs},
                       withdrawn=runs[1]["withdrawn"])  # fmt: skip
            out.append(row)
            vals = " | ".join(f"{final[v]:.6g}" for v in VARIANTS)
            tts = " / ".join(f"{tt[v]:.2f}" for v in VARIANTS)
            ratios = [final["first0"] / final["main"], final["first0"] / final["lbfgs"],
                      final["hess"] / final["lbfgs"]]  # fmt: skip
            print(f"| {key} | {seed} | {vals} | " + " | ".join(f"{v:.3g}" for v in ratios) + " | "
                  f"{tts} | {'/'.join(str(r['steps']) for r in runs)} | {row['withdrawn']} | "
                  f"{l0} → {load()} |", flush=True)  # fmt: skip
    return out


def steps_table(key: str, seeds: list[int], steps: int) -> None:
    print(f"## {key}: loss after k steps (main / first0); load {load()}\n")
    for seed in seeds:
        base = problem(key, seed)
        for v in ("main", "first0"):
            model = copy.deepcopy(base[0])
            opt = make_opt(model, v)
            st = step_of(opt, model, *base[1:])
            fs = []
            for _ in range(steps):
                st()
                fs.append(f_of(model, *base[1:]))
            print(f"seed {seed} {v}: " + " ".join(f"{f:.8g}" for f in fs[:: max(1, steps // 10)])
                  + f" | last {fs[-1]:.10g}")  # fmt: skip


# ------------------------------------------------------------------------------------------
def cost_one(key: str, on: bool, more: int = 0) -> None:
    """One step 0 in this (fresh) process, then ``more`` steps; prints JSON: step 0's CPU and
    wall time, peak RSS before and after it and after the ``more`` steps."""
    model, x, y, loss_fn = problem(key, 0)
    opt = make_opt(model, "first0" if on else "main")

    def closure():  # noqa: ANN202
        out = model(x)
        return loss_fn(out, y), out

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c0, w0 = time.process_time(), time.perf_counter()
    opt.step(closure)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status, cg = str(opt.last_step.status), opt.last_step.cg_iters
    for _ in range(more):  # the run's later peak: does step 0's extra product raise it?
        opt.step(closure)
    later = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(cpu=cpu, wall=wall, rss0=before, rss1=after, rss_later=later,
                          status=status, cg=cg)))  # fmt: skip


def cost(keys: list[str], repeats: int, more: int) -> None:
    print(f"## step 0's cost, test off / on (fresh process each, interleaved); load {load()}\n")
    print(
        "| task | test | CPU s (median) | wall s (median) | peak RSS rise in step 0, MiB "
        "(median) | peak RSS after, MiB | after step N, MiB | CG iters | status |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    for key in keys:
        res = {False: [], True: []}
        for _ in range(repeats):
            for on in (False, True):
                p = subprocess.run(
                    [sys.executable, __file__, "cost-one", key, "--steps", str(more)]
                    + (["--on"] if on else []),
                    capture_output=True, text=True, env=env, check=True,
                )  # fmt: skip
                res[on].append(json.loads(p.stdout.strip().splitlines()[-1]))
        for on in (False, True):
            rs = res[on]

            def med(k: str, rs: list[dict] = rs) -> float:
                return statistics.median(r[k] for r in rs)

            rise = statistics.median((r["rss1"] - r["rss0"]) / 1024 for r in rs)
            print(f"| {key} | {'on' if on else 'off'} | {med('cpu'):.3f} | {med('wall'):.3f} | "
                  f"{rise:.1f} | {med('rss1') / 1024:.0f} | {med('rss_later') / 1024:.0f} | "
                  f"{rs[0]['cg']} | {rs[0]['status']} |",
                  flush=True)  # fmt: skip
        c = [b["cpu"] / a["cpu"] for a, b in zip(res[False], res[True], strict=True)]
        print(f"| {key} | on/off CPU ratio per pair | {', '.join(f'{v:.3f}' for v in c)} |")
    print(f"\nload at end {load()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["oracle", "signal", "race", "cost", "cost-one", "steps"])
    ap.add_argument("problem", nargs="?", default="all")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--on", action="store_true")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.mode == "oracle":
        oracle()
    elif a.mode == "signal":
        keys = NEW + OLD + CONTROLS + FIRST_ONLY if a.problem == "all" else a.problem.split(",")
        signal(list(keys), seeds)
    elif a.mode == "race":
        keys = NEW + OLD + CONTROLS if a.problem == "all" else a.problem.split(",")
        race(list(keys), seeds, a.seconds)
    elif a.mode == "cost":
        cost(list(FIRST_ONLY) if a.problem == "all" else a.problem.split(","), a.repeats, a.steps)
    elif a.mode == "cost-one":
        cost_one(a.problem, a.on, a.steps)
    else:
        steps_table(a.problem, seeds, a.steps)


if __name__ == "__main__":
    np.set_printoptions(precision=6)
    main()
