"""Where the relative λ floor takes its scale: candidates on addition, steps to solve.

Issue #14, section "floor" of ``experiments/README.md``. ``relative_min_damping='auto'`` floors
λ at 0.01 × the curvature scale s = gᵀCg / gᵀDg, measured once: at the first step with
``damping='auto'`` (the initial weights), at the first stochastic step with a number given as
``damping`` (the weights after one step; the config's case). Candidates (subclasses of the
optimizer, so nothing in the library changes):

- ``D``: ``HessianFree(params)``;
- ``A``: the scale re-measured once, at the first step where the floor is in effect (the
  first stochastic step), for ``damping='auto'`` as for a number;
- ``B``: the scale re-measured at every stochastic step, the floor on its running minimum;
- ``BL``: the same, the floor on the latest measurement (it may rise again);
- ``C``: the floor released (λ to the unfloored λ, floor off) after ``k = 3`` consecutive
  steps on it with ρ > ¾, re-armed by a step with ρ < ¼.

A measurement costs one curvature product and one batched Jacobian pass of the hidden states
(about 1/30 of an addition step at the cap of 25 CG iterations); it is not on any clock here:
steps are deterministic (parameter SHA-1 after 5 steps, as in ``_addition50.py``), so each
contender runs alone, off the clock, for at most ``cap`` steps, and the result is the number of
steps to reach test error ≤ 0.01 (``–`` and the error at the cap if not).

Usage::

    python experiments/_floor_scale.py 50 70 0,1,2 D,A,B      # length, step cap, seeds, names
    python experiments/_floor_scale.py curves 100 D,C,F       # quick CURVES, steps, names

(``F``: ``relative_min_damping=0``, on CURVES only.)
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _addition50 import SOLVED, _opt, task_for  # noqa: E402
from _addition_ablation import Recorded  # noqa: E402

from hessfree import HessianFree  # noqa: E402
from hessfree.optimizer import _structural_weight  # noqa: E402


class Rescaled(Recorded):
    """The curvature scale re-measured at stochastic steps (``once``: only the first), the
    floor on ``combine(previous, new)``; λ itself is only raised to the new floor."""

    once = True

    @staticmethod
    def combine(previous: float, new: float) -> float:
        return new

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scales: list[float] = []

    def _observe_objective(self, state: dict, f0: float) -> None:
        HessianFree._observe_objective(state, f0)
        if state.get("deterministic") is False and "damping_scale" in state:
            if not (self.once and state.get("rescaled")):
                state["scale_prev"] = state.pop("damping_scale")  # measure again this step
                state["rescaled"] = True

    def _calibrate_damping(self, curvature, product, g, g_norm, run) -> None:
        st = run.state
        prev = st.pop("scale_prev", None)
        shadow, lam = st.get("damping_unfloored"), run.damping
        super()._calibrate_damping(curvature, product, g, g_norm, run)
        self.scales.append(st["damping_scale"])
        if prev is None:
            return
        st["damping_scale"] = self.combine(prev, st["damping_scale"])
        lam = max(lam, self._damping_policy(st).min_damping)
        run.damping = st["damping"] = lam
        if shadow is not None:
            st["damping_unfloored"] = shadow
        if run.structural_damping > 0:
            product.weight = _structural_weight(lam, run.structural_damping, product.hidden)


class RunningMin(Rescaled):
    once = False

    @staticmethod
    def combine(previous: float, new: float) -> float:
        return min(previous, new)


class Latest(Rescaled):
    once = False


class RhoRelease(Recorded):
    """The floor released after ``k`` consecutive good steps on it, re-armed by a bad one."""

    k = 3

    def _relative_fraction(self, state: dict) -> float:
        return 0.0 if state.get("floor_off") else super()._relative_fraction(state)

    def step(self, *args, **kwargs):
        out = super().step(*args, **kwargs)
        info, st = self.last_step, self._global_state()
        rho = info.rho if info.rho is not None else math.nan
        on_floor = info.damping <= info.damping_floor * (1 + 1e-9) and info.damping_floor > 0
        if st.get("floor_off"):
            if not rho >= 0.25:  # NaN too
                st["floor_off"], st["good"] = False, 0
        else:
            st["good"] = st.get("good", 0) + 1 if on_floor and rho > 0.75 else 0
            if st["good"] >= self.k:
                st["floor_off"] = True  # the next step's _track_unfloored releases λ
        return out


CLASSES = {"D": Recorded, "A": Rescaled, "B": RunningMin, "BL": Latest, "C": RhoRelease}


def one(length: int, cap: int, seed: int, name: str) -> str:
    task = task_for(length, 1e9, seed)
    sc.HessianFree = CLASSES[name]
    r = sc.hf_run(task, name, "HF", task.hf_default_regime)
    sc.HessianFree = HessianFree
    opt = _opt(r)
    sha5, solved, err = "-", None, task.error(r.model)
    t0 = time.perf_counter()
    while len(opt.log) < cap and solved is None:
        r.step()
        err = task.error(r.model)
        if len(opt.log) == 5:
            flat = torch.cat([p.detach().reshape(-1) for p in r.model.parameters()])
            sha5 = hashlib.sha1(flat.numpy().tobytes()).hexdigest()[:10]
        if err <= SOLVED:
            solved = len(opt.log)
    log = opt.log
    lam = [s.damping for s in log]
    floors = [s.damping_floor for s in log]
    on = sum(s.damping <= s.damping_floor * (1 + 1e-9) and s.damping_floor > 0 for s in log)
    pick = lambda xs: " ".join(f"{xs[i]:.2g}" for i in (0, 1, 2, 5, 10, 20, 40, 60) if i < len(xs))  # noqa: E731
    scales = getattr(opt, "scales", [])
    sc_txt = " ".join(f"{x:.2g}" for x in scales[:3])
    if len(scales) > 3:
        sc_txt += f" … min {min(scales):.2g} last {scales[-1]:.2g}"
    return (
        f"| {length} | {seed} | {name} | {solved if solved else '–'} | {err:.3f} | "
        f"{len(log)} | {pick(lam)} | {pick(floors)} | {on}/{len(log)} | {sc_txt} | {sha5} | "
        f"{(time.perf_counter() - t0) / max(len(log), 1):.2f} |"
    )


def curves(n: int, names: list[str]) -> None:
    """The quick CURVES task (1,000 images) at the defaults' 250/62 batches with no other
    argument: each contender ``n`` steps from the same weights on the same batches, off the
    clock; training error every ``n // 5`` steps, λ, steps on the floor, CG products."""
    task = sc.make_curves_task(quick=True)
    regime = dict(batch=250, curvature_batch=62, kw={})
    print(
        f"| contender | train error every {n // 5} steps | λ at steps 0,10,20,40,80 | steps on the "
        "floor | floor releases | CG products | s/step |",
        flush=True,
    )
    print("|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        sc.HessianFree = CLASSES.get(name, Recorded)
        kw = {"relative_min_damping": 0.0} if name == "F" else {}
        r = sc.hf_run(task, name, "HF", dict(regime, kw=kw))
        sc.HessianFree = HessianFree
        opt, errs, t0 = _opt(r), [], time.perf_counter()
        while len(opt.log) < n:
            r.step()
            if len(opt.log) % (n // 5) == 0:
                errs.append(task.error(r.model))
        log = opt.log
        lam = [s.damping for s in log]
        on = sum(s.damping <= s.damping_floor * (1 + 1e-9) and s.damping_floor > 0 for s in log)
        releases = sum(
            a.damping_floor > 1e-6 >= b.damping_floor for a, b in zip(log, log[1:], strict=False)
        )
        print(
            f"| {name} | {' '.join(f'{e:.2f}' for e in errs)} | "
            f"{' '.join(f'{lam[i]:.2g}' for i in (0, 10, 20, 40, 80) if i < len(lam))} | "
            f"{on}/{len(log)} | {releases} | {sum(s.cg_matvecs for s in log)} | "
            f"{(time.perf_counter() - t0) / len(log):.3f} |",
            flush=True,
        )


def main() -> None:
    torch.set_num_threads(1)
    if sys.argv[1] == "curves":
        print(f"load {open('/proc/loadavg').read().split()[:3]}", flush=True)
        curves(int(sys.argv[2]), sys.argv[3].split(","))
        print(f"load {open('/proc/loadavg').read().split()[:3]}", flush=True)
        return
    length, cap = int(sys.argv[1]), int(sys.argv[2])
    seeds = [int(s) for s in sys.argv[3].split(",")]
    names = sys.argv[4].split(",")
    print(f"load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    print(
        "| T | seed | contender | steps to solve | error at end | steps | "
        "λ at steps 0,1,2,5,10,20,40,60 | floor at the same steps | steps on the floor | "
        "scales measured | SHA-1 after 5 steps | s/step |",
        flush=True,
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for seed in seeds:
        for name in names:
            print(one(length, cap, seed, name), flush=True)
    print(f"load {open('/proc/loadavg').read().split()[:3]}", flush=True)


if __name__ == "__main__":
    main()
