"""Exact-Hessian HF from saddle-like starts: per-step diagnosis (negcurv, 2026-12-02).

Runs ``HessianFree(params)`` in the user's LBFGS loop (closure: zero_grad, backward, return
loss: exact Hessian) for a fixed number of steps on ``_unseenfb``'s problems and prints per
step: f, λ, CG iterations and stop, backtracked iterate, predicted change, ρ, rate, Δ; then the
cost (closure calls + CG products, load-free) to targets on f − f*.

Variants (``--variant``): ``new`` the current code; ``old`` main's before negcurv: no Δ from
the line search (only from backtracking) and CG's negative-curvature stop ignoring Δ
(``hessfree.cg._negative_curvature_step`` patched back); ``oldcg`` only CG's old stop;
``oldls`` Δ as on main. (Δ0 = ‖g‖/λ0, measured as ``r01``, was removed: it bounds convex
problems' steps too; negdelta brought it back with a lift, ``_negdelta.py``: ``new`` now has it.)

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=.:experiments python3 experiments/_negcurv.py deeplin \
        --steps 40 [--variant new,old] [--seed N] [--quiet]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _unseenfb  # noqa: E402

import hessfree  # noqa: E402

torch.set_num_threads(1)
_cgmod = sys.modules["hessfree.cg"]
_NEW_NC = _cgmod._negative_curvature_step

TARGETS = {"deeplin": [0.1, 1e-2, 1e-4, 1e-6, 1e-8], "pinn": [10, 1, 0.1, 0.03, 0.01]}


def _old_nc(x, r, z, p, rz, pAp, radius_sq, history, i, *, masked):
    """main before negcurv: Δ ignored at a negative-curvature stop."""
    return _NEW_NC(x, r, z, p, rz, pAp, None, history, i, masked=masked)


@contextlib.contextmanager
def patched_cg(old: bool) -> Iterator[None]:
    _cgmod._negative_curvature_step = _old_nc if old else _NEW_NC
    try:
        yield
    finally:
        _cgmod._negative_curvature_step = _NEW_NC


class OldRadius(hessfree.HessianFree):
    """main before negcurv: Δ from backtracking only, not from the line search (nor negdelta's
    Δ₀, lift and failed-search radius)."""

    _radius_initial = False
    _radius_lift = False
    _radius_after_failure = False

    def _update_radius(self, state, result, chosen, p, rho, rate, smallest=1.0):  # type: ignore[no-untyped-def]
        super()._update_radius(state, result, chosen, p, rho, 1.0, smallest)


def make_optimizer(
    variant: str, params: list, **kwargs: object
) -> tuple[torch.optim.Optimizer, bool]:
    """The optimizer of a variant and whether CG's old negative-curvature step is patched in."""
    cls = {"old": OldRadius, "oldls": OldRadius}.get(variant, hessfree.HessianFree)
    return cls(params, **kwargs), variant in ("old", "oldcg")


def run(key: str, seed: int, steps: int, variant: str, quiet: bool) -> list:
    prob = _unseenfb.PROBLEMS[key](seed)
    model = copy.deepcopy(prob.model)
    opt, old_cg = make_optimizer(variant, list(model.parameters()))

    def closure():
        opt.zero_grad()
        loss = prob.loss_of(model)
        loss.backward()
        return loss

    infos, calls = [], 0
    off = prob.f_star or 0.0
    for k in range(steps):
        with patched_cg(old_cg):
            opt.step(closure)
        i = opt.last_step
        infos.append(i)
        calls += i.closure_calls
        if not quiet:
            radius = opt._global_state().get("trust_radius")
            print(
                f"{k:3d} f-f* {i.loss - off:10.3e} -> {i.loss_after - off:10.3e} "
                f"λ {i.damping:8.2e} cg {i.cg_iters:3d} {i.cg_reason[:8]:8s} "
                f"bt {i.backtrack_iter:3d} pred {i.predicted_change:10.3e} ρ {i.rho:8.3g} "
                f"rate {i.step_rate:5.3g} Δ {radius if radius is None else f'{radius:.3g}'} "
                f"{i.status} calls {i.closure_calls}"
            )
    with torch.enable_grad():
        final = prob.loss_of(model).item() - off
    cost, reach = 0, {}
    for i in infos:
        cost += i.closure_calls + i.cg_matvecs
        for t in TARGETS[key]:
            if t not in reach and i.loss_after - off <= t:
                reach[t] = cost
    mv = sum(i.cg_matvecs for i in infos)
    print(
        f"{key} seed {seed} [{variant}] {steps} steps: f-f* {final:.4g}, closure calls {calls}, "
        f"products {mv}; cost to " + ", ".join(f"{t:g}: {reach.get(t, '-')}" for t in TARGETS[key]),
        flush=True,
    )
    return infos


def timed(key: str, seed: int, budget: float) -> None:
    """HF new and old and both L-BFGS from the same weights, interleaved at equal stepping
    time (``_unseen.interleave``); f − f* at ¼ / ½ / 1× the budget as ratios to the better
    L-BFGS's at the same time."""
    prob = _unseenfb.PROBLEMS[key](seed)
    runs = []
    for name in ("HF", "HF old"):
        model = copy.deepcopy(prob.model)
        opt, old_cg = make_optimizer("old" if name.endswith("old") else "new",
                                     list(model.parameters()))  # fmt: skip

        def closure(opt=opt, model=model):
            opt.zero_grad()
            loss = prob.loss_of(model)
            loss.backward()
            return loss

        def step(opt=opt, closure=closure, old_cg=old_cg):
            with patched_cg(old_cg):
                return opt.step(closure)

        def evaluate(model=model) -> float:
            with torch.enable_grad():
                return prob.loss_of(model).item()

        runs.append(_unseenfb.Run(name, step, evaluate, opt))
    runs += [_unseenfb.make_run(n, prob) for n in ("LBFGS", "LBFGS sw")]
    _unseenfb.interleave(runs, budget, eval_every=budget / 60)
    off = prob.f_star or 0.0
    lb = runs[2:]
    print(f"#### {key} seed {seed}, {budget:g} s each")
    for r in runs:
        vals = [_unseenfb.value_at(r.curve, f * budget) - off for f in (0.25, 0.5, 1.0)]
        refs = [min(_unseenfb.value_at(b.curve, f * budget) - off for b in lb)
                for f in (0.25, 0.5, 1.0)]  # fmt: skip
        print(f"| {r.name} | {r.steps} | " + " / ".join(f"{v:.3g}" for v in vals) + " | "
              + " / ".join(f"{v / max(q, 1e-300):.3g}" for v, q in zip(vals, refs, strict=True))
              + f" | {_unseenfb.hf_notes(r)} |", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="+")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", default="0")
    ap.add_argument("--variant", default="new,old")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--timed", type=float, default=0.0, help="interleaved, seconds each")
    args = ap.parse_args()
    print("load at start:", open("/proc/loadavg").read().strip())
    if args.timed:
        for key in args.problems:
            for seed in (int(s) for s in args.seed.split(",")):
                timed(key, seed, args.timed)
        print("load at end:", open("/proc/loadavg").read().strip())
        return
    for key in args.problems:
        for seed in (int(s) for s in args.seed.split(",")):
            for v in args.variant.split(","):
                run(key, seed, args.steps, v, args.quiet)
    print("load at end:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()
