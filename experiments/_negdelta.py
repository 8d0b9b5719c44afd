"""negdelta (2026-12-02): trust-radius rules for the exact Hessian, on indefinite and convex
problems, as costs (closure calls + CG products, load-free) to targets on f − f*.

The user's LBFGS loop (closure: zero_grad, backward, return loss: exact Hessian,
``trust_radius='auto'`` on) for a fixed number of steps on ``_unseenfb``'s deep linear net,
PINN, least squares and logistic regression, and on the tests' 4-4-4-2 linear net at its
saddle (weights × 0.3). Variants set ``HessianFree``'s trust-radius class attributes:
``main`` (main's rules: Δ₀ = ∞, ×2 on the sphere with ρ > ¾, a failed search keeps Δ),
``d0`` (+ Δ₀ = ‖g‖/s: negcurv's dropped rule), ``+lift`` (Δ = ∞ after a full step with
|ρ − 1| ≤ 0.1 that ended inside the ball), ``+x4`` (×4 on the sphere with |ρ − 1| ≤ 0.1),
``+fail`` (Δ ← smallest tried rate · ‖p‖ after a failed line search; ``+failq``: ¼‖p‖).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=.:experiments python3 experiments/_negdelta.py \
        deeplin pinn lsq logreg saddle --seeds 0,1,2,3 --steps 40 --variants main,new
    ... _negdelta.py swap --seeds 0,1,2,3,4 --variants main,new [--budget 6000]
    ... _negdelta.py swapcard --steps 580 --variants main,new
    ... _negdelta.py deeplin pinn --seeds 0,1 --timed 5   (rows "HF" = new, "HF old" = main)
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _unseenfb  # noqa: E402

import hessfree  # noqa: E402

torch.set_num_threads(1)

TARGETS = {
    "deeplin": [1e-2, 1e-4, 1e-6, 1e-8],
    "pinn": [1, 0.1, 0.03, 0.01],
    "saddle": [1e-2, 1e-4, 1e-8],
    "lsq": [1e-2, 1e-4, 1e-6],
    "logreg": [1e-2, 1e-4, 1e-5],
}

# (Δ₀, lift inside the ball: False / True (before negative curvature) / "always", Δ after a
# failed search: False / True (smallest tried rate · ‖p‖) / "quarter" (¼‖p‖)); "new" is the
# library's default
VARIANTS = {
    "main": (False, False, False),
    "d0": (True, False, False),
    "d0fail": (True, False, True),
    "fail": (False, False, True),
    "failq": (False, False, "quarter"),
    "new": (True, True, True),
    "liftall": (True, "always", True),
}


def make_class(name: str) -> type:
    if name == "defaults":
        return hessfree.HessianFree
    initial, lift, failure = VARIANTS[name]

    class Variant(hessfree.HessianFree):
        _radius_initial = initial
        _radius_lift = bool(lift)
        _radius_after_failure = bool(failure)

        def _update_radius(self, state, result, chosen, p, rho, rate, smallest=1.0):  # type: ignore[no-untyped-def]
            if failure == "quarter" and rate == 0.0:
                smallest = 0.25
            if lift == "always":  # lift after negative curvature too, not from the sphere
                state["radius_negative_seen"] = result.reason is hessfree.CGStop.NEGATIVE_CURVATURE
            super()._update_radius(state, result, chosen, p, rho, rate, smallest)

    Variant.__name__ = f"HF[{name}]"
    return Variant


def p_saddle(seed: int) -> _unseenfb.Problem:
    """The tests' ``_saddle_problem`` at weights × 0.3 (seed 0 is the tests' net)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = x @ torch.randn(4, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model.append(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)
    model = model.double()

    def loss_of(m: nn.Module) -> torch.Tensor:
        return nn.functional.mse_loss(m(x), y)

    return _unseenfb.Problem("4-4-4-2 linear net at its saddle, f64", model, loss_of, None, 0.0)


PROBLEMS = {**_unseenfb.PROBLEMS, "saddle": p_saddle}
_CACHE: dict = {}


def run(key: str, seed: int, steps: int, variant: str, verbose: bool) -> dict:
    if (key, seed) not in _CACHE:
        _CACHE[key, seed] = PROBLEMS[key](seed)
    prob = _CACHE[key, seed]
    model = copy.deepcopy(prob.model)
    opt = make_class(variant)(list(model.parameters()))

    def closure():
        opt.zero_grad()
        loss = prob.loss_of(model)
        loss.backward()
        return loss

    off = prob.f_star or 0.0
    cost, reach, fails, nc, calls, t0 = 0, {}, 0, 0, 0, time.thread_time()
    for k in range(steps):
        opt.step(closure)
        i = opt.last_step
        cost += i.closure_calls + i.cg_matvecs
        calls += i.closure_calls
        fails += i.status == "line_search_failed"
        nc += i.cg_reason == "negative_curvature"
        after = i.loss_after if i.loss_after is not None else i.loss
        for t in TARGETS[key]:
            if t not in reach and after - off <= t:
                reach[t] = cost
        if verbose:
            radius = opt._global_state().get("trust_radius")
            print(
                f"  {k:3d} f-f* {i.loss - off:10.3e} -> {after - off:10.3e} λ {i.damping:8.2e} "
                f"cg {i.cg_iters:3d} {i.cg_reason[:8]:8s} ρ {i.rho:8.3g} rate {i.step_rate:5.3g}"
                f" Δ {radius if radius is None else f'{radius:.3g}'} {i.status} "
                f"calls {i.closure_calls}"
            )
    with torch.enable_grad():
        final = prob.loss_of(model).item() - off
    return dict(
        final=final, cost=cost, reach=reach, fails=fails, nc=nc, calls=calls,
        cpu=time.thread_time() - t0,
    )  # fmt: skip


def gmean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def swap(names: list[str], seeds: list[int], budget: float) -> None:
    """The scorecard's swap task (unchanged LBFGS loop, exact Hessian) by
    ``_fbdefaults_study``'s round-robin harness, as ``_negcurv_swap.py``: gradient equivalents
    (load-free) and interleaved stepping time to the lowest loss both reached, / the first
    variant's."""
    import _fbdefaults_study as fb

    fb.make_variant = make_class
    ge: dict[str, list] = {n: [] for n in names}
    tm: dict[str, list] = {n: [] for n in names}
    for s in seeds:
        res = fb.run_task(fb._swap_task(s), names, budget, True)
        d = res[names[0]]["curve"]
        for n, r in res.items():
            pair = max(fb._best(r["curve"]), fb._best(d))
            (pg, pt), (dg, dt) = fb._first(r["curve"], pair), fb._first(d, pair)
            ge[n].append(pg / dg)
            tm[n].append(pt / dt)
            fails = sum(i.status == "line_search_failed" for i in r["infos"])
            print(
                f"swap s{s} {n:8s} steps {len(r['curve']):4d} best {fb._best(r['curve']):.3g} "
                f"GE to common {pg:g} ({pg / dg:.2f}x) time {pt / dt:.2f}x fails {fails}",
                flush=True,
            )
    for n in names:
        print(
            f"swap {n:8s} GE / {names[0]} gmean {gmean(ge[n]):.3f} "
            f"({' '.join(f'{x:.2f}' for x in ge[n])}); time gmean {gmean(tm[n]):.3f}"
        )


def swapcard(names: list[str], steps: int) -> None:
    """The scorecard's own swap model and data (``_freeze_hashes.py``'s run: 580 steps of the
    LBFGS closure), variants interleaved step by step: the first step where they differ, the
    error and work (closure calls + products) at the end, and the work to the best error both
    reached."""
    import _fbdefaults_study as fb
    import scorecard

    task = scorecard.make_swap_task(quick=False)
    runs = []
    for n in names:
        m = copy.deepcopy(task.model)
        opt = make_class(n)(m.parameters())
        runs.append(dict(name=n, m=m, opt=opt, c=fb._closure(task, m, opt, True), curve=[]))
    spent = {n: 0 for n in names}
    calls = {n: 0 for n in names}
    fails = {n: 0 for n in names}
    first_diff = None
    for k in range(steps):
        for r in runs:
            r["opt"].step(r["c"])
            i = r["opt"].last_step
            spent[r["name"]] += i.closure_calls + i.cg_matvecs
            calls[r["name"]] += i.closure_calls
            fails[r["name"]] += i.status == "line_search_failed"
            r["curve"].append((spent[r["name"]], task.error(r["m"])))
        if first_diff is None and len({r["curve"][-1][1] for r in runs}) > 1:
            first_diff = k
    common = max(min(f for _, f in r["curve"]) for r in runs)
    print(
        f"swapcard {steps} steps, first differing step {first_diff}; best both reached {common:.4g}"
    )
    for r in runs:
        n = r["name"]
        to = next(g for g, f in r["curve"] if f <= common)
        best = min(f for _, f in r["curve"])
        print(
            f"swapcard {n:8s} final {r['curve'][-1][1]:.4g} best {best:.4g}"
            f" work {spent[n]} closure calls {calls[n]} failed searches {fails[n]} "
            f"work to {common:.4g}: {to}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="+")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--variants", default="main,new")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--budget", type=float, default=6000, help="swap: gradient equivalents")
    ap.add_argument("--timed", type=float, default=0.0, help="interleaved vs L-BFGS, s each")
    args = ap.parse_args()
    names = args.variants.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    print("load at start:", open("/proc/loadavg").read().strip(), flush=True)
    if args.timed:  # _negcurv.timed's interleaved race, its "HF old" row = main here
        import _negcurv

        def make_optimizer(variant: str, params: list, **kwargs: object) -> tuple:
            return make_class("main" if variant == "old" else "new")(params, **kwargs), False

        _negcurv.make_optimizer = make_optimizer
        for key in args.problems:
            for seed in seeds:
                _negcurv.timed(key, seed, args.timed)
        print("load at end:", open("/proc/loadavg").read().strip())
        return
    if args.problems == ["swapcard"]:
        swapcard(names, args.steps)
        print("load at end:", open("/proc/loadavg").read().strip())
        return
    if args.problems == ["swap"]:
        swap(names, seeds, args.budget)
        print("load at end:", open("/proc/loadavg").read().strip())
        return
    for key in args.problems:
        res = {n: [] for n in names}
        for seed in seeds:
            for n in names:  # interleaved: variant after variant on each seed
                r = run(key, seed, args.steps, n, args.verbose)
                res[n].append(r)
                print(
                    f"{key} s{seed} {n:11s} f-f* {r['final']:.3g} calls {r['calls']} cost "
                    f"{r['cost']} fails {r['fails']} nc {r['nc']} cpu {r['cpu']:.1f} to "
                    + " ".join(f"{t:g}:{r['reach'].get(t, '-')}" for t in TARGETS[key]),
                    flush=True,
                )
        print(f"#### {key}, {args.steps} steps, seeds {args.seeds}: cost to target, / main")
        print("| variant | " + " | ".join(f"{t:g}" for t in TARGETS[key]) + " | final f-f* |")
        for n in names:
            cells = []
            for t in TARGETS[key]:
                costs = " ".join(str(r["reach"].get(t, "-")) for r in res[n])
                both = [
                    r["reach"][t] / b["reach"][t]
                    for r, b in zip(res[n], res[names[0]], strict=True)
                    if t in r["reach"] and t in b["reach"]
                ]
                cells.append(f"{costs} ({gmean(both):.2f}, {len(both)})")
            finals = " ".join(f"{r['final']:.2g}" for r in res[n])
            print(f"| {n} | " + " | ".join(cells) + f" | {finals} |", flush=True)
    print("load at end:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()
