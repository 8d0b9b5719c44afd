"""CURVES regimes at equal wall-clock on the scorecard's *full* task (#14): K-FAC-like HF
(few CG iterations, small batches) against Adam lr 1e-3 b 100, interleaved as the scorecard
does (1 torch thread). Prints each run's final error / Adam's, steps and time per step.

    python experiments/_curves_regimes.py BUDGET name[,name...] [--quick]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402


def variants() -> dict[str, dict]:
    def k(b: int, c: int, it: int, **kf) -> dict:
        return dict(batch=b, curvature_batch=c, kw=dict(cg_max_iter=it), kfac=dict(rank=32) | kf)

    return {
        "ref": dict(batch=250, curvature_batch=62, kw=dict(cg_max_iter=10)),
        "k250/62c5": k(250, 62, 5),
        "k250/62c2": k(250, 62, 2),
        "k250/62c3": k(250, 62, 3),
        "k100/25c2": k(100, 25, 2),
        "k100/50c2": k(100, 50, 2),
        "k100/25c3": k(100, 25, 3),
        "k250/31c2": k(250, 31, 2),
        "k500/62c3": k(500, 62, 3),
        "k250/62c2r2": k(250, 62, 2, refresh=2),
        "k100/25c2r3": k(100, 25, 2, refresh=3),
        "k250/62c2r4": k(250, 62, 2, refresh=4),
        "k250/62c1r2": k(250, 62, 1, refresh=2),
        "k500/62c2r2": k(500, 62, 2, refresh=2),
        "k250/62c3r2": k(250, 62, 3, refresh=2),
        "k250/62c2r2d9": k(250, 62, 2, refresh=2, decay=0.9),
        "k250/62c2r2md": k(250, 62, 2, refresh=2) | dict(kw=dict(cg_max_iter=2, min_damping=0.01)),
        "k250/62c2r2rd3": k(250, 62, 2, refresh=2, relative_damping=0.03),
    }


def main() -> None:
    torch.set_num_threads(1)
    budget = float(sys.argv[1])
    names = sys.argv[2].split(",")
    task = sc.make_curves_task("--quick" in sys.argv)
    runs = [sc.first_order_run(task, "Adam", 1e-3, 100)]
    if "--b20" in sys.argv:  # the full scorecard's other best Adam
        runs.append(sc.first_order_run(task, "Adam", 1e-3, 20))
    v = variants()
    runs += [sc.hf_run(task, n, "HF", v[n]) for n in names]
    print("load before", os.getloadavg())
    t0 = time.time()
    sc.interleave(runs, task, budget, 8, "cpu")
    print(f"load after {os.getloadavg()}, wall {time.time() - t0:.0f} s")
    ref = sc.final_error(runs[0])
    for r in runs:
        e = sc.final_error(r)
        curve = " ".join(f"{v:.2f}" for _, v in r.curve[1:])
        print(
            f"{r.name:16s} {e:7.3f} ratio {e / ref:.3f} steps {r.steps:5d} "
            f"{1e3 * r.clock / max(r.steps, 1):6.1f} ms/step {r.statuses} | {curve}"
        )


if __name__ == "__main__":
    main()
