"""Superlinear local convergence of ``HessianFree(params)`` on deterministic (full-batch) fits
(#14, topic "gnquad").

unseen3 found the defaults' Gauss-Newton tail linear on a small-residual full batch: K-FAC's
deterministic CG cap of 5 (``cg_max_iter='auto'``) and the relative forcing term
:math:`\\eta = \\sqrt{\\|g_k\\|/\\|g_1\\|}` truncate every solve. This script compares, on
deterministic problems, the defaults (main's rule: ``HessianFree._newton_phase = False``),
``precond=None``, ``precond=None, cg_rtol=0``, the local-phase rule(s) of this branch, and
``torch.optim.LBFGS(line_search_fn='strong_wolfe')``.

Problems (float64 unless said): ``smallres`` (``_unseen3.p_smallres``: a 4-6-2 tanh MLP fitted to
a teacher plus 1e-3 noise), ``interp`` (a 3-10-10-1 tanh MLP fitted to a teacher of its own shape,
zero residual, f* = 0), ``curve`` (a damped oscillation a e^{-bt} sin(wt + phi) + c, 5
parameters, 200 noisy points; f* from scipy's ``least_squares``), ``digits`` (the scorecard's
full-batch digits MLP, float32 cross-entropy, f* unknown: losses).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_gnquad.py diag PROBLEM [--steps N]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_gnquad.py trace PROBLEM [--steps N]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_gnquad.py starts smallres|interp \
        [--steps N] [--seeds 0,1,2]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_gnquad.py race PROBLEM [--budget S]
    git archive main hessfree | tar -x -C /tmp/gnquad-main
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_gnquad.py gate TASK \\
        --other /tmp/gnquad-main [--seeds 0,1,2] [--budget S] [--same N]

``diag``: main's defaults per step, with what a local-phase test can read (ρ, rate, λ's share of
the step's curvature, decrease and gradient ratios). ``starts``: other starting points (the start
plus 0.1 N(0, 1) per weight), main against the local phase (``diag`` also takes ``mnist1d``, the
scorecard's full-batch MNIST-1D). ``trace``: N steps of each HF variant, one step each in turn (1
thread), f - f* after every step, CPU seconds and curvature products. ``race``: every contender (HF
variants and L-BFGS) stepped in turn until its own CPU clock (``time.process_time`` of its steps
only) reaches the budget; f - f* on a time grid and the CPU time to relative accuracies. ``gate``:
main's package (``--other``) against this branch, ``HessianFree(params)`` with no arguments,
interleaved (``scorecard.interleave``, equal wall clock of stepping, same initial weights per seed)
on the scorecard's ``digits``, ``mnist1d`` (full batch), ``schedule`` (MNIST-1D's growing batch)
and ``swap`` (the LBFGS-loop task); times to the targets and the final loss; with ``--same N``
instead N steps of each, alternating blocks of 10: parameters bitwise equal or not, the steps in
the local phase, CPU per step.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch.set_num_threads(1)
warnings.simplefilter("ignore")

MAIN = False  # HessianFree._newton_phase off: the code before the local phase
#: (name, extra settings) of the local-phase rows. The study's other variants (η = 0, η kept at
#: √(‖g‖/‖g1‖), a non-sticky phase, a "linear progress" entry test) ran at commit 39a9a87
#: through a dict of switches the library no longer has (results/2026-12-03-gnquad.md).
RULES: dict[str, dict] = {
    "local phase (plain CG, sticky, η=‖g‖/‖g1‖)": {},
    "local phase (K-FAC, sticky, η=‖g‖/‖g1‖)": {"precond": "kfac"},
}


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


# ------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------
@dataclass
class Problem:
    name: str
    model: nn.Module  # initial weights (copied per contender)
    x: torch.Tensor
    y: torch.Tensor
    loss: Callable  # (outputs, targets) -> loss
    fstar: float  # 0 where unknown and reported as losses


def p_smallres() -> Problem:
    import _unseen3 as U

    prob = U.p_smallres()
    x, y = prob.full
    return Problem("smallres", prob.model(), x, y, F.mse_loss, 9.064228521619739e-07)


def p_interp() -> Problem:
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(400, 3, generator=gen, dtype=torch.float64)

    def make() -> nn.Module:
        torch.manual_seed(5)
        return nn.Sequential(
            nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 1)
        ).double()

    teacher = make()
    with torch.no_grad():
        y = teacher(x)
        student = make()
        for p in student.parameters():
            p.add_(0.4 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return Problem("interp", student, x, y, F.mse_loss, 0.0)


class Oscillation(nn.Module):
    """a e^{-bt} sin(wt + phi) + c, parameters (a, b, w, phi, c)."""

    def __init__(self, theta: list[float]) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a, b, w, phi, c = self.theta
        return (a * torch.exp(-b * t) * torch.sin(w * t + phi) + c).unsqueeze(-1)


def p_curve() -> Problem:
    import numpy as np
    from scipy.optimize import least_squares

    gen = torch.Generator().manual_seed(3)
    t = torch.linspace(0, 10, 200, dtype=torch.float64)
    with torch.no_grad():
        y = Oscillation([2.0, 0.3, 2.5, 0.5, 0.1])(t)
        y = y + 0.02 * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    start = [1.5, 0.2, 2.3, 0.2, 0.0]
    tn, yn = t.numpy(), y[:, 0].numpy()

    def res(th: np.ndarray) -> np.ndarray:
        a, b, w, phi, c = th
        return a * np.exp(-b * tn) * np.sin(w * tn + phi) + c - yn

    sol = least_squares(res, np.array(start), xtol=1e-15, ftol=1e-15, gtol=1e-15)
    fstar = float(np.mean(sol.fun**2))
    return Problem("curve", Oscillation(start), t, y, F.mse_loss, fstar)


def p_digits() -> Problem:
    import scorecard as sc

    task = sc._classifier("digits", False)
    return Problem("digits", task.model, task.x, task.y, F.cross_entropy, 0.0)


PROBLEMS = {"smallres": p_smallres, "interp": p_interp, "curve": p_curve, "digits": p_digits}


# ------------------------------------------------------------------------------------------
# contenders
# ------------------------------------------------------------------------------------------
@dataclass
class Contender:
    name: str
    model: nn.Module
    step: Callable[[], None]
    cpu: float = 0.0
    wall: float = 0.0
    steps: int = 0
    products: int = 0
    curve: list = field(default_factory=list)  # (cpu, f - f*)
    opt: object = None

    def timed_step(self) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        self.step()
        self.cpu += time.process_time() - c0
        self.wall += time.perf_counter() - t0
        self.steps += 1


def hf_contender(prob: Problem, name: str, kw: dict, rule: bool) -> Contender:
    import hessfree

    m = copy.deepcopy(prob.model)
    opt = hessfree.HessianFree(m.parameters(), **kw)
    c = Contender(name, m, lambda: None, opt=opt)

    def closure():
        out = m(prob.x)
        return prob.loss(out, prob.y), out

    def step() -> None:
        saved = hessfree.HessianFree._newton_phase
        hessfree.HessianFree._newton_phase = rule
        try:
            opt.step(closure)
        finally:
            hessfree.HessianFree._newton_phase = saved
        c.products += opt.last_step.cg_matvecs

    c.step = step
    return c


def lbfgs_contender(prob: Problem) -> Contender:
    m = copy.deepcopy(prob.model)
    opt = torch.optim.LBFGS(m.parameters(), line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = prob.loss(m(prob.x), prob.y)
        f.backward()
        return f

    return Contender("LBFGS strong Wolfe", m, lambda: opt.step(closure))


def contenders(prob: Problem, lbfgs: bool) -> list[Contender]:
    out = [
        hf_contender(prob, "defaults (main's rule)", {}, MAIN),
        hf_contender(prob, "precond=None", {"precond": None}, MAIN),
        hf_contender(prob, "precond=None, cg_rtol=0", {"precond": None, "cg_rtol": 0.0}, MAIN),
    ]
    out += [hf_contender(prob, f"defaults, {k}", kw, True) for k, kw in RULES.items()]
    return out + ([lbfgs_contender(prob)] if lbfgs else [])


def gap(prob: Problem, m: nn.Module) -> float:
    with torch.no_grad():
        return float(prob.loss(m(prob.x), prob.y)) - prob.fstar


def trace(key: str, steps: int) -> None:
    prob = PROBLEMS[key]()
    runs = contenders(prob, lbfgs=False)
    print(f"## trace {key}: {steps} steps, f* = {prob.fstar:.10g}; load {load()}\n")
    f0 = gap(prob, prob.model)
    for _ in range(steps):
        for r in runs:
            r.timed_step()
            r.curve.append((r.cpu, gap(prob, r.model)))
    print(f"load after {load()}; f0 - f* = {f0:.3g}\n")
    what = "f − f*" if prob.fstar else "loss"
    for r in runs:
        cells = " ".join(f"{v:.1e}" for _, v in r.curve)
        print(f"- {r.name}: {what} per step: {cells}")
        print(f"  CPU {r.cpu:.2f} s ({r.cpu / steps * 1e3:.1f} ms/step), products {r.products}")
    print()


def diag(key: str, steps: int) -> None:
    """Per step of main's defaults (no local phase): what a local-phase test could read."""
    if key == "mnist1d":
        import scorecard as sc

        task = sc._classifier("mnist1d", False)
        prob = Problem("mnist1d", task.model, task.x, task.y, F.cross_entropy, 0.0)
    else:
        prob = PROBLEMS[key]()
    run = hf_contender(prob, "defaults", {}, MAIN)
    import hessfree

    opts = [o for o in (run.step.__closure__ or ()) if isinstance(o.cell_contents, object)]
    opt = next(c.cell_contents for c in opts if isinstance(c.cell_contents, hessfree.HessianFree))
    print(f"## diag {key}: main's defaults, {steps} steps; load {load()}\n")
    print(
        "| k | f − f* | ρ | rate | λ | λ share | Δ/Δprev | ‖g‖/‖g‖prev | ‖g‖/‖g1‖ | CG | stop | η |"
    )
    print("|---" * 12 + "|")
    last_drop = last_g = g1 = math.nan
    for k in range(steps):
        run.timed_step()
        i = opt.last_step
        st = opt._global_state()
        drop = i.loss - i.loss_after
        g1 = i.grad_norm if k == 0 else g1
        ratio_drop = drop / last_drop if last_drop else math.nan
        ratio_g = i.grad_norm / last_g if last_g else math.nan
        print(
            f"| {k} | {gap(prob, run.model):.2e} | {i.rho:.3f} | {i.step_rate:g} "
            f"| {i.damping:.1e} | {st.get('newton_share', math.nan):.1e} | {ratio_drop:.2f} "
            f"| {ratio_g:.2f} | {i.grad_norm / g1:.1e} | {i.cg_iters} "
            f"| {i.cg_reason} | {i.cg_rtol:.1e} |"
        )
        last_drop, last_g = drop, i.grad_norm
    print(f"\nload after {load()}; CPU {run.cpu:.1f} s\n")


def starts(key: str, steps: int, seeds: list[int]) -> None:
    """Other starts of ``smallres``/``interp`` (the perturbation redrawn from ``seed``): f − f*
    after ``steps`` steps, main's rule against the local phase (f* = the best either reached,
    or 0 for ``interp``)."""
    print(f"## starts {key}: {steps} steps; load {load()}\n")
    print(
        "| seed | main: f after ¼ / ½ / all | local phase: f after ¼ / ½ / all | phase from step |"
    )
    print("|---|---|---|---|")
    for seed in seeds:
        prob = PROBLEMS[key]()
        with torch.no_grad():
            gen = torch.Generator().manual_seed(500 + seed)
            for p in prob.model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        prob.fstar = 0.0
        runs = [hf_contender(prob, "main", {}, MAIN), hf_contender(prob, "rule", {}, True)]
        entered = -1
        for k in range(steps):
            for r in runs:
                r.timed_step()
                r.curve.append((r.cpu, gap(prob, r.model)))
            if entered < 0 and runs[1].opt._global_state().get("newton"):
                entered = k
        marks = [steps // 4 - 1, steps // 2 - 1, steps - 1]
        cells = [" / ".join(f"{r.curve[i][1]:.2e}" for i in marks) for r in runs]
        print(f"| {seed} | {cells[0]} | {cells[1]} | {entered} |")
    print(f"\nload after {load()}")


def time_to(curve: list, level: float) -> float:
    return next((t for t, v in curve if v <= level), math.inf)


def race(key: str, budget: float, slices: int = 40) -> None:
    prob = PROBLEMS[key]()
    runs = contenders(prob, lbfgs=True)
    f0 = gap(prob, prob.model)
    print(f"## race {key}: {budget:g} CPU s each, f* = {prob.fstar:.10g}; load {load()}\n")
    for r in runs:
        r.curve.append((0.0, f0))
    for i in range(1, slices + 1):
        end = budget * i / slices
        for r in runs:
            while r.cpu < end:
                r.timed_step()
                r.curve.append((r.cpu, gap(prob, r.model)))
    print(f"load after {load()}\n")
    levels = [f0 * 10.0**-k for k in (4, 8, 12)] if prob.fstar or key != "digits" else []
    if key == "digits":
        levels = [9.095e-5, 1.099e-5, 1.678e-7]
    what = "f − f*" if prob.fstar or key == "interp" else "loss"
    head = " | ".join(f"{what} at {q:g}×" for q in (0.25, 0.5, 1.0))
    lv = " | ".join(f"CPU s to ≤ {v:.2g}" for v in levels)
    print(f"| contender | steps | products | {head} | {lv} | wall/CPU |")
    print("|---" * (6 + len(levels)) + "|")
    for r in runs:
        at = [min((v for t, v in r.curve if t <= q * budget), default=f0) for q in (0.25, 0.5, 1)]
        tt = [time_to(r.curve, v) for v in levels]
        print(
            f"| {r.name} | {r.steps} | {r.products} | "
            + " | ".join(f"{v:.2e}" for v in at)
            + " | "
            + " | ".join(f"{t:.3g}" for t in tt)
            + f" | {r.wall / max(r.cpu, 1e-9):.2f} |"
        )
    print()


# ------------------------------------------------------------------------------------------
# gate: main's package against this branch on the scorecard's deterministic tasks
# ------------------------------------------------------------------------------------------
def _package(path: str | None) -> dict:
    """Import the ``hessfree`` package found first in ``path`` (or on sys.path); return its
    ``sys.modules`` entries, removed from ``sys.modules`` (as experiments/_stepcost.py)."""
    for name in [n for n in sys.modules if n == "hessfree" or n.startswith("hessfree.")]:
        del sys.modules[name]
    if path is not None:
        sys.path.insert(0, path)
    try:
        importlib.import_module("hessfree")
        importlib.import_module("hessfree.train.data")
        importlib.import_module("hessfree.train.models")
    finally:
        if path is not None:
            sys.path.remove(path)
    mods = {n: m for n, m in sys.modules.items() if n == "hessfree" or n.startswith("hessfree.")}
    for n in mods:
        del sys.modules[n]
    return mods


def _use(mods: dict) -> None:
    for name in [n for n in sys.modules if n == "hessfree" or n.startswith("hessfree.")]:
        del sys.modules[name]
    sys.modules.update(mods)


MNIST1D_TARGETS = (8.249e-4, 1.144e-4, 7.794e-6)  # _wholebatch.py: run4's Adam targets
DIGITS_TARGETS = (9.095e-5, 1.099e-5, 1.678e-7)


def _seeded(task, seed: int):  # noqa: ANN001, ANN202
    """The task with its model's initial weights drawn from ``seed`` (0: the scorecard's)."""
    if seed == 0:
        return task
    m = copy.deepcopy(task.model)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Linear):  # torch's default init, another draw
                bound = 1.0 / math.sqrt(mod.in_features)
                mod.weight.uniform_(-bound, bound, generator=gen)
                mod.bias.uniform_(-bound, bound, generator=gen)
    return replace(task, model=m)


def _same(sc, packs, task0, regime, seeds, steps, key) -> None:  # noqa: ANN001
    """``steps`` steps of main and of the branch per seed, alternating in blocks of 10: are the
    parameters bitwise equal, how many steps were in the local phase, CPU per step."""
    print(f"\n### {key}: {steps} steps per seed; load {load()}\n")
    print("| seed | parameters bitwise equal | local-phase steps | CPU ms/step main, branch |")
    print("|---|---|---|---|")
    for seed in seeds:
        task = _seeded(task0, seed)
        runs, opts = {}, {}
        for k, mods in packs.items():
            _use(mods)
            sc.HessianFree = mods["hessfree"].HessianFree
            runs[k] = sc.hf_run(task, k, "HF", regime)
            opts[k] = next(
                c.cell_contents
                for c in runs[k].step.__closure__
                if type(c.cell_contents).__name__ == "HessianFree"
            )
        cpu = dict.fromkeys(packs, 0.0)
        fired = 0
        for block in range(0, steps, 10):
            for k in packs if block % 20 == 0 else list(packs)[::-1]:
                _use(packs[k])
                c0 = time.process_time()
                for _ in range(min(10, steps - block)):
                    runs[k].step()
                    fired += k == "branch" and bool(opts[k]._global_state().get("newton"))
                cpu[k] += time.process_time() - c0
        same = all(
            torch.equal(a, b)
            for a, b in zip(
                runs["main"].model.parameters(), runs["branch"].model.parameters(), strict=True
            )
        )
        print(
            f"| {seed} | {same} | {fired} | {cpu['main'] / steps * 1e3:.2f}, "
            f"{cpu['branch'] / steps * 1e3:.2f} |"
        )
        sys.stdout.flush()
    print(f"\nload after {load()}")


def gate(key: str, other: str, seeds: list[int], budget: float | None, steps: int = 0) -> None:
    packs = {"main": _package(other), "branch": _package(None)}
    _use(packs["branch"])
    import scorecard as sc

    for k, mods in packs.items():
        print(f"{k}: {mods['hessfree'].__file__}")
    if key == "swap":
        task0 = sc.make_swap_task(False)
        regime = task0.hf["defaults"]
        targets: tuple = ()
    else:
        task0 = sc._classifier("digits" if key == "digits" else "mnist1d", False)
        n = len(task0.x)
        regime = dict(batch=n, curvature_batch=n, kw={})
        if key == "schedule":
            tuned = task0.hf[next(k for k in task0.hf if "held at" in k)]
            regime = {k: v for k, v in tuned.items() if k not in ("kfac", "early_kw", "kw")}
            regime["kw"] = {}
        targets = DIGITS_TARGETS if key == "digits" else MNIST1D_TARGETS
    if steps:
        return _same(sc, packs, task0, regime, seeds, steps, key)
    budget = budget or task0.budget
    rows: dict[str, list[list[float]]] = {}
    fired: dict[str, int] = {}  # steps taken in the local phase (the branch's rule)
    for seed in seeds:
        task = _seeded(task0, seed)
        runs = []
        for k, mods in packs.items():
            _use(mods)
            sc.HessianFree = mods["hessfree"].HessianFree
            r = sc.hf_run(task, k, "HF", regime)
            step = r.step
            opt = next(
                c.cell_contents
                for c in step.__closure__
                if type(c.cell_contents).__name__ == "HessianFree"
            )
            fired[k] = 0

            def swapped(step=step, mods=mods, opt=opt, k=k) -> None:  # noqa: ANN001
                _use(mods)
                step()
                fired[k] += bool(opt._global_state().get("newton"))

            r.step = swapped
            runs.append(r)
        l0 = load()
        c0 = time.process_time()
        sc.interleave(
            runs,
            task,
            budget,
            task.slices,
            "cpu",
            early=sc.FINAL_EARLY_POINTS,
            accuracy_steps=budget / 2 if key == "digits" else 0.0,
        )
        print(
            f"\nseed {seed}: load {l0} -> {load()}, CPU of the process "
            f"{time.process_time() - c0:.1f} s for {len(runs)} × {budget:g} s of stepping"
        )
        head = " | ".join(f"s to ≤ {t:.3g}" for t in targets)
        print(f"| run | steps | statuses | {head} | s to 100 % acc. | final loss |")
        print("|---" * (6 + len(targets)) + "|")
        for r in runs:
            ts = [sc.time_to(r.curve, t) for t in targets]
            acc = sc.time_to(r.acc_curve, 1.0, above=True) if key == "digits" else math.nan
            fin = sc.final_error(r)
            rows.setdefault(r.name, []).append([*ts, acc, fin])
            st = ", ".join(f"{k} {v}" for k, v in sorted(r.statuses.items()))
            st += f"; local phase on {fired[r.name]} steps"
            print(
                f"| {r.name} | {r.steps} | {st} | "
                + " | ".join(f"{t:.3g}" for t in ts)
                + f" | {acc:.3g} | {fin:.4g} |"
            )
        sys.stdout.flush()
    print("\nbranch / main per seed (times to targets, time to 100 %, final loss):\n")
    for i, seed in enumerate(seeds):
        b, m = rows["branch"][i], rows["main"][i]
        cells = (f"{x / y:.3f}" if y else "nan" for x, y in zip(b, m, strict=True))
        print(f"- seed {seed}: " + ", ".join(cells))
    cols = len(rows["main"][0])
    med = [
        statistics.median(rows["branch"][i][j] / rows["main"][i][j] for i in range(len(seeds)))
        for j in range(cols)
    ]
    print("- median: " + ", ".join(f"{v:.3f}" for v in med))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["trace", "race", "gate", "diag", "starts"])
    ap.add_argument("what")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--budget", type=float, default=None)
    ap.add_argument("--other", default="/tmp/gnquad-main")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--same", type=int, default=0, help="gate: N steps each, bitwise check")
    args = ap.parse_args()
    if args.mode == "starts":
        starts(args.what, args.steps, [int(s) for s in args.seeds.split(",")])
    elif args.mode == "diag":
        diag(args.what, args.steps)
    elif args.mode == "trace":
        trace(args.what, args.steps)
    elif args.mode == "race":
        race(args.what, args.budget or 3.0)
    else:
        seeds = [int(s) for s in args.seeds.split(",")]
        gate(args.what, args.other, seeds, args.budget, args.same)


if __name__ == "__main__":
    main()
