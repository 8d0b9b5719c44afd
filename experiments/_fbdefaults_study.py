"""Full-batch defaults (#14): λ schedule and CG forcing term on deterministic objectives.

Variants of ``HessianFree(params)`` that differ from the defaults only on steps where the
objective is seen deterministic (``state['deterministic'] is True``: the closure's value at
the start of a step equals the previous step's at the same parameters), so a stochastic run
is untouched. Each variant is a subclass overriding one private hook:

- ``_cg_rtol``: the forcing term η (defaults: Eisenstat & Walker choice 2, η ≤ ½);
- ``_damping_policy``: the Levenberg–Marquardt decrease after a good step (defaults:
  Nielsen, λ × max(⅓, 1 − (2ρ − 1)³)).

Problems (all full batch, deterministic): the scorecard's swap task (unchanged LBFGS-style
closure, exact Hessian products) on ``--seeds`` initialisations, the quick scorecard's
MNIST-1D and digits, and ``_fullbatch_curvature``'s regression MLP. Every variant is stepped
round-robin (one step each in turn, torch 1 thread) until it spent ``budget`` gradient
equivalents (closure calls, forward-only ones included, plus CG products): the primary,
load-independent metric is the gradient equivalents to each loss target; the interleaved
stepping times to the same targets are reported as ratios to the defaults'.

    python experiments/_fbdefaults_study.py [--tasks swap,mnist1d,digits,regression]
        [--seeds 5] [--variants a,b] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard  # noqa: E402
from _bench_common import md_table, save_text  # noqa: E402
from _fullbatch_curvature import make_regression_task  # noqa: E402

from hessfree import HessianFree  # noqa: E402
from hessfree import damping as _damping  # noqa: E402

#: the scorecard's tuned swap row (λ0 = 1, warm starts decayed by 0.95)
TUNED = dict(damping=1.0, cg_decay=0.95)


def _deterministic(state: dict) -> bool:
    return state.get("deterministic") is True


@dataclasses.dataclass(frozen=True)
class _FastDecrease(_damping.DampingPolicy):
    """Nielsen's rule with a smaller floor on the decrease factor (``floor`` instead of ⅓)."""

    floor: float = 0.1

    def after_step(self, damping: float, rho: float) -> float:
        if not self.adapt or math.isnan(rho) or rho <= 0:
            return super().after_step(damping, rho)
        return self.clip(damping * max(self.floor, 1.0 - (2.0 * rho - 1.0) ** 3))


def make_variant(name: str) -> type[HessianFree]:
    """A ``HessianFree`` subclass for the named variant ('defaults': the class itself)."""
    if name in ("defaults", "tuned"):
        return HessianFree
    parts = dict(part.partition(":")[::2] for part in name.split("+"))

    class Variant(HessianFree):
        def _cg_rtol(self, run):  # noqa: ANN001, ANN202
            rtol = super()._cg_rtol(run)
            state = run.state
            kind = next((k for k in parts if k.startswith("eta")), None)
            if not _deterministic(state) or kind is None:
                return rtol
            arg = parts[kind]
            g = run.report["grad_norm"]
            g0 = state.setdefault("fb_g0", g)
            if kind == "eta_sqrt":  # Dembo–Steihaug style, scale-free: η = min(½, √(‖g‖/‖g0‖))
                rtol = min(0.5, math.sqrt(g / g0)) if g0 > 0 else rtol
            elif kind == "eta_lin":  # η = min(½, ‖g‖/‖g0‖)
                rtol = min(0.5, g / g0) if g0 > 0 else rtol
            else:  # η from the last ρ: tighten by `arg` while the model predicts well
                rho = state.get("fb_last_rho", math.nan)
                eta = state.get("fb_eta", 0.5)
                f = float(arg or 4)
                eta = eta / f if abs(rho - 1.0) < 0.25 else min(0.5, eta * f)
                rtol = state["fb_eta"] = max(eta, 1e-6)
            run.report["cg_rtol"] = rtol
            return rtol

        def _damping_policy(self, state):  # noqa: ANN001, ANN202
            policy = super()._damping_policy(state)
            if "lam_fast" in parts and _deterministic(state) and policy.rule == "nielsen":
                fields = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}
                return _FastDecrease(**fields, floor=float(parts["lam_fast"] or 0.1))
            return policy

    Variant.__name__ = f"HF[{name}]"
    return Variant


def _swap_task(seed: int) -> scorecard.Task:
    task = scorecard.make_swap_task(quick=False)
    torch.manual_seed(seed)
    task.model = nn.Sequential(
        nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )
    return task


def _closure(task: scorecard.Task, m: nn.Module, opt: HessianFree, lbfgs_style: bool):
    if lbfgs_style:  # the swap task: an unchanged torch.optim.LBFGS closure

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.mse_loss(m(task.x), task.y)
            loss.backward()
            return loss

        return closure

    def closure() -> tuple:
        out = m(task.x)
        return task.loss(out, task.y), out

    return closure


def run_task(task: scorecard.Task, names: list[str], budget: float, lbfgs_style: bool) -> dict:
    runs = []
    for name in names:
        m = copy.deepcopy(task.model)
        infos: list = []
        kw = TUNED if name == "tuned" else {}
        opt = make_variant(name)(m.parameters(), callback=infos.append, **kw)
        runs.append(dict(name=name, m=m, opt=opt, infos=infos, spent=0, t=0.0, curve=[], c=None))
    for r in runs:
        r["c"] = _closure(task, r["m"], r["opt"], lbfgs_style)
    pending, k = list(runs), 0
    while pending:
        for r in pending[:: 1 if k % 2 else -1]:  # alternate who goes first
            t0 = time.perf_counter()
            r["opt"].step(r["c"])
            r["t"] += time.perf_counter() - t0
            i = r["infos"][-1]
            r["spent"] += i.closure_calls + i.cg_matvecs + i.precond_matvecs
            r["curve"].append((r["spent"], r["t"], task.error(r["m"])))
        k += 1
        pending = [r for r in pending if r["spent"] < budget]
    return {r["name"]: r for r in runs}


def _first(curve: list, target: float) -> tuple[float, float]:
    for spent, t, loss in curve:
        if loss <= target:
            return spent, t
    return math.inf, math.inf


def _best(curve: list) -> float:
    return min(v for _, _, v in curve)


def _gmean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x) and x > 0]
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="swap,mnist1d,digits,regression")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--variants", default="eta_sqrt,eta_lin,eta_rho:4,lam_fast:0.1,lam_fast:0.03")
    ap.add_argument("--swap-budget", type=float, default=6000)
    ap.add_argument("--budget", type=float, default=330)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = ["defaults", *[v for v in args.variants.split(",") if v]]
    load0 = open("/proc/loadavg").read().split()[:3]
    t_start = time.perf_counter()
    lines = []
    for key in args.tasks.split(","):
        if key == "swap":
            tasks = [
                (f"swap seed {s}", _swap_task(s), True, args.swap_budget) for s in range(args.seeds)
            ]
        elif key in ("mnist1d", "digits"):
            tasks = [(key, scorecard._classifier(key, quick=True), False, args.budget)]
        else:
            tasks = [(key, make_regression_task(10.0), False, args.budget)]
        per_variant = {n: dict(ge=[], t=[]) for n in names}
        dump: list = []
        rows = []
        for label, task, lbfgs_style, budget in tasks:
            res = run_task(task, names, budget, lbfgs_style)
            # common targets: the worst best-loss of all variants, and two easier ones
            common = max(_best(r["curve"]) for r in res.values())
            f0 = float(task.error(task.model))
            targets = [f0 * (common / f0) ** (1 / 3), f0 * (common / f0) ** (2 / 3), common]
            d = [_first(res["defaults"]["curve"], x) for x in targets]
            for n, r in res.items():
                hits = [_first(r["curve"], x) for x in targets]
                # pairwise: the lowest loss both this variant and the defaults reached
                pair = max(_best(r["curve"]), _best(res["defaults"]["curve"]))
                (pg, pt), (dg, dt) = (
                    _first(r["curve"], pair),
                    _first(res["defaults"]["curve"], pair),
                )
                per_variant[n]["ge"].append(pg / dg)
                per_variant[n]["t"].append(pt / dt)
                dump.append(dict(problem=label, variant=n, curve=r["curve"]))
                rows.append(
                    [
                        label,
                        n,
                        len(r["curve"]),
                        f"{_best(r['curve']):.3g}",
                        " / ".join(f"{g:g}" for g, _ in hits),
                        " / ".join(f"{h[0] / e[0]:.2f}" for h, e in zip(hits, d, strict=True)),
                        " / ".join(f"{h[1] / e[1]:.2f}" for h, e in zip(hits, d, strict=True)),
                    ]
                )
                print(rows[-1], flush=True)
            print(f"  targets {[f'{x:.3g}' for x in targets]}", flush=True)
        summary = [
            [
                n,
                f"{_gmean(v['ge']):.3f}",
                " ".join(f"{x:.2f}" for x in v["ge"]),
                f"{_gmean(v['t']):.3f}",
                " ".join(f"{x:.2f}" for x in v["t"]),
            ]
            for n, v in per_variant.items()
        ]
        lines += [
            f"## {key}",
            "",
            md_table(
                [
                    "problem",
                    "variant",
                    "steps",
                    "best loss",
                    "grad. equiv. to targets",
                    "/ defaults'",
                    "time / defaults'",
                ],
                rows,
            ),
            "",
            "Geometric mean over the problems, each variant to the lowest loss both it and the "
            "defaults reached (pairwise common loss):",
            "",
            md_table(
                [
                    "variant",
                    "grad. equiv. / defaults' (gmean)",
                    "per problem",
                    "time / defaults' (gmean)",
                    "per problem",
                ],
                summary,
            ),
            "",
        ]
        print("\n".join(lines[-len(summary) - 4 :]), flush=True)
        if args.out:
            Path(f"{args.out}.{key}.json").write_text(json.dumps(dump))
    load1 = open("/proc/loadavg").read().split()[:3]
    head = [
        "# Full-batch defaults: λ schedule and forcing term on deterministic objectives",
        "",
        f"`python experiments/_fbdefaults_study.py --tasks {args.tasks} --seeds {args.seeds} "
        f"--variants {args.variants} --swap-budget {args.swap_budget:g} "
        f"--budget {args.budget:g}` in {time.perf_counter() - t_start:.0f} s; load average "
        f"{' '.join(load0)} at the start, {' '.join(load1)} at the end; torch 1 thread. "
        "Targets per problem: the largest best loss of all variants, and the two points "
        "geometrically ⅓ and ⅔ of the way to it from the initial loss. Method: docstring.",
        "",
    ]
    text = "\n".join(head + lines)
    print(text)
    if args.out:
        save_text(Path(args.out), text)


if __name__ == "__main__":
    main()
