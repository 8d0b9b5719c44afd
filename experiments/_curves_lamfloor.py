"""CURVES with a λ floor relative to the curvature scale (``relative_min_damping``; #14).

``race BUDGET SLICES NAMES [--quick] [--save]``: HF regimes and Adam from the same initial
weights, interleaved in slices exactly as ``scorecard.interleave`` (1 torch thread); prints
each run's error per slice, the ratio to Adam at the end, and per slice the median λ and
λ-floor of the HF runs. Full task (5,000 images): Adam lr 1e-3 b 20, the scorecard's final;
``--quick`` (1,000 images): Adam lr 1e-3 b 100, the quick scorecard's.

``scale N``: the curvature scale |gᵀCg|/gᵀg that ``relative_min_damping`` multiplies, at the
first step on N different 62-case curvature batches (the floor's spread over batches), off
the clock.

    OPENBLAS_NUM_THREADS=1 python experiments/_curves_lamfloor.py race 90 8 "ns70;k2r2 c0.01"
    OPENBLAS_NUM_THREADS=1 python experiments/_curves_lamfloor.py race 15 8 "k5;k5 c0.01" --quick
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _bench_common import RawLog  # noqa: E402

K2 = dict(rank=32, refresh=2)
FRACTIONS = (0.003, 0.005, 0.01, 0.02, 0.03)


def regimes(task: sc.Task) -> dict[str, dict]:
    r: dict[str, dict] = {}
    if len(task.x) > 1000:
        r["ns70"] = task.hf[
            "250→, cg≤2, K-FAC rank 32 refresh 2, smoothed norm test θ=0.7, then cg≤10"
        ]
        # the norm test's growth with the relative floor below the whole set (wip-runoff)
        ns = r["ns70"]
        r["ns70 c0.01"] = dict(ns, early_kw=dict(ns["early_kw"], relative_min_damping=0.01))
    for floor in (0.3, 1.0):  # the absolute floors of "CURVES at small batch"
        r[f"k2r2 λ≥{floor:g}"] = dict(
            batch=250, curvature_batch=62, kw=dict(cg_max_iter=2, min_damping=floor), kfac=K2
        )
    r["k2r2"] = dict(batch=250, curvature_batch=62, kw=dict(cg_max_iter=2), kfac=K2)
    r["k5"] = dict(batch=250, curvature_batch=62, kw=dict(cg_max_iter=5), kfac=dict(rank=32))
    r["default"] = dict(batch=250, curvature_batch=62, kw={})  # the "HF default" final
    for c in FRACTIONS:
        for base in ("k2r2", "k5", "default"):
            kw = dict(r[base]["kw"], relative_min_damping=c)
            r[f"{base} c{c:g}"] = dict(r[base], kw=kw)
    return r


def _optimizer(run: sc.Run):
    return next(
        c.cell_contents
        for c in run.step.__closure__
        if type(c.cell_contents).__name__ == "HessianFree"
    )


def race(budget: float, slices: int, names: list[str], quick: bool, log) -> None:
    task = sc.make_curves_task(quick=quick)
    regs = regimes(task)
    adam = (1e-3, 100) if quick else (1e-3, 20)
    runs = [sc.first_order_run(task, "Adam", *adam)]
    runs += [sc.hf_run(task, n, "HF", regs[n]) for n in names]
    lams: dict[str, list[tuple[float, float, float]]] = {r.name: [] for r in runs[1:]}
    for r in runs[1:]:  # record λ and its floor with the run's clock
        opt = _optimizer(r)

        def step(r=r, inner=r.step, opt=opt) -> None:
            inner()
            info = opt.last_step
            lams[r.name].append((r.clock, info.damping, info.damping_floor))

        r.step = step
    sc.interleave(runs, task, budget, slices, "cpu")
    ref = sc.final_error(runs[0])
    log(f"Adam lr {adam[0]:g} b {adam[1]}: reference")
    for r in runs:
        errs = " ".join(f"{e:6.2f}" for _, e in r.curve[1:])
        log(f"{r.name:16s} {errs}  steps {r.steps}  ratio {sc.final_error(r) / ref:.3f}")
    for name, seq in lams.items():
        per = []
        for k in range(slices):
            lo, hi = budget * k / slices, budget * (k + 1) / slices
            lam = [x for t, x, _ in seq if lo <= t < hi]
            per.append(f"{statistics.median(lam):.2g}" if lam else "-")
        floor = seq[-1][2] if seq else float("nan")
        log(f"{name:16s} median λ per slice: {' '.join(per)}  (floor {floor:.3g})")


def scale(n: int, log) -> None:
    """The first step's quotient on n different curvature batches (λ0 of damping='auto')."""
    for quick in (False, True):
        task = sc.make_curves_task(quick=quick)
        gen = torch.Generator().manual_seed(0)
        values = []
        for _ in range(n):
            m = copy.deepcopy(task.model)
            opt = sc.HessianFree(m.parameters(), cg_max_iter=2)
            idx = torch.randperm(len(task.x), generator=gen)[:250]
            xb, yb = task.x[idx], task.y[idx]

            def forward(xb=xb, yb=yb, m=m, loss=task.loss):
                out = m(xb)
                return loss(out, yb), out

            opt.step(forward, lambda xb=xb, yb=yb, m=m: forward(xb[:62], yb[:62], m))
            values.append(opt.state[next(iter(m.parameters()))]["damping_scale"])
        log(
            f"{'quick' if quick else 'full'}: first-step |gᵀCg|/gᵀg over {n} batches: "
            f"median {statistics.median(values):.3g}, min {min(values):.3g}, "
            f"max {max(values):.3g}"
        )


def main() -> None:
    torch.set_num_threads(1)
    log = RawLog()
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    log(f"`{' '.join(sys.argv[1:])}`; load before {open('/proc/loadavg').read().strip()}")
    if args[0] == "scale":
        scale(int(args[1]), log)
    else:
        race(float(args[1]), int(args[2]), args[3].split(";"), "--quick" in sys.argv, log)
    log(f"load after {open('/proc/loadavg').read().strip()}")
    if "--save" in sys.argv:
        log.append_to(
            Path(__file__).resolve().parent / "results" / "2026-12-01-lamfloor.md",
            "lamfloor (raw runs)",
        )


if __name__ == "__main__":
    main()
