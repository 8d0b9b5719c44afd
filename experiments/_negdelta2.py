"""negdelta2 (2026-12-02): lifts of the trust radius that tell a λ-limited good step from a
model-limited one, so that Δ₀ = ‖g‖/s can come on (exact Hessian, ``trust_radius='auto'``).

Same harness as ``_negdelta.py`` (costs = closure calls + CG products to targets on f − f*,
load-free; final f − f* after ``--steps``), variants by subclassing ``HessianFree``:

- ``cur``: main before this branch (Δ₀ off, lift off, failed-search radius on).
- ``new``: negdelta's rules, the library's default since negdelta2 (Δ₀ = ‖g‖/s, lift to ∞
  inside the ball with ρ ≈ 1 before any negative curvature, failed-search radius).
- ``ray``: ``new`` + a full step on the sphere with |ρ − 1| ≤ 0.1 sets
  Δ ← max(2Δ, c·‖p‖), c = −gᵀp / pᵀBp the minimiser of the damped model along the ray
  through p (B = C + λI; c > 1 when the sphere cut CG short along that ray; ∞ if pᵀBp ≤ 0,
  then 2Δ). No product: pᵀBp = 2(φ(p) − gᵀp) from CG's φ.
- ``mu``: ``new`` + the same step lifts Δ to ∞ when the sphere's multiplier
  μ = (gᵀp − 2φ)/‖p‖² (the extra damping that makes p ray-optimal) is ≥ λ: the radius, not
  λ, limited a step the model predicted well.
- ``kN``: ``new`` + Δ = ∞ after N consecutive full steps with |ρ − 1| ≤ 0.1 whose CG met no
  negative curvature (any stop).
- ``mb<batch>`` (as the problem): mini-batches of that size, plain closure (``minibatch``).
- ``--jitter 0.98,0.99,1,1.01,1.02``: each variant also with λ₀ (and so Δ₀) × each factor,
  as replicates besides the seeds: how far an 80-step final value moves under a perturbation
  that changes nothing in the rules (the noise floor of "final f − f* after 80 steps").

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=.:experiments python3 experiments/_negdelta2.py \
        pinn deeplin saddle lsq logreg --seeds 0,1,2,3 --steps 80 --variants cur,new,ray
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _negdelta  # noqa: E402

import hessfree  # noqa: E402

CGStop = hessfree.CGStop
LIFT_RHO = 0.1
_BASE = _negdelta.make_class


def make_class(name: str) -> type:
    if "@" in name:  # the noise floor: λ₀ (and so Δ₀ = ‖g‖/λ₀) × factor, nothing else
        name, factor = name.split("@")
        base = make_class(name)

        class Perturbed(base):
            def _calibrate_damping(self, curvature, product, g, g_norm, run):  # type: ignore[no-untyped-def]
                super()._calibrate_damping(curvature, product, g, g_norm, run)
                run.damping = run.state["damping"] = float(factor) * run.damping
                run.state["damping_scale"] *= float(factor)

        return Perturbed
    if name == "cur":  # main before negdelta2 (156257d): Δ₀ and the lift off
        return _BASE("fail")
    base = _BASE("new")
    if name == "new":
        return base
    ray = name.startswith("ray")
    mu = name == "mu"
    k = int(name.split("k")[-1]) if "k" in name else 0

    class Variant(base):
        def _predicted_change(self, solution, chosen, run):  # type: ignore[no-untyped-def]
            self._lam = run.damping
            return super()._predicted_change(solution, chosen, run)

        def _line_search(self, objective, f0, slope, f_full, resolution):  # type: ignore[no-untyped-def]
            self._slope = slope
            return super()._line_search(objective, f0, slope, f_full, resolution)

        def _update_radius(self, state, result, chosen, p, rho, rate, smallest=1.0):  # type: ignore[no-untyped-def]
            radius = state.get("trust_radius", math.inf)
            super()._update_radius(state, result, chosen, p, rho, rate, smallest)
            good = rate >= 1.0 and abs(rho - 1.0) <= LIFT_RHO
            if k:
                clean = good and result.reason is not CGStop.NEGATIVE_CURVATURE
                state["clean_streak"] = state.get("clean_streak", 0) + 1 if clean else 0
                if state["clean_streak"] >= k:
                    state["trust_radius"] = math.inf
            if not (good and result.reason is CGStop.TRUST_RADIUS):
                return
            phi = float(result.iterate_phi[chosen])
            pp = float(p.square().sum())
            pBp = 2.0 * (phi - self._slope)
            if ray and pBp > 0.0:
                c = -self._slope / pBp
                state["trust_radius"] = max(state["trust_radius"], c * math.sqrt(pp))
            if mu:
                mult = (self._slope - 2.0 * phi) / pp
                if mult >= self._lam:
                    state["trust_radius"] = math.inf
            self._last_lift = (radius, state["trust_radius"])

    Variant.__name__ = f"HF[{name}]"
    return Variant


def run(key: str, seed: int, steps: int, variant: str, verbose: bool) -> dict:
    """``_negdelta.run`` plus the curve of (cost, f − f*) after each step."""
    curve: list[tuple[int, float]] = []
    original = _negdelta.make_class

    class Recording:
        def __init__(self, cls: type) -> None:
            self.cls = cls

        def __call__(self, params):  # type: ignore[no-untyped-def]
            opt = self.cls(params)
            step = opt.step
            prob = _negdelta._CACHE[key, seed]
            off = prob.f_star or 0.0

            def recorded(closure):  # type: ignore[no-untyped-def]
                out = step(closure)
                i = opt.last_step
                after = i.loss_after if i.loss_after is not None else i.loss
                spent = (curve[-1][0] if curve else 0) + i.closure_calls + i.cg_matvecs
                curve.append((spent, after - off))
                return out

            opt.step = recorded
            return opt

    if (key, seed) not in _negdelta._CACHE:
        _negdelta._CACHE[key, seed] = _negdelta.PROBLEMS[key](seed)
    _negdelta.make_class = lambda name: Recording(make_class(name))
    try:
        r = _negdelta.run(key, seed, steps, variant, verbose)
    finally:
        _negdelta.make_class = original
    r["curve"] = curve
    return r


def at_cost(curve: list[tuple[int, float]], budget: float) -> float:
    """f − f* after the last step whose cumulative cost is within ``budget``."""
    f = math.inf
    for spent, value in curve:
        if spent > budget:
            break
        f = min(f, value)
    return f


def minibatch(names: list[str], seeds: list[int], steps: int, batch: int) -> None:
    """The user's LBFGS loop on mini-batches (exact Hessian, ``trust_radius='auto'`` on; the
    objective is seen stochastic): multinomial logistic regression (``_unseenfb``'s data,
    convex) and the deep linear net (indefinite), one batch per step drawn from a seeded
    generator (the same sequence for every variant); full-batch f − f* after ``steps``."""
    import torch

    for key in ("logreg", "deeplin"):
        finals: dict[str, list[float]] = {n: [] for n in names}
        for seed in seeds:
            prob = _negdelta.PROBLEMS[key](seed)
            cells = prob.loss_of.__closure__ or ()
            data = [c.cell_contents for c in cells if isinstance(c.cell_contents, torch.Tensor)]
            x, y = data[0], data[1]
            if x.shape[0] != y.shape[0]:
                x, y = y, x
            for n in names:
                model = copy.deepcopy(prob.model)
                opt = make_class(n)(list(model.parameters()))
                gen = torch.Generator().manual_seed(1000 + seed)
                fails = 0
                for _ in range(steps):
                    idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
                    xb, yb = x[idx], y[idx]

                    def closure(xb=xb, yb=yb, model=model, opt=opt, key=key):  # type: ignore[no-untyped-def]
                        opt.zero_grad()
                        if key == "logreg":
                            loss = torch.nn.functional.cross_entropy(model(xb), yb)
                            loss = loss + 0.5e-3 * (model.weight**2).sum()
                        else:
                            loss = torch.nn.functional.mse_loss(model(xb), yb)
                        loss.backward()
                        return loss

                    opt.step(closure)
                    fails += opt.last_step.status == "line_search_failed"
                with torch.enable_grad():
                    final = prob.loss_of(model).item() - (prob.f_star or 0.0)
                finals[n].append(final)
                radius = opt._global_state().get("trust_radius")
                print(
                    f"mb {key} s{seed} {n:5s} f-f* {final:.4g} failed searches {fails} "
                    f"Δ at the end {radius}",
                    flush=True,
                )
        for n in names:
            ratio = _negdelta.gmean(
                [a / b for a, b in zip(finals[n], finals[names[0]], strict=True)]
            )
            print(f"mb {key} {n}: f-f* / {names[0]} gmean {ratio:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="+")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--variants", default="cur,new,ray")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--jitter", default="1", help="λ₀ factors, replicates besides the seeds")
    args = ap.parse_args()
    names = args.variants.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    factors = args.jitter.split(",")
    reps = [(s, f) for s in seeds for f in factors]
    gmean = _negdelta.gmean
    print("load at start:", open("/proc/loadavg").read().strip(), flush=True)
    if args.problems[0].startswith("mb"):  # mb<batch>
        minibatch(names, seeds, args.steps, int(args.problems[0][2:]))
        print("load at end:", open("/proc/loadavg").read().strip())
        return
    for key in args.problems:
        targets = _negdelta.TARGETS[key]
        res: dict[str, list[dict]] = {n: [] for n in names}
        for seed, factor in reps:
            for n in names:  # interleaved: variant after variant on each seed
                v = n if factor == "1" else f"{n}@{factor}"
                r = run(key, seed, args.steps, v, args.verbose)
                res[n].append(r)
                print(
                    f"{key} s{seed} {v:12s} f-f* {r['final']:.3g} calls {r['calls']} cost "
                    f"{r['cost']} fails {r['fails']} nc {r['nc']} to "
                    + " ".join(f"{t:g}:{r['reach'].get(t, '-')}" for t in targets),
                    flush=True,
                )
        print(
            f"#### {key}, {args.steps} steps, seeds {args.seeds} × λ₀ factors {args.jitter}: "
            "cost to target "
            f"(/ {names[0]}, gmean over seeds both reached, count); final f - f* after the steps; "
            "f - f* at the smallest total cost of the variants on that seed"
        )
        print("| variant | " + " | ".join(f"{t:g}" for t in targets) + " | final | at equal cost |")
        print("|---" * (len(targets) + 3) + "|")
        budgets = [min(res[n][j]["cost"] for n in names) for j in range(len(reps))]
        for n in names:
            cells = []
            for t in targets:
                costs = " ".join(str(r["reach"].get(t, "-")) for r in res[n])
                both = [
                    r["reach"][t] / b["reach"][t]
                    for r, b in zip(res[n], res[names[0]], strict=True)
                    if t in r["reach"] and t in b["reach"]
                ]
                cells.append(f"{costs} ({gmean(both):.2f}, {len(both)})")
            finals = [r["final"] for r in res[n]]
            ratios = [
                max(a, 1e-300) / max(b["final"], 1e-300)
                for a, b in zip(finals, res[names[0]], strict=True)
            ]
            ratio = gmean(ratios)
            worse = sum(x > 1.1 for x in ratios)
            eq = [at_cost(r["curve"], c) for r, c in zip(res[n], budgets, strict=True)]
            eq0 = [at_cost(r["curve"], c) for r, c in zip(res[names[0]], budgets, strict=True)]
            eq_ratio = gmean(
                [max(a, 1e-300) / max(b, 1e-300) for a, b in zip(eq, eq0, strict=True)]
            )
            print(
                f"| {n} | " + " | ".join(cells)
                + f" | {' '.join(f'{x:.2g}' for x in finals)}"
                + f" ({ratio:.2f}; gmean {gmean(finals):.2g};"
                + f" > 1.1x on {worse}/{len(finals)})"
                + f" | {' '.join(f'{x:.2g}' for x in eq)} ({eq_ratio:.2f}) |",
                flush=True,
            )  # fmt: skip
    print("load at end:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()
