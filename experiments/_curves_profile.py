"""Where an HF step's time goes on the scorecard's full CURVES task (#14): phases per step.

Runs ``steps`` HF steps of a regime from the scorecard's start (after ``warm`` steps not
counted), 1 torch thread, and prints the median of ``StepInfo.time_phases`` and the split of the
curvature products / K-FAC / CG vector work from cProfile.

    python experiments/_curves_profile.py [regime] [steps]
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "250/62, cg≤10"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    task = sc.make_curves_task(quick=False)
    run = sc.hf_run(task, name, "HF", task.hf[name])
    opt = None
    for _ in range(10):
        run.step()
    # find the optimizer through the closure cell
    for c in run.step.__closure__:
        if type(c.cell_contents).__name__ == "HessianFree":
            opt = c.cell_contents
    infos = []
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        run.step()
        infos.append(opt.last_step)
    prof.disable()
    wall = (time.perf_counter() - t0) / steps
    phases = sorted({k for i in infos for k in i.time_phases})
    print(f"{name}: {wall * 1e3:.1f} ms/step (with cProfile)")
    for k in phases:
        v = [i.time_phases.get(k, 0.0) for i in infos]
        med, mean = statistics.median(v) * 1e3, statistics.mean(v) * 1e3
        print(f"  {k:12s} median {med:7.1f} ms  mean {mean:7.1f}")
    print("  products    mean", f"{statistics.mean(i.time_products for i in infos) * 1e3:.1f} ms")
    for key in ("cg_iters", "cg_matvecs", "precond_matvecs", "closure_calls", "backtrack_iter"):
        print(f"  {key} mean {statistics.mean(getattr(i, key) for i in infos):.2f}")
    print("  statuses", {s: sum(i.status == s for i in infos) for s in {i.status for i in infos}})
    print("  λ", statistics.median(i.damping for i in infos))
    st = pstats.Stats(prof)
    st.sort_stats("cumulative").print_stats(45)


if __name__ == "__main__":
    main()
