r"""How fast the default λ floor should fall on a growing batch (#14, stop 51).

``relative_min_damping='auto'`` is 1 % of the curvature scale × (b₀ / b)^p on a batch grown
past b₀ (``hessfree._damping_control._AUTO_FLOOR_FALL`` = p). This races, at equal wall-clock
and interleaved from the same weights (the scorecard's harness, 1 torch thread), the
scorecard's best Adam, its tuned HF row, and ``HessianFree(params)`` in that tuned row's batch
schedule (``scorecard.defaults_in``) once per exponent p, each run stepping with its own p.

    OPENBLAS_NUM_THREADS=1 python experiments/_floorfall51.py curves 90 1,1.5,2,3
    OPENBLAS_NUM_THREADS=1 python experiments/_floorfall51.py mnist1d 30 1,2
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402

import hessfree._damping_control as dc  # noqa: E402

#: task -> (its build, the tuned HF row's name, the best Adam's (lr, batch)): run35's picks
TASKS = {
    "curves": (
        lambda: sc.make_curves_task(False),
        "250×1.003/step, curvature ¼, cg≤2, K-FAC rank 32 refresh 2, λ≥30/batch",
        (1e-3, 20),
    ),
    "mnist1d": (
        lambda: sc._classifier("mnist1d", False),
        "250×1.1/step, curvature ¼ to 4 full steps, cg≤10, K-FAC rank 16",
        (3e-3, 32),
    ),
}


def with_fall(run: sc.Run, power: float) -> sc.Run:
    """``run`` stepping with ``_AUTO_FLOOR_FALL`` = ``power`` (restored after each step)."""
    inner = run.step

    def step() -> None:
        saved = dc._AUTO_FLOOR_FALL
        dc._AUTO_FLOOR_FALL = power
        try:
            inner()
        finally:
            dc._AUTO_FLOOR_FALL = saved

    run.step = step
    return run


def main() -> None:
    torch.set_num_threads(1)
    key, budget = sys.argv[1], float(sys.argv[2])
    powers = [float(p) for p in sys.argv[3].split(",")]
    build, tuned_name, (lr, batch) = TASKS[key]
    task = build()
    tuned = task.hf[tuned_name]
    schedule = sc.defaults_in(tuned)
    runs = [
        sc.first_order_run(task, "Adam", lr, batch),
        sc.hf_run(task, "tuned", "HF", tuned),
        *(with_fall(sc.hf_run(task, f"defaults p={p:g}", "HF", schedule), p) for p in powers),
    ]
    print("load before", os.getloadavg(), "cpu", torch.backends.cpu.get_cpu_capability())
    print("tuned:", tuned_name, "| defaults in:", sc._regime_text(schedule))
    t0 = time.time()
    slices = task.slices
    sc.interleave(runs, task, budget, slices, "cpu", error_steps=task.step_errors * budget / slices)
    print(f"load after {os.getloadavg()}, wall {time.time() - t0:.0f} s", flush=True)
    ref = sc.final_error(runs[1])
    marks = [budget * k / 6 for k in range(1, 7)]
    for r in runs:
        e = sc.final_error(r)
        at = [min((x for t, x in r.curve if t <= m), default=float("nan")) for m in marks]
        print(
            f"{r.name:16s} {e:10.4g} × tuned {e / ref:7.3f} steps {r.steps:5d} | best by "
            + " ".join(f"{x:.3g}" for x in at)
        )
    if key == "mnist1d":  # times to Adam's losses at ¼, ½, 1× (the scorecard's targets)
        adam = runs[0].curve
        targets = [min(x for t, x in adam if t <= budget * f) for f in (0.25, 0.5, 1.0)]
        print("targets", " ".join(f"{t:.3g}" for t in targets))
        for r in runs:
            print(f"{r.name:16s} s to targets", " ".join(
                f"{sc.time_to(r.curve, t):.2f}" for t in targets))  # fmt: skip


if __name__ == "__main__":
    main()
