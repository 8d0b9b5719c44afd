"""CURVES at small batch: can HF steps on 50-100 cases keep up with Adam at batch 20? (#14)

Two modes on the scorecard's full CURVES task (5,000 images), 1 torch thread:

``profile N``: per-step wall time of each regime's steps and of Adam b 20 steps, the contenders
alternated step-block by step-block in one process (so load falls on all alike), after a
warm-up; prints medians, the ratio HF step / Adam step and ``StepInfo.time_phases`` medians.

``race BUDGET SLICES [names]``: the regimes and Adam lr 1e-3 b 20 from the same initial weights,
interleaved in slices exactly as ``scorecard.interleave``; prints each one's error per slice
and the ratio to Adam at the end.

    python experiments/_curves_small.py profile 30
    python experiments/_curves_small.py race 90 8 "k2r2;ns50"
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _bench_common import RawLog  # noqa: E402

K = dict(rank=32, refresh=2)


def regimes(task: sc.Task) -> dict[str, dict]:
    r = {
        # the full run's tuned row (θ 0.7, then cg≤10)
        "ns70": task.hf[
            "250→, cg≤2, K-FAC rank 32 refresh 2, smoothed norm test θ=0.7, then cg≤10"
        ],
    }
    for b, c in ((50, 25), (100, 25), (100, 50)):
        r[f"ns70@{b}/{c}"] = dict(r["ns70"], batch=b, curvature_batch=c)
    r["ns90@100/25"] = dict(
        r["ns70"],
        batch=100,
        curvature_batch=25,
        norm_test=dict(theta=0.9, smooth=0.8, max_growth=2.0),
    )
    # a small start whose steps are kept small by a λ floor until the batch is whole
    for b, floors in ((50, (0.1, 1.0, 10.0)), (100, (3.0,)), (250, (1.0, 3.0))):
        base = r["ns70"] if b == 250 else r[f"ns70@{b}/25"]
        for floor in floors:
            r[f"ns70@{b}/{base['curvature_batch']} λ≥{floor:g}"] = dict(
                base, early_kw=dict(cg_max_iter=2, min_damping=floor)
            )
    # the late (whole-set) phase cheaper: cg≤5 on 1/20 of the set
    r["ns70 late cg≤5 1/20"] = dict(
        r["ns70"], kw=dict(cg_max_iter=5, min_damping=1e-2), full_curvature_batch=0.05
    )
    for cg, floor in ((2, 1.0), (2, 0.3), (2, 0.1), (3, 1.0)):
        name = f"k{cg}r2 λ≥{floor:g}"
        r[name] = dict(
            batch=250, curvature_batch=62, kw=dict(cg_max_iter=cg, min_damping=floor), kfac=K
        )
    r["k2r2@50/25"] = dict(batch=50, curvature_batch=25, kw=dict(cg_max_iter=2), kfac=K)
    r["k2r2@100/25"] = dict(batch=100, curvature_batch=25, kw=dict(cg_max_iter=2), kfac=K)
    r["cg2@50/25"] = dict(batch=50, curvature_batch=25, kw=dict(cg_max_iter=2))
    r["k1r4@50/25"] = dict(
        batch=50, curvature_batch=25, kw=dict(cg_max_iter=1), kfac=dict(rank=32, refresh=4)
    )
    return r


def profile(n_steps: int, names: list[str], log) -> None:
    task = sc.make_curves_task(quick=False)
    regs = regimes(task)
    runs = [sc.first_order_run(task, "Adam", 1e-3, 20)]
    runs += [sc.hf_run(task, n, "HF", regs[n]) for n in names]
    opts = {}
    for r in runs[1:]:
        for c in r.step.__closure__:
            if type(c.cell_contents).__name__ == "HessianFree":
                opts[r.name] = c.cell_contents
    times: dict[str, list[float]] = {r.name: [] for r in runs}
    phases: dict[str, list[dict]] = {r.name: [] for r in runs}
    for r in runs:  # warm-up
        for _ in range(5 if r.family == "HF" else 50):
            r.step()
    for _ in range(n_steps):
        for r in runs:
            reps = 1 if r.family == "HF" else 20
            t0 = time.perf_counter()
            for _ in range(reps):
                r.step()
            times[r.name].append((time.perf_counter() - t0) / reps)
            if r.name in opts:
                phases[r.name].append(dict(opts[r.name].last_step.time_phases))
    adam = statistics.median(times[runs[0].name])
    log(f"Adam b20 step: 1.00 (reference); {n_steps} blocks of 20 steps")
    for r in runs[1:]:
        med = statistics.median(times[r.name])
        ph = phases[r.name]
        keys = sorted({k for p in ph for k in p})
        split = ", ".join(
            f"{k} {statistics.median(p.get(k, 0.0) for p in ph) / adam:.1f}" for k in keys
        )
        log(f"{r.name}: HF step = {med / adam:.1f} Adam steps  (phases, in Adam steps: {split})")


def overhead(name: str, n_steps: int, log) -> None:
    """cProfile ``n_steps`` steps of one regime: the share of the step spent in Python frames
    (tottime of functions defined in .py files) against C calls (torch ops, GEMMs)."""
    import cProfile
    import pstats

    task = sc.make_curves_task(quick=False)
    run = sc.hf_run(task, name, "HF", regimes(task)[name])
    for _ in range(5):
        run.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n_steps):
        run.step()
    prof.disable()
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())
    py = sum(v[2] for k, v in st.stats.items() if k[0].endswith(".py"))
    log(f"{name}: Python frames' own time {py / total:.0%} of {n_steps} profiled steps")
    top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:15]
    for k, v in top:
        log(f"  {v[2] / total:6.1%}  calls {v[1]:6d}  {Path(k[0]).name}:{k[1]} {k[2]}")


def race(budget: float, slices: int, names: list[str], log) -> None:
    task = sc.make_curves_task(quick=False)
    regs = regimes(task)
    runs = [sc.first_order_run(task, "Adam", 1e-3, 20)]
    runs += [sc.hf_run(task, n, "HF", regs[n]) for n in names]
    sizes = {r.name: [] for r in runs[1:]}
    for r in runs[1:]:  # record the batch size (the norm test's) and the clock per step
        batches = next(
            c.cell_contents
            for c in r.step.__closure__
            if type(c.cell_contents).__name__ == "_Batches"
        )

        def step(r=r, inner=r.step, batches=batches) -> None:
            inner()
            sizes[r.name].append((r.clock, min(int(batches.size), len(task.x))))

        r.step = step
    sc.interleave(runs, task, budget, slices, "cpu")
    adam = sc.final_error(runs[0])
    for r in runs:
        errs = " ".join(f"{e:6.2f}" for _, e in r.curve[1:])
        log(
            f"{r.name:14s} {errs}  steps {r.steps}  ratio {sc.final_error(r) / adam:.3f}"
            f"  {r.statuses if r.statuses else ''}"
        )
    for name, sz in sizes.items():
        per = []
        for k in range(slices):
            lo, hi = budget * k / slices, budget * (k + 1) / slices
            in_slice = [s for t, s in sz if lo <= t < hi]
            per.append(f"{len(in_slice)}@{max(in_slice) if in_slice else 0}")
        log(f"{name:14s} steps@batch per slice: {' '.join(per)}")


def main() -> None:
    torch.set_num_threads(1)
    log = RawLog()
    log(f"`{' '.join(sys.argv[1:])}`; load before {os.getloadavg()}")
    mode = sys.argv[1]
    if mode == "overhead":
        overhead(sys.argv[2], int(sys.argv[3]), log)
    elif mode == "profile":
        names = sys.argv[3].split(";") if len(sys.argv) > 3 else ["ns70", "k2r2@50/25", "cg2@50/25"]
        profile(int(sys.argv[2]), names, log)
    else:
        race(float(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(";"), log)
    log(f"load after {os.getloadavg()}")
    if "--save" in sys.argv:
        log.append_to(
            Path(__file__).resolve().parent / "results" / "2026-12-01-curves-small-batch.md",
            "CURVES at small batch (raw runs)",
        )


if __name__ == "__main__":
    main()
