"""Would the scorecard's short CURVES sweep pick the row that is best at the full budget? (#14)

Runs the scorecard's CURVES HF rows (``make_curves_task``'s ``hf``: the sweep's candidates)
and its first Adam row interleaved as the sweep does (same initial weights, data order,
1 torch thread), for ``BUDGET`` seconds with an evaluation every ``STEP`` seconds, and prints
each row's error at the sweep budget (15 s full, 4 s quick) and at every evaluation, with the
rank order at each time: where the ranking at the sweep budget differs from the ranking later,
the sweep picks for the wrong horizon.

    python experiments/_curves_sweep.py BUDGET STEP [--quick] [--only name,name]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    budget, step = float(sys.argv[1]), float(sys.argv[2])
    task = sc.make_curves_task("--quick" in sys.argv)
    names = list(task.hf)
    if "--only" in sys.argv:
        names = sys.argv[sys.argv.index("--only") + 1].split(";")
    lr, b = task.adam[0]
    runs = [sc.first_order_run(task, "Adam", lr, b)]
    runs += [sc.hf_run(task, n, "HF", task.hf[n]) for n in names]
    print("load before", os.getloadavg(), flush=True)
    t0 = time.time()
    sc.interleave(runs, task, budget, round(budget / step), "cpu")
    print(f"load after {os.getloadavg()}, wall {time.time() - t0:.0f} s")
    times = [step * (k + 1) for k in range(round(budget / step))]
    print("row".ljust(58), " ".join(f"{t:6.0f}s" for t in times))
    for r in runs:
        vals = [sc.value_at(r.curve, t) for t in times]
        print(f"{r.name[:58]:58s}", " ".join(f"{v:7.2f}" for v in vals), f"steps {r.steps}")
    for t in times:
        hf = sorted(runs[1:], key=lambda r, t=t: sc.value_at(r.curve, t))
        top = "; ".join(f"{r.name} {sc.value_at(r.curve, t):.2f}" for r in hf[:3])
        print(f"HF best at {t:4.0f} s: {top}")


if __name__ == "__main__":
    main()
