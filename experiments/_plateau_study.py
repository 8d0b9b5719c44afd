"""Throwaway study (#14): a plateau latch for HF's CG stop on stochastic objectives.

Rule: while the objective is seen stochastic, once the mean batch loss at step start over the
last W steps is not below (1 - drop) x the mean over the W before, CG runs with eta = 0 and no
objective check (the setting that solved addition) from then on.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import scorecard as sc  # noqa: E402

from hessfree import HessianFree  # noqa: E402


class PlateauHF(HessianFree):
    window, drop = 20, 0.02
    made: list = []

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self._hist: list[float] = []
        self.latched_at: int | None = None
        self._stochastic = False
        PlateauHF.made.append(self)

    def _on(self, run) -> bool:
        self._stochastic = run.state.get("deterministic") is False
        return self.latched_at is not None and self._stochastic

    def _cg_rtol(self, run):
        if self._on(run):
            run.report["cg_rtol"] = 0.0
            return 0.0
        return super()._cg_rtol(run)

    def _stop_on_increase(self, run):
        return False if self._on(run) else super()._stop_on_increase(run)

    def step(self, closure, curvature_closure=None):
        out = super().step(closure, curvature_closure)
        f = self.last_step.loss
        if math.isfinite(f) and self._stochastic:
            self._hist.append(f)
        w, h = self.window, self._hist
        if self.latched_at is None and len(h) >= 2 * w:
            a, b = statistics.fmean(h[-w:]), statistics.fmean(h[-2 * w : -w])
            if a > (1 - self.drop) * b:
                self.latched_at = len(h)
        return out


def run(task, regimes, budget, slices):
    runs = []
    for name, (cls, regime) in regimes.items():
        sc.HessianFree = cls
        r = sc.hf_run(task, name, "HF", regime)
        runs.append(r)
    sc.HessianFree = HessianFree
    ad = sc.first_order_run(task, "Adam", *task.adam[-1])
    runs.append(ad)
    t0 = time.time()
    sc.interleave(runs, task, budget, slices, "cpu")
    load = open("/proc/loadavg").read().split()[:3]
    print(f"== {task.key} {budget}s wall {time.time() - t0:.0f}s load {load}")
    for o in PlateauHF.made:
        print("  plateau latched at stochastic step", o.latched_at, "of", len(o._hist))
    PlateauHF.made.clear()
    for r in runs:
        print(f"  {r.name:40s} err {sc.final_error(r):.4g} steps {r.steps} {r.statuses}")
    return runs


def _with_and_without(regimes: dict) -> dict:
    """Each regime as it is and with the plateau latch, in that order."""
    out = {}
    for name, regime in regimes.items():
        out[name] = (HessianFree, regime)
        out[f"{name}+plateau"] = (PlateauHF, regime)
    return out


def main():
    torch.set_num_threads(1)
    which = sys.argv[1:] or ["curves", "mnist1d", "addition30"]
    for key in which:
        if key == "curves":
            t = sc.make_curves_task(True)
            base = dict(batch=250, curvature_batch=62, kw={})
            tuned = dict(batch=250, curvature_batch=62, kw=dict(cg_max_iter=10))
            run(t, _with_and_without({"default": base, "cg10": tuned}), 15.0, 6)
        elif key == "mnist1d":
            t = sc._classifier("mnist1d", True)
            g = dict(
                batch=250,
                growth=1.1,
                curvature_batch=0.25,
                full_curvature_after=4,
                kw=dict(cg_max_iter=10),
            )
            g0 = dict(batch=250, growth=1.1, curvature_batch=0.25, full_curvature_after=4, kw={})
            run(t, _with_and_without({"growing": g, "growing nokw": g0}), 8.0, 8)
        elif key.startswith("addition"):
            T = int(key[8:])
            t = sc.make_addition_task(T, 60.0)
            d = dict(batch=1000, curvature_batch=100, kw={})
            regs = {"default": (HessianFree, d), "default+plateau": (PlateauHF, d)}
            runs = run(t, regs, 60.0, 12)
            for r in runs[:2]:
                print(r.name, [(round(c, 1), e) for c, e in r.curve])


if __name__ == "__main__":
    main()
