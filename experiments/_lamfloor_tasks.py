"""``relative_min_damping='auto'`` on the scorecard's other stochastic tasks (#14).

A default floor touches every mini-batch run: MNIST-1D's growing batches (the tuned schedule
with no arguments, the "HF default, tuned schedule" final; and the K-FAC-like phase whose
absolute λ ≥ 0.01 a relative floor could replace) and RNN addition (1000/100 mini-batches).
Each pair runs interleaved from the same weights, exactly as ``scorecard.interleave``, 1 torch
thread; prints the error curves and the errors at ¼, ½ and the whole budget.

    OPENBLAS_NUM_THREADS=1 python experiments/_lamfloor_tasks.py mnist1d [--quick] [--save]
    OPENBLAS_NUM_THREADS=1 python experiments/_lamfloor_tasks.py addition30 [--save]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _bench_common import RawLog  # noqa: E402


def pairs(key: str, quick: bool) -> tuple[sc.Task, dict[str, dict]]:
    if key == "mnist1d":
        task = sc._classifier("mnist1d", quick)
        n = len(task.x)
        grow = f"{n // 16}×1.1/step, curvature ¼ to 4 full steps, cg≤10"
        kfac = next(k for k in task.hf if "held at" in k)
        schedule = {k: v for k, v in task.hf[grow].items() if k != "kw"}
        r = {
            "default, growing schedule": dict(schedule, kw={}),
            "default + floor auto": dict(schedule, kw=dict(relative_min_damping="auto")),
            "K-FAC phase λ≥0.01 (tuned)": task.hf[kfac],
        }
        for c in (0.01, 0.001):
            early = dict(cg_max_iter=2, relative_min_damping=c)
            r[f"K-FAC phase λ≥{c:g}·scale"] = dict(task.hf[kfac], early_kw=early)
        return task, r
    length = int(key.removeprefix("addition"))
    task = sc.make_addition_task(length, 60.0)
    default = task.hf_default_regime
    return task, {
        "default": default,
        "default + floor auto": dict(default, kw=dict(relative_min_damping="auto")),
    }


def main() -> None:
    torch.set_num_threads(1)
    log = RawLog()
    key, quick = sys.argv[1], "--quick" in sys.argv
    log(f"`{' '.join(sys.argv[1:])}`; load before {open('/proc/loadavg').read().strip()}")
    task, regs = pairs(key, quick)
    budget = task.budget
    runs = [sc.hf_run(task, name, "HF", reg) for name, reg in regs.items()]
    scales: dict[str, float] = {}
    for r in runs:
        opt = next(
            c.cell_contents
            for c in r.step.__closure__
            if type(c.cell_contents).__name__ == "HessianFree"
        )

        def step(r=r, inner=r.step, opt=opt) -> None:
            inner()
            scales[r.name] = opt.last_step.damping_floor

        r.step = step
    slices = 8
    sc.interleave(runs, task, budget, slices, "cpu")
    for r in runs:
        at = [sc.value_at(r.curve, budget * f) for f in (0.25, 0.5, 1.0)]
        log(
            f"{r.name:30s} error at ¼/½/all of {budget:g} s: "
            + " / ".join(f"{e:.3g}" for e in at)
            + f"  steps {r.steps}  last floor {scales.get(r.name, float('nan')):.3g}"
            + f"  {r.statuses}"
        )
    log(f"load after {open('/proc/loadavg').read().strip()}")
    if "--save" in sys.argv:
        log.append_to(
            Path(__file__).resolve().parent / "results" / "2026-12-01-lamfloor.md",
            "lamfloor (raw runs)",
        )


if __name__ == "__main__":
    main()
