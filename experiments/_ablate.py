"""Ablation of the tuned HF rows against ``HessianFree(params)`` on MNIST-1D and CURVES (#14).

One ingredient of the tuned row at a time replaced by the default ("T−x"), and one tuned
ingredient at a time added to the defaults ("D+x"), all in the tuned row's batch schedule,
interleaved in one process exactly as ``scorecard.interleave`` (same initial weights, same
batches). MNIST-1D: time to the scorecard's targets (Adam lr 1e-2 b 100's losses at ¼, ½ and
all of the budget in the last quiet full run); CURVES: training squared error at equal time.

    OPENBLAS_NUM_THREADS=1 python experiments/_ablate.py mnist1d [budget] [reps] [names]
    OPENBLAS_NUM_THREADS=1 python experiments/_ablate.py curves [budget] [reps] [names]
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402

#: Adam lr 1e-2 b 100's losses at ¼, ½ and all of 30 s in run3 (the scorecard's time targets)
MNIST_TARGETS = (3.319e-4, 7.39e-5, 4.496e-6)


def _optimizer(run: sc.Run):
    return next(
        c.cell_contents
        for c in run.step.__closure__
        if type(c.cell_contents).__name__ == "HessianFree"
    )


def mnist_regimes() -> dict[str, dict]:
    n = 4000
    late = dict(batch=n // 16, growth=1.1, curvature_batch=0.25, full_curvature_after=4, kw={})
    held = late | dict(max_batch=n // 2, hold=20)
    kfac = dict(rank=16, decay=0.6)
    early = dict(cg_max_iter=2, min_damping=0.01)
    tuned = held | dict(kw=dict(cg_max_iter=10), kfac=kfac, early_kw=early)
    return {
        "T (tuned)": tuned,
        "T−K-FAC": {k: v for k, v in tuned.items() if k != "kfac"},
        "T−K-FAC decay (0.95)": tuned | dict(kfac=dict(rank=16)),
        "T−early cap (250)": tuned | dict(early_kw=dict(cg_max_iter="auto", min_damping=0.01)),
        "T−early floor (1e-8)": tuned | dict(early_kw=dict(cg_max_iter=2)),
        "T−late cap (250)": tuned | dict(kw={}),
        "T−hold": {k: v for k, v in tuned.items() if k not in ("max_batch", "hold")},
        "D (defaults)": held,
        "D+K-FAC": held | dict(kfac=kfac),
        "D+early cap 2": held | dict(early_kw=dict(cg_max_iter=2)),
        "D+early cap 2 & floor": held | dict(early_kw=early),
        "D+late cap 10": held | dict(kw=dict(cg_max_iter=10), early_kw=dict(cg_max_iter="auto")),
        # a cap on the stochastic (early) steps only, the candidate default rule
        "D+early cap 5": held | dict(early_kw=dict(cg_max_iter=5)),
        "D+early cap 10": held | dict(early_kw=dict(cg_max_iter=10)),
        # the early floor scale-free: c·λ₀ (λ₀ ≈ 0.47 here, so c = 0.02 ≈ the absolute 0.01)
        "T−early floor, c=0.02": tuned
        | dict(early_kw=dict(cg_max_iter=2, relative_min_damping=0.02)),
        # what a rule could do with K-FAC at its defaults: cg≤2 on the stochastic steps only
        # (and the relative floor at c = 0.02 or the 'auto' 0.01), nothing else tuned
        "R: K-FAC defaults, cg≤2 & c=0.02 stochastic": held
        | dict(kfac={}, early_kw=dict(cg_max_iter=2, relative_min_damping=0.02)),
        "R: K-FAC defaults, cg≤2 stochastic": held | dict(kfac={}, early_kw=dict(cg_max_iter=2)),
    }


def curves_regimes() -> dict[str, dict]:
    base = dict(batch=250, curvature_batch=62, kw={})
    kfac = dict(rank=32, refresh=2)
    return {
        "T (tuned)": base | dict(kw=dict(cg_max_iter=2), kfac=kfac),
        "T−K-FAC (cg≤2)": base | dict(kw=dict(cg_max_iter=2)),
        "T−cap (K-FAC, cg 250)": base | dict(kfac=kfac),
        "D (defaults)": base,
        "D+cap 5": base | dict(kw=dict(cg_max_iter=5)),
        "D+cap 10": base | dict(kw=dict(cg_max_iter=10)),
        # K-FAC at its defaults (rank 64, refresh 1, decay 0.95) with cg≤2: the rule-like row
        "R: K-FAC defaults, cg≤2": base | dict(kw=dict(cg_max_iter=2), kfac={}),
    }


def instrument(run: sc.Run) -> dict:
    """Count CG iterations and steps of ``run`` (off nothing: the counts are cheap)."""
    opt, inner, acc = _optimizer(run), run.step, dict(cg=0, steps=0, lam=[])

    def step() -> None:
        inner()
        info = opt.last_step
        acc["cg"] += info.cg_iters
        acc["steps"] += 1
        acc["lam"].append(info.damping)

    run.step = step
    return acc


def race(runs: list[sc.Run], task: sc.Task, budget: float, every: int, stop: float | None):
    """Step-level interleaving: in each round every unfinished run takes one step, in a shuffled
    order (``scorecard.interleave`` with one-step slices, so load falls on all alike); the
    error is evaluated every ``every`` steps off the clock; a run finishes when its own clock
    passes ``budget`` or (``stop``) its error reaches ``stop``."""
    rng = random.Random(0)
    for r in runs:
        r.curve.append((0.0, task.error(r.model)))
    live = list(runs)
    while live:
        rng.shuffle(live)
        for r in list(live):
            sc.advance(r, r.clock + 1e-9, "cpu")  # exactly one step, timed as the scorecard
            if r.steps % every == 0 or r.failed:
                e = task.error(r.model)
                r.curve.append((r.clock, e if math.isfinite(e) else math.inf))
                if r.failed or (stop is not None and e <= stop):
                    live.remove(r)
                    continue
            if r.clock >= budget:
                live.remove(r)


def main() -> None:
    key = sys.argv[1]
    budget = float(sys.argv[2]) if len(sys.argv) > 2 else (40.0 if key == "mnist1d" else 60.0)
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    pick = sys.argv[4].split(",") if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    print("load at start", open("/proc/loadavg").read().strip(), flush=True)
    if key == "mnist1d":
        task, regimes = sc._classifier("mnist1d", quick=False), mnist_regimes()
        every, stop, points = 1, MNIST_TARGETS[-1], None
    else:
        task, regimes = sc.make_curves_task(quick=False), curves_regimes()
        every, stop, points = 5, None, (budget / 4, budget / 2, 3 * budget / 4, budget)
    if pick:
        regimes = {k: v for k, v in regimes.items() if any(k.startswith(p) for p in pick)}
    table: dict[str, list] = {name: [] for name in regimes}
    for rep in range(reps):
        t0 = time.perf_counter()
        runs = [sc.hf_run(task, name, "HF", reg) for name, reg in regimes.items()]
        accs = [instrument(r) for r in runs]
        race(runs, task, budget, every, stop)
        load = open("/proc/loadavg").read().strip()
        print(f"rep {rep} {time.perf_counter() - t0:.0f} s, load {load}", flush=True)
        for r, acc in zip(runs, accs, strict=True):
            steps = max(acc["steps"], 1)
            lam = statistics.median(acc["lam"]) if acc["lam"] else math.nan
            if key == "mnist1d":
                vals = [sc.time_to(r.curve, t) for t in MNIST_TARGETS]
                what = " ".join(f"{t:6.2f}" for t in vals)
            else:
                vals = [sc.value_at(r.curve, t) if r.clock >= t else math.nan for t in points]
                what = " ".join(f"{e:6.2f}" for e in vals)
            table[r.name].append(vals)
            print(
                f"  {r.name:28s} {what}  steps {acc['steps']:4d}  cg/step {acc['cg'] / steps:5.1f}"
                f"  s/step {r.clock / steps:.4f}  λ med {lam:.2e}  {r.failed}",
                flush=True,
            )
    ref = "T (tuned)"
    print("\nmedians over reps; ratio to T (MNIST-1D: times to the targets, worst = max; CURVES:")
    print("errors at ¼, ½, ¾ and all of the budget, last = at the budget)")
    refm = [statistics.median(col) for col in zip(*table[ref], strict=True)]
    for name, rows in table.items():
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        pairs = zip(med, refm, strict=True)
        ratio = [m / r if r > 0 and math.isfinite(r) else math.nan for m, r in pairs]
        worst = max(ratio) if key == "mnist1d" else ratio[-1]
        print(
            f"  {name:28s} "
            + " ".join(f"{m:7.3g}" for m in med)
            + "  ratio "
            + " ".join(f"{x:5.2f}" for x in ratio)
            + f"  -> {worst:.2f}",
            flush=True,
        )
    print("load at end", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()
