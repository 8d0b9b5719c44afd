"""snrrho: the signal-share λ rule under ``replay_rng`` against the default, at equal CPU time.

replaysnr's ``snr-rho`` (λ rises only when ρ < s/2, s = g₂ᵀg₁/‖g₁‖² from the gradients under
the model's and the trials' draws at θ₀) was in the library behind
``HessianFree._signal_share_rule = 'share'``, computing g₂ from the existing f(θ₀; m₂) call
with one backward. It failed the gate (``drop`` 1.10× early) and was taken out again after the
merge: this script runs on the library of commit 0bafc74 (``git worktree add /tmp/snr 27bc90a``
and ``PYTHONPATH=/tmp/snr``), not on main. A variant, ρ against the model with the trials' gradient,
ρ₂ = Δf / (g₂ᵀp + ½pᵀCp) with λ held when that model predicts no decrease, ran on seeds 1-8 and
was removed (4.7-17× the default's loss on ``drop``: ρ₂ = 1 on any quadratic, so λ only falls).
Here they race the default (replay + hold within ν) on
``_unseenmb.py``'s rows whose closures draw from torch's RNG (``drop``, ``ln``; the other rows
draw nothing, so the rule never runs there), at equal CPU time (``time.thread_time``, one torch
thread, contenders interleaved in one process: the one with the least CPU time steps next;
each contender keeps its own copy of the global stream, so its dropout masks are its own).

The budget per row is 300 steps of the default (calibrated on seed 0's first steps), so the
windows (0, ¼], (¼, ½], (½, 1] of the budget are replaysnr's (0, 75], (75, 150], (150, 300]
step windows at the default's pace. The train-set loss (eval mode, off the clock) every 1/60 of
the budget; reported: the median of the evaluations in each window, as geometric-mean ratios
over seeds to the default, with how many seeds are lower, and the control ``alt`` (the default
with other dropout masks: global stream seeded +1000), whose ratio is the noise band.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_snrrho.py --seeds 1 2 3 ...
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from typing import Any

import _unseen
import _unseenmb
import torch

import hessfree

torch.set_num_threads(1)

#: contender: (``_signal_share_rule``, offset of the global stream's seed)
CONTENDERS: dict[str, tuple[str | None, int]] = {
    "default": (None, 0),
    "alt": (None, 1000),  # control: the default with other dropout masks
    "share": ("share", 0),  # replaysnr's snr-rho
    "share/4": ("share", 0),  # s measured on every 4th step only, reused in between
}
WINDOWS = ((0.0, 0.25), (0.25, 0.5), (0.5, 1.0))
EVALS = 60


class Contender:
    def __init__(self, problem: dict, name: str, seed: int) -> None:
        rule, offset = CONTENDERS[name]
        self.name, self.problem = name, problem
        torch.manual_seed(0)
        self.model = problem["make"]()
        self.opt = hessfree.HessianFree(self.model.parameters())
        if rule is not None:
            self.opt._signal_share_rule = rule
        self.backwards = 0
        inner = self.opt._trial_gradient

        def counted(*args: Any) -> Any:  # the rule's extra backward, one per call
            self.backwards += 1
            return inner(*args)

        self.opt._trial_gradient = counted
        if name == "share/4":
            self._every(4, counted)
        self.gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed + offset)
        self.rng = torch.get_rng_state()
        self.clock, self.steps, self.calls = 0.0, 0, 0
        self.curve: list[tuple[float, float]] = []
        self.lams: list[float] = []
        self.shares: list[float] = []
        self.evaluate()

    def _every(self, k: int, measured: Any) -> None:
        """The share rule with s measured (one backward) on every ``k``-th step only; the
        steps between make the plain f(θ₀; m₂) call and reuse the last s."""
        opt, last = self.opt, [math.nan]

        def sometimes(closure: Any, run: Any, g: torch.Tensor) -> torch.Tensor:
            if run.state["step"] % k == 0:
                loss = measured(closure, run, g)
                last[0] = run.signal_share
                return loss
            counter = run.counter
            loss = opt._call(closure, counter, build_graph=False, uses_backward=run.uses_backward)
            run.signal_share = last[0]
            return loss.loss

        opt._trial_gradient = sometimes

    def evaluate(self) -> None:
        x, y = self.problem["data"][:2]
        f = _unseen.train_set_loss(self.model, self.problem["loss"], x, y)
        self.curve.append((self.clock, f))

    def step(self) -> None:
        x, y = self.problem["data"][:2]
        loss_fn, batch, model = self.problem["loss"], self.problem["batch"], self.model
        idx = torch.randint(len(y), (batch,), generator=self.gen)
        xb, yb = x[idx], y[idx]

        def closure() -> Any:
            o = model(xb)
            return loss_fn(o, yb), o

        torch.set_rng_state(self.rng)
        t0 = time.thread_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt.step(closure)
        self.clock += time.thread_time() - t0
        self.rng = torch.get_rng_state()
        self.steps += 1
        info = self.opt.last_step
        self.calls += info.closure_calls
        self.lams.append(info.damping)


def calibrate(problem: dict, n: int = 60, skip: int = 20) -> float:
    """CPU seconds per step of the default over steps skip+1..n of seed 0."""
    c = Contender(problem, "default", 0)
    t = 0.0
    for k in range(n):
        before = c.clock
        c.step()
        if k >= skip:
            t += c.clock - before
    return t / (n - skip)


def race(problem: dict, names: list[str], seed: int, budget: float) -> dict[str, dict]:
    runs = [Contender(problem, v, seed) for v in names]
    every = budget / EVALS
    next_eval = {r.name: every for r in runs}
    while True:
        live = [r for r in runs if r.clock < budget]
        if not live:
            break
        r = min(live, key=lambda r: r.clock)
        r.step()
        if r.clock >= next_eval[r.name] or r.clock >= budget:
            next_eval[r.name] = r.clock + every
            r.evaluate()
    out = {}
    for r in runs:
        meds = [
            statistics.median(f for t, f in r.curve[1:] if a * budget < t <= b * budget)
            for a, b in WINDOWS
        ]
        model = r.model
        model.eval()
        with torch.no_grad():
            acc = problem["score"](model, *problem["data"][2:])
        model.train()
        out[r.name] = dict(meds=meds, steps=r.steps, calls=r.calls, backwards=r.backwards,
                           lam=r.lams[-1], acc=acc, final=r.curve[-1][1])  # fmt: skip
    return out


def _gm(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def table(key: str, names: list[str], res: list[dict[str, dict]], budget: float) -> None:
    print(f"\n#### {key}: {len(res)} seeds, budget {budget:.2f} CPU s; window medians, "
          "geometric-mean ratio to `default` (seeds lower)\n")  # fmt: skip
    heads = [f"({a:g}, {b:g}] of the budget" for a, b in WINDOWS]
    print("| contender | " + " | ".join(heads) + " | steps / default's | closure calls per step "
          "| extra backwards per step | test acc (mean) | final λ (median) |")  # fmt: skip
    print("|---" * (6 + len(heads)) + "|")
    for v in names:
        cells = []
        for j in range(len(WINDOWS)):
            rat = [s[v]["meds"][j] / s["default"]["meds"][j] for s in res]
            cells.append(f"{_gm(rat):.3f} ({sum(r < 1 for r in rat)}/{len(rat)})")
        steps = _gm([s[v]["steps"] / s["default"]["steps"] for s in res])
        calls = sum(s[v]["calls"] for s in res) / sum(s[v]["steps"] for s in res)
        back = sum(s[v]["backwards"] for s in res) / sum(s[v]["steps"] for s in res)
        acc = statistics.fmean(s[v]["acc"] for s in res)
        lam = statistics.median(s[v]["lam"] for s in res)
        print(f"| {v} | " + " | ".join(cells) + f" | {steps:.3f} | {calls:.2f} | {back:.2f} | "
              f"{acc:.4f} | {lam:.3g} |")  # fmt: skip
    print(
        f"\nraw geometric means over seeds, window medians; default steps "
        f"{statistics.median(s['default']['steps'] for s in res):.0f} (median)\n"
    )
    for v in names:
        print(f"- {v}: " + ", ".join(f"{_gm([s[v]['meds'][j] for s in res]):.4g}"
                                      for j in range(len(WINDOWS))))  # fmt: skip
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", nargs="*", default=["drop", "ln"])
    ap.add_argument("--seeds", type=int, nargs="*", default=list(range(1, 17)))
    ap.add_argument("--contenders", nargs="*", default=list(CONTENDERS), choices=list(CONTENDERS))
    ap.add_argument("--steps", type=int, default=300, help="the budget in default steps")
    ap.add_argument("--table-every", type=int, default=4)
    ap.add_argument("--budgets", nargs="*", default=[], help="KEY=SECONDS instead of calibrating")
    ap.add_argument("--raw", default="", help="append each seed's results here (JSON lines)")
    a = ap.parse_args()
    print("load at start:", open("/proc/loadavg").read().strip())
    problems = {k: _unseenmb.PROBLEMS[k]() for k in a.problems}
    budgets = {k: float(v) for k, v in (b.split("=") for b in a.budgets)}
    for k, p in problems.items():
        if k in budgets:
            print(f"{k}: budget {budgets[k]:.2f} s (given)")
            continue
        per_step = calibrate(p)
        budgets[k] = a.steps * per_step
        print(f"{k}: {per_step * 1e3:.1f} ms CPU per default step (seed 0, steps 21-60); "
              f"budget {budgets[k]:.2f} s")  # fmt: skip
    res: dict[str, list] = {k: [] for k in problems}
    for i, seed in enumerate(a.seeds, 1):
        for k, p in problems.items():
            res[k].append(race(p, a.contenders, seed, budgets[k]))
            if a.raw:
                with open(a.raw, "a") as fh:
                    fh.write(json.dumps(dict(problem=k, seed=seed, **res[k][-1])) + "\n")
        load = open("/proc/loadavg").read().split()[:3]
        print(f"seed {seed} done; {time.strftime('%H:%M:%S', time.gmtime())} UTC; "
              f"load {' '.join(load)}", flush=True)  # fmt: skip
        if i % a.table_every == 0 or i == len(a.seeds):
            for k in problems:
                table(k, a.contenders, res[k], budgets[k])
    print("\nload at end:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()
